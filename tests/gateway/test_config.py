"""Tests for gateway.config (the node home and config.toml) and `init_home`, which creates both.

Errors here are read by a town's IT staff at a terminal, so the tests pin down that each
message names the file and the field and says what is expected.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from federation.errors import ConfigError
from gateway.config import (
    DiskThresholds,
    Home,
    NodeConfig,
    load_config,
    resolve_home,
    write_config,
)
from gateway.membership import init_home


async def _init(home: Home, **overrides: Any) -> NodeConfig:
    options: dict[str, Any] = {
        "node_id": "tsu",
        "name": "津市",
        "code": "242012",
        "listen_host": "127.0.0.1",
        "listen_port": 8443,
        "segments": {},
    }
    options.update(overrides)
    return await init_home(home, **options)


@pytest.fixture
async def home(tmp_path: Path) -> Home:
    home = Home(tmp_path / "home")
    await _init(home)
    return home


def _edit(home: Home, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite config.toml after `change` mutated its parsed content."""
    document = tomllib.loads(home.config.read_text(encoding="utf-8"))
    change(document)
    home.config.write_text(tomli_w.dumps(document), encoding="utf-8")


def _load_error(home: Home) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_config(home)
    return caught.value


# --------------------------------------------------------------------------- round trip


async def test_config_written_by_init_home_loads_back_equal(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    written = await _init(home, segments={"lgwan": "https://10.20.0.2:8443"})
    loaded = load_config(home)
    assert loaded == written
    assert loaded.node_id == "tsu"
    assert loaded.name == "津市"
    assert loaded.code == "242012"
    assert [(e.segment, e.url) for e in loaded.endpoints] == [("lgwan", "https://10.20.0.2:8443")]


async def test_init_home_without_segments_publishes_the_listen_address_as_default(
    tmp_path: Path,
) -> None:
    home = Home(tmp_path / "home")
    await _init(home, listen_host="127.0.0.1", listen_port=9443)
    endpoints = load_config(home).endpoints
    assert [(e.segment, e.url) for e in endpoints] == [("default", "https://127.0.0.1:9443")]


async def test_write_config_preserves_unknown_extra_sections(home: Home) -> None:
    _edit(home, lambda doc: doc.update({"future": {"feature": "on", "limit": 3}}))
    config = load_config(home)
    assert config.extra == {"future": {"feature": "on", "limit": 3}}

    write_config(home, config)

    assert tomllib.loads(home.config.read_text(encoding="utf-8"))["future"] == {
        "feature": "on",
        "limit": 3,
    }
    assert load_config(home) == config


async def test_written_config_shows_the_monitoring_listener_as_a_commented_example(
    home: Home,
) -> None:
    text = home.config.read_text(encoding="utf-8")
    assert '# [monitoring]\n# listen = "127.0.0.1:9464"' in text
    assert "monitoring" not in tomllib.loads(text)  # off until the operator uncomments it
    assert load_config(home).monitoring_listen is None


@pytest.mark.parametrize(
    ("listen", "expected"),
    [("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:9100", ("::1", 9100))],
)
async def test_monitoring_listen_is_read_and_written_back(
    home: Home, listen: str, expected: tuple[str, int]
) -> None:
    _edit(home, lambda doc: doc.update({"monitoring": {"listen": listen}}))
    config = load_config(home)
    assert config.monitoring_listen == expected
    assert config.extra == {}
    write_config(home, config)
    assert tomllib.loads(home.config.read_text(encoding="utf-8"))["monitoring"] == {
        "listen": listen
    }
    assert "# [monitoring]" not in home.config.read_text(encoding="utf-8")
    assert load_config(home) == config


@pytest.mark.parametrize("listen", ["9464", "localhost", ":9464", "127.0.0.1:0", "h:70000"])
async def test_bad_monitoring_listen_names_the_field_and_the_expected_form(
    home: Home, listen: str
) -> None:
    _edit(home, lambda doc: doc.update({"monitoring": {"listen": listen}}))
    error = _load_error(home)
    assert "'monitoring.listen'" in str(error)
    assert "HOST:PORT" in str(error)
    assert str(home.config) in str(error)
    assert error.code == "config_bad_field"


async def test_written_config_shows_the_client_api_as_a_commented_example(home: Home) -> None:
    text = home.config.read_text(encoding="utf-8")
    assert '# [api]\n# listen = "0.0.0.0:8444"' in text
    assert "api" not in tomllib.loads(text)  # off until the operator uncomments it
    config = load_config(home)
    assert (config.api_listen, config.api_tls_cert, config.api_tls_key) == (None, None, None)


async def test_client_api_listen_and_certificate_are_read_and_written_back(home: Home) -> None:
    api = {"listen": "0.0.0.0:8444", "tls_cert": "api/api.crt", "tls_key": "/etc/kakehashi/api.key"}
    _edit(home, lambda doc: doc.update({"api": api}))
    config = load_config(home)
    assert config.api_listen == ("0.0.0.0", 8444)
    assert config.api_tls_cert == home.root / "api" / "api.crt"  # relative to the home
    assert config.api_tls_key == Path("/etc/kakehashi/api.key")
    assert config.extra == {}
    write_config(home, config)
    text = home.config.read_text(encoding="utf-8")
    assert "# [api]" not in text
    assert tomllib.loads(text)["api"]["listen"] == "0.0.0.0:8444"
    assert load_config(home) == config


@pytest.mark.parametrize(
    ("api", "field"),
    [
        ({"listen": "8444"}, "'api.listen'"),
        ({"tls_cert": "a.crt", "tls_key": "a.key"}, "'api.listen'"),
        ({"listen": "0.0.0.0:8444", "tls_cert": "a.crt"}, "go together"),
        ({"listen": "0.0.0.0:8444", "port": 8444}, "port"),
        ({"listen": 8444}, "'api.listen'"),
    ],
)
async def test_bad_client_api_section_names_the_field(
    home: Home, api: dict[str, Any], field: str
) -> None:
    _edit(home, lambda doc: doc.update({"api": api}))
    error = _load_error(home)
    assert field in str(error) and str(home.config) in str(error)
    assert error.code in ("config_bad_field", "config_missing_field")


async def test_files_max_upload_defaults_to_100_mb_and_is_read_and_written_back(
    home: Home,
) -> None:
    assert load_config(home).files_max_upload_mb == 100
    assert "files" not in tomllib.loads(home.config.read_text(encoding="utf-8"))
    _edit(home, lambda doc: doc.update({"files": {"max_upload_mb": 20}}))
    config = load_config(home)
    assert config.files_max_upload_mb == 20
    assert config.extra == {}
    write_config(home, config)
    assert load_config(home) == config


@pytest.mark.parametrize("value", [0, -1, "100", 1.5, True])
async def test_bad_files_max_upload_names_the_field(home: Home, value: object) -> None:
    _edit(home, lambda doc: doc.update({"files": {"max_upload_mb": value}}))
    error = _load_error(home)
    assert "'files.max_upload_mb'" in str(error)
    assert error.code == "config_bad_field"


async def test_decode_helper_off_is_read_and_written_back(home: Home) -> None:
    assert load_config(home).decode_helper is True
    _edit(home, lambda doc: doc["delivery"].update({"decode_helper": False}))
    config = load_config(home)  # a TOML boolean where a boolean is expected
    assert config.decode_helper is False
    write_config(home, config)
    assert load_config(home) == config


@pytest.mark.parametrize(("field", "value"), [("retry_cap_seconds", True), ("decode_helper", 1)])
async def test_a_boolean_is_not_a_number_and_a_number_not_a_boolean(
    home: Home, field: str, value: object
) -> None:
    _edit(home, lambda doc: doc["delivery"].update({field: value}))
    error = _load_error(home)
    assert f"'delivery.{field}'" in str(error)
    assert error.code == "config_bad_field"


async def test_streams_are_on_by_default_and_off_is_read_and_written_back(home: Home) -> None:
    assert load_config(home).streams is True
    assert "streams" not in tomllib.loads(home.config.read_text())["delivery"]
    _edit(home, lambda doc: doc["delivery"].update({"streams": False}))
    config = load_config(home)
    assert config.streams is False
    write_config(home, config)
    assert load_config(home) == config
    assert tomllib.loads(home.config.read_text())["delivery"]["streams"] is False
    _edit(home, lambda doc: doc["delivery"].update({"streams": "no"}))
    error = _load_error(home)
    assert "'delivery.streams'" in str(error)
    assert error.code == "config_bad_field"


async def test_disk_thresholds_default_to_10_percent_2_gib_and_2_percent_256_mib(
    home: Home,
) -> None:
    assert load_config(home).disk == DiskThresholds(
        warn_percent=10.0, warn_mib=2048, critical_percent=2.0, critical_mib=256
    )
    assert not any(k.startswith("disk") for k in tomllib.loads(home.config.read_text())["health"])


async def test_disk_thresholds_are_read_and_written_back(home: Home) -> None:
    fields = {"disk_warn_free_percent": 5, "disk_warn_free_mib": 10240}
    fields |= {"disk_critical_free_percent": 0.5, "disk_critical_free_mib": 1024}
    _edit(home, lambda doc: doc["health"].update(fields))
    config = load_config(home)
    assert config.disk == DiskThresholds(
        warn_percent=5.0, warn_mib=10240, critical_percent=0.5, critical_mib=1024
    )
    write_config(home, config)
    assert load_config(home) == config
    assert tomllib.loads(home.config.read_text())["health"]["disk_warn_free_mib"] == 10240


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("disk_warn_free_percent", 101, "a percentage, 0-100"),
        ("disk_critical_free_percent", -1, "a percentage, 0-100"),
        ("disk_warn_free_percent", "10%", "must be an integer or a number"),
        ("disk_warn_free_mib", -5, "a size in MiB, 0 or more"),
        ("disk_critical_free_mib", 1.5, "must be an integer"),
        ("disk_critical_free_mib", True, "must be an integer"),
    ],
)
async def test_bad_disk_threshold_names_the_field(
    home: Home, name: str, value: object, says: str
) -> None:
    _edit(home, lambda doc: doc["health"].update({name: value}))
    error = _load_error(home)
    assert f"'health.{name}'" in str(error) and says in str(error), str(error)
    assert error.code == "config_bad_field"


@pytest.mark.parametrize(
    "fields",
    [
        {"disk_critical_free_percent": 20},  # above the default warning at 10%
        {"disk_warn_free_mib": 100, "disk_critical_free_mib": 200},
    ],
)
async def test_disk_critical_threshold_above_the_warning_is_refused(
    home: Home, fields: dict[str, int]
) -> None:
    _edit(home, lambda doc: doc["health"].update(fields))
    error = _load_error(home)
    assert "must not be above" in str(error) and str(home.config) in str(error)
    assert error.code == "config_bad_field"


# --------------------------------------------------------------------------- load errors


async def test_missing_node_name_names_the_field_and_the_file(home: Home) -> None:
    _edit(home, lambda doc: doc["node"].pop("name"))
    error = _load_error(home)
    assert "'node.name'" in str(error)
    assert str(home.config) in str(error)
    assert error.code == "config_missing_field"


async def test_non_integer_port_names_the_field_and_says_it_must_be_an_integer(
    home: Home,
) -> None:
    _edit(home, lambda doc: doc["listen"].update(port="x"))
    error = _load_error(home)
    assert "'listen.port'" in str(error)
    assert "must be an integer" in str(error)
    assert str(home.config) in str(error)
    assert error.code == "config_bad_field"


async def test_boolean_health_interval_is_rejected_as_not_a_number(home: Home) -> None:
    # TOML `true` is a bool, which Python also counts as an int; it must not mean 1 second.
    _edit(home, lambda doc: doc["health"].update(interval_seconds=True))
    error = _load_error(home)
    assert "'health.interval_seconds'" in str(error)
    assert error.code == "config_bad_field"


async def test_invalid_toml_syntax_is_config_syntax_error_naming_the_file(home: Home) -> None:
    home.config.write_text("[node\nid = 'tsu'\n", encoding="utf-8")
    error = _load_error(home)
    assert error.code == "config_syntax"
    assert str(home.config) in str(error)


async def test_missing_segments_section_says_the_section_is_missing(home: Home) -> None:
    _edit(home, lambda doc: doc.pop("segments"))
    error = _load_error(home)
    assert "missing section [segments]" in str(error)
    assert error.code == "config_missing_field"


async def test_municipality_code_with_wrong_check_digit_in_file_is_rejected(home: Home) -> None:
    _edit(home, lambda doc: doc["node"].update(code="242013"))
    error = _load_error(home)
    assert "check digit" in str(error)
    assert "242012" in str(error)  # the code the operator probably meant
    assert str(home.config) in str(error)


def test_loading_a_directory_without_config_is_not_initialised_with_a_hint(
    tmp_path: Path,
) -> None:
    error = _load_error(Home(tmp_path))
    assert error.code == "not_initialised"
    assert error.hint is not None
    assert "kakehashi init" in error.hint


# --------------------------------------------------------------------------- resolve_home


def test_resolve_home_without_argument_or_environment_is_no_home_with_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KAKEHASHI_HOME", raising=False)
    with pytest.raises(ConfigError) as caught:
        resolve_home(None)
    assert caught.value.code == "no_home"
    assert caught.value.hint is not None
    assert "--home" in caught.value.hint
    assert "KAKEHASHI_HOME" in caught.value.hint


def test_resolve_home_uses_kakehashi_home_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KAKEHASHI_HOME", str(tmp_path / "node"))
    assert resolve_home(None).root == tmp_path / "node"


def test_resolve_home_prefers_the_explicit_argument_over_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KAKEHASHI_HOME", str(tmp_path / "from-env"))
    assert resolve_home(tmp_path / "explicit").root == tmp_path / "explicit"


# --------------------------------------------------------------------------- init_home


async def test_init_home_refuses_an_already_initialised_home(home: Home) -> None:
    before = home.signing_key.read_bytes()
    with pytest.raises(ConfigError) as caught:
        await _init(home)
    assert caught.value.code == "already_initialised"
    assert home.signing_key.read_bytes() == before  # the existing node's key is untouched


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::"])
async def test_init_home_listening_on_wildcard_without_segments_is_no_endpoint(
    tmp_path: Path, wildcard: str
) -> None:
    home = Home(tmp_path / "home")
    with pytest.raises(ConfigError) as caught:
        await _init(home, listen_host=wildcard, segments={})
    assert caught.value.code == "no_endpoint"
    assert caught.value.hint is not None
    assert "--segment" in caught.value.hint
    assert not home.config.exists()


async def test_init_home_with_wildcard_listen_and_a_segment_succeeds(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    config = await _init(home, listen_host="0.0.0.0", segments={"lgwan": "https://10.20.0.2:8443"})
    assert config.listen_host == "0.0.0.0"
    assert load_config(home) == config


async def test_init_home_rejects_a_wrong_check_digit_before_creating_anything(
    tmp_path: Path,
) -> None:
    home = Home(tmp_path / "home")
    with pytest.raises(ConfigError) as caught:
        await _init(home, code="242013")
    assert "check digit" in str(caught.value)
    assert not home.root.exists()


async def test_init_home_writes_keys_0600_and_directories_0700(home: Home) -> None:
    def mode(path: Path) -> int:
        return stat.S_IMODE(os.stat(path).st_mode)

    for key in (home.signing_key, home.tls_key):
        assert key.is_file()
        assert mode(key) == 0o600, key
    for directory in (home.root, home.keys, home.certs):
        assert mode(directory) == 0o700, directory
    assert mode(home.config) == 0o600
