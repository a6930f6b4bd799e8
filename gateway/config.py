"""A node's home directory and its configuration file.

The home holds everything a node is: `config.toml` (what the operator may edit),
`keys/` (private keys, mode 0600, directory 0700), `certs/` (the node's TLS
certificate and the federation CA), `node.db` (SQLite) and `admin.sock` (the
CLI's Unix socket, mode 0600). Errors in the config name the file and the field
and say what is expected, because the person reading them is a town's IT staff
member at a terminal, not the author.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tomli_w

from federation.errors import ConfigError, ProtocolError
from federation.identity import check_municipality_code, check_node_id, check_segment_name
from federation.roster import Endpoint

__all__ = [
    "DEFAULT_SEGMENT",
    "Home",
    "NodeConfig",
    "load_config",
    "parse_listen",
    "resolve_home",
    "write_config",
]

DEFAULT_SEGMENT = "default"
CONFIG_NAME = "config.toml"
MONITORING_EXAMPLE = """
# Prometheus /metrics and /healthz over plain HTTP (no admin API), off while absent.
# Bind it to a management address only.
# [monitoring]
# listen = "127.0.0.1:9464"
"""
API_EXAMPLE = """
# The staff client API (JSON over HTTPS + WebSocket, /api/v1), off while absent.
# Without tls_cert/tls_key it presents the node's own certificate (issued by the
# federation CA); give a certificate staff browsers trust for a web client.
# [api]
# listen = "0.0.0.0:8444"
# tls_cert = "/etc/kakehashi/api.crt"
# tls_key = "/etc/kakehashi/api.key"
"""


@dataclass(frozen=True, slots=True)
class Home:
    """Paths inside a node's home directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def database(self) -> Path:
        return self.root / "node.db"

    @property
    def admin_socket(self) -> Path:
        return self.root / "admin.sock"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def files(self) -> Path:
        """Shared files, content-addressed by SHA-256 (see `gateway.files`)."""
        return self.root / "files"

    @property
    def signing_key(self) -> Path:
        return self.keys / "signing.key"

    @property
    def tls_key(self) -> Path:
        return self.keys / "tls.key"

    @property
    def token_key(self) -> Path:
        """The key that signs staff access tokens (made on first use; never leaves the node)."""
        return self.keys / "token.key"

    @property
    def federation_key(self) -> Path:
        """The federation root signing key (authority only)."""
        return self.keys / "federation.key"

    @property
    def ca_key(self) -> Path:
        """The federation CA key (authority only)."""
        return self.keys / "ca.key"

    @property
    def tls_cert(self) -> Path:
        return self.certs / "node.crt"

    @property
    def ca_cert(self) -> Path:
        return self.certs / "ca.crt"

    def create_dirs(self) -> None:
        """Create the home with private permissions (0700)."""
        for path in (self.root, self.keys, self.certs):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(path, 0o700)

    def require_initialised(self) -> None:
        """`ConfigError` with the fix if this is not a node home."""
        if not self.config.is_file():
            raise ConfigError(
                f"{self.root} is not a Kakehashi node home (no {CONFIG_NAME})",
                code="not_initialised",
                hint="create one with: kakehashi init --home DIR --node-id ID --name NAME "
                "--listen HOST:PORT",
            )


def resolve_home(home: str | Path | None) -> Home:
    """The home from `--home`, else from KAKEHASHI_HOME; `ConfigError` if neither is set."""
    value = home if home is not None else os.environ.get("KAKEHASHI_HOME")
    if not value:
        raise ConfigError(
            "no node home given",
            code="no_home",
            hint="pass --home DIR or set KAKEHASHI_HOME",
        )
    return Home(Path(value).expanduser().absolute())


@dataclass(frozen=True, slots=True, kw_only=True)
class DiskThresholds:
    """When the free space on the node's filesystem is a warning, or critical, in the
    health checks: under a share of the whole or under a size, whichever comes first
    ([health] disk_warn_free_percent, disk_warn_free_mib, disk_critical_free_percent,
    disk_critical_free_mib). Critical leaves room for a few files more: at 0 free, sends
    and deliveries are refused with disk_full."""

    warn_percent: float = 10.0
    warn_mib: int = 2048
    critical_percent: float = 2.0
    critical_mib: int = 256


_DISK_FIELDS = {
    "disk_warn_free_percent": "warn_percent",
    "disk_warn_free_mib": "warn_mib",
    "disk_critical_free_percent": "critical_percent",
    "disk_critical_free_mib": "critical_mib",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """Settings of one node, as read from its config.toml."""

    node_id: str
    """This node's id, e.g. 'tsu'."""
    name: str
    """Display name, e.g. '津市'."""
    code: str | None = None
    """6-digit local government code, if any."""
    listen_host: str = "127.0.0.1"
    """Address the federation API listens on."""
    listen_port: int = 8443
    """Port the federation API listens on."""
    endpoints: tuple[Endpoint, ...] = ()
    """Published endpoint per network segment, sorted by segment."""
    health_interval: float = 5.0
    """Seconds between health checks of each peer."""
    disk: DiskThresholds = DiskThresholds()
    """Free disk space below which the health checks warn or are critical ([health])."""
    request_timeout: float = 10.0
    """Seconds before a request to a peer is abandoned."""
    retry_cap: float = 30.0
    """Longest wait, in seconds, between delivery retries to an unreachable peer."""
    catch_up_interval: float = 30.0
    """Seconds between routine catch-up passes with every peer."""
    decode_helper: bool = True
    """Screen large incoming batches (catch-up pages, full pushes) in a helper process,
    on another core ([delivery] decode_helper); off: all decoding in the node's process."""
    streams: bool = True
    """Send batches to peers on a long-lived stream each ([delivery] streams); off: one
    HTTPS request per batch (for networks whose proxies break WebSocket upgrades)."""
    restore_timeout: float = 60.0
    """After a restore from backup: longest wait, in seconds, for peers to answer the first
    catch-up pass before local sends are allowed anyway (see `kakehashi restore`)."""
    log_format: str = "auto"
    """'auto' (readable on a terminal, JSON otherwise), 'json' or 'console'."""
    log_level: str = "info"
    """debug, info, warning or error."""
    certificate_days: int = 365
    """Validity of node certificates this node issues (authority only)."""
    renew_before_days: int = 30
    """Renew this node's TLS certificate (through the authority) this many days before
    it expires ([tls] renew_before_days)."""
    monitoring_listen: tuple[str, int] | None = None
    """(host, port) of the plain-HTTP monitoring listener (/metrics, /healthz); None: off."""
    api_listen: tuple[str, int] | None = None
    """(host, port) of the staff client API over HTTPS ([api] listen); None: off."""
    api_tls_cert: Path | None = None
    """Certificate (PEM chain) the client API presents; None: the node's own certificate."""
    api_tls_key: Path | None = None
    """Private key of `api_tls_cert`; set together with it."""
    files_max_upload_mb: int = 100
    """Largest file staff may upload, in MiB ([files] max_upload_mb)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Sections this version does not know, kept so a rewrite does not lose them."""


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(
        {"str": "a string", "int": "an integer", "float": "a number"}.get(k.__name__, k.__name__)
        for k in kinds
    )


def _field(
    table: dict[str, Any], section: str, name: str, kind: type | tuple[type, ...], path: Path
) -> Any:
    value = table.get(name)
    if value is None:
        raise ConfigError(
            f"{path}: missing field '{section}.{name}'",
            code="config_missing_field",
            hint=f"add `{name} = ...` under [{section}]",
        )
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in kinds):
        # TOML true is an int to Python, but not a number here
        raise ConfigError(
            f"{path}: field '{section}.{name}' must be {_kind_name(kind)}, "
            f"not {type(value).__name__}",
            code="config_bad_field",
        )
    return value


def _optional(
    table: dict[str, Any],
    section: str,
    name: str,
    kind: type | tuple[type, ...],
    path: Path,
    default: Any,
) -> Any:
    if name not in table:
        return default
    return _field(table, section, name, kind, path)


def parse_endpoints(pairs: dict[str, Any], source: str) -> tuple[Endpoint, ...]:
    """Endpoints from {segment: url}; `ConfigError` naming `source` on a bad one."""
    endpoints = []
    for segment, url in sorted(pairs.items()):
        try:
            check_segment_name(segment)
            if not isinstance(url, str):
                raise ProtocolError(f"endpoint for {segment} must be a string", code="bad_endpoint")
            parts = urlsplit(url)
            if parts.scheme != "https" or not parts.hostname or parts.port is None:
                raise ProtocolError(
                    f"endpoint {url!r} must look like https://HOST:PORT", code="bad_endpoint"
                )
            endpoints.append(Endpoint(segment=segment, url=url.rstrip("/")))
        except (ProtocolError, ValueError) as exc:
            raise ConfigError(
                f"{source}: segment {segment!r}: {exc}", code="config_bad_field"
            ) from exc
    return tuple(endpoints)


def parse_listen(value: str, field_name: str, path: Path) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 as '[::1]:PORT') as (host, port); `ConfigError` naming the field."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"{path}: field '{field_name}' must be HOST:PORT with a port 1-65535, "
            f'e.g. "127.0.0.1:9464", not {value!r}',
            code="config_bad_field",
        )
    return host, int(port)


def _listen_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def load_config(home: Home) -> NodeConfig:
    """Read and validate `home`'s config.toml."""
    home.require_initialised()
    path = home.config
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}", code="config_syntax") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}", code="config_unreadable") from exc
    node = raw.get("node")
    if not isinstance(node, dict):
        raise ConfigError(f"{path}: missing section [node]", code="config_missing_field")
    listen = raw.get("listen", {})
    health = raw.get("health", {})
    log = raw.get("log", {})
    for section, table in (("listen", listen), ("health", health), ("log", log)):
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{section}] must be a table", code="config_bad_field")
    segments = raw.get("segments", {})
    if not isinstance(segments, dict) or not segments:
        raise ConfigError(
            f'{path}: missing section [segments] (at least one SEGMENT = "https://HOST:PORT")',
            code="config_missing_field",
        )
    node_id = _field(node, "node", "id", str, path)
    code = _optional(node, "node", "code", str, path, None)
    try:
        check_node_id(node_id)
        if code is not None:
            check_municipality_code(code)
    except ProtocolError as exc:
        raise ConfigError(f"{path}: {exc}", code="config_bad_field") from exc
    log_format = _optional(log, "log", "format", str, path, "auto")
    if log_format not in ("auto", "json", "console"):
        raise ConfigError(
            f"{path}: field 'log.format' must be auto, json or console", code="config_bad_field"
        )
    port = _field(listen, "listen", "port", int, path)
    if not 0 < port < 65536:
        raise ConfigError(f"{path}: field 'listen.port' must be 1-65535", code="config_bad_field")
    interval = _optional(health, "health", "interval_seconds", (int, float), path, 5.0)
    if interval <= 0:
        raise ConfigError(
            f"{path}: field 'health.interval_seconds' must be positive", code="config_bad_field"
        )
    log_level = _optional(log, "log", "level", str, path, "info")
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(
            f"{path}: field 'log.level' must be debug, info, warning or error",
            code="config_bad_field",
        )
    certificate_days = _optional(node, "node", "certificate_days", int, path, 365)
    if not 1 <= certificate_days <= 3650:
        raise ConfigError(
            f"{path}: field 'node.certificate_days' must be 1-3650", code="config_bad_field"
        )
    timeout = _optional(health, "health", "request_timeout_seconds", (int, float), path, 10.0)
    if timeout <= 0:
        raise ConfigError(
            f"{path}: field 'health.request_timeout_seconds' must be positive",
            code="config_bad_field",
        )
    disk = _disk_thresholds(health, path)
    delivery = raw.get("delivery", {})
    if not isinstance(delivery, dict):
        raise ConfigError(f"{path}: [delivery] must be a table", code="config_bad_field")
    retry_cap = _optional(delivery, "delivery", "retry_cap_seconds", (int, float), path, 30.0)
    catch_up = _optional(
        delivery, "delivery", "catch_up_interval_seconds", (int, float), path, 30.0
    )
    restore_timeout = _optional(
        delivery, "delivery", "restore_catch_up_timeout_seconds", (int, float), path, 60.0
    )
    decode_helper = _optional(delivery, "delivery", "decode_helper", bool, path, True)
    streams = _optional(delivery, "delivery", "streams", bool, path, True)
    if retry_cap < 0.2 or catch_up <= 0 or restore_timeout < 0:
        raise ConfigError(
            f"{path}: [delivery] retry_cap_seconds must be >= 0.2, "
            "catch_up_interval_seconds positive and restore_catch_up_timeout_seconds >= 0",
            code="config_bad_field",
        )
    tls_table = raw.get("tls", {})
    if not isinstance(tls_table, dict):
        raise ConfigError(f"{path}: [tls] must be a table", code="config_bad_field")
    renew_before = _optional(tls_table, "tls", "renew_before_days", int, path, 30)
    if not 1 <= renew_before <= 365:
        raise ConfigError(
            f"{path}: field 'tls.renew_before_days' must be 1-365", code="config_bad_field"
        )
    monitoring = raw.get("monitoring", {})
    if not isinstance(monitoring, dict):
        raise ConfigError(f"{path}: [monitoring] must be a table", code="config_bad_field")
    monitoring_listen = _optional(monitoring, "monitoring", "listen", str, path, None)
    api_listen, api_cert, api_key = _api_section(raw, home, path)
    known = {"node", "listen", "health", "log", "segments", "delivery", "tls", "monitoring", "api"}
    known.add("files")
    files = raw.get("files", {})
    if not isinstance(files, dict):
        raise ConfigError(f"{path}: [files] must be a table", code="config_bad_field")
    max_upload_mb = _optional(files, "files", "max_upload_mb", int, path, 100)
    if not 1 <= max_upload_mb <= 1024 * 1024:
        raise ConfigError(
            f"{path}: field 'files.max_upload_mb' must be 1-1048576", code="config_bad_field"
        )
    return NodeConfig(
        node_id=node_id,
        name=_field(node, "node", "name", str, path),
        code=code,
        listen_host=_field(listen, "listen", "host", str, path),
        listen_port=port,
        endpoints=parse_endpoints(segments, f"{path} [segments]"),
        health_interval=float(interval),
        request_timeout=float(timeout),
        disk=disk,
        log_format=log_format,
        log_level=log_level,
        retry_cap=float(retry_cap),
        catch_up_interval=float(catch_up),
        restore_timeout=float(restore_timeout),
        decode_helper=decode_helper,
        streams=streams,
        certificate_days=certificate_days,
        renew_before_days=renew_before,
        monitoring_listen=None
        if monitoring_listen is None
        else parse_listen(monitoring_listen, "monitoring.listen", path),
        api_listen=api_listen,
        api_tls_cert=api_cert,
        api_tls_key=api_key,
        files_max_upload_mb=max_upload_mb,
        extra={key: value for key, value in raw.items() if key not in known},
    )


def _disk_thresholds(health: dict[str, Any], path: Path) -> DiskThresholds:
    """[health] disk_*: percents 0-100, sizes in MiB from 0, critical not above warn."""
    defaults = DiskThresholds()
    values: dict[str, Any] = {}
    for name, attribute in _DISK_FIELDS.items():
        percent = name.endswith("percent")
        default = getattr(defaults, attribute)
        value = _optional(health, "health", name, (int, float) if percent else int, path, default)
        if not 0 <= value <= (100 if percent else 2**40):
            raise ConfigError(
                f"{path}: field 'health.{name}' must be "
                + ("a percentage, 0-100" if percent else "a size in MiB, 0 or more"),
                code="config_bad_field",
            )
        values[attribute] = float(value) if percent else value
    thresholds = DiskThresholds(**values)
    if (
        thresholds.critical_percent > thresholds.warn_percent
        or thresholds.critical_mib > thresholds.warn_mib
    ):
        raise ConfigError(
            f"{path}: [health] the disk_critical_free_* thresholds must not be above the "
            "disk_warn_free_* ones",
            code="config_bad_field",
        )
    return thresholds


def _api_section(
    raw: dict[str, Any], home: Home, path: Path
) -> tuple[tuple[str, int] | None, Path | None, Path | None]:
    """[api]: (listen, tls_cert, tls_key); relative paths are relative to the home."""
    api = raw.get("api", {})
    if not isinstance(api, dict):
        raise ConfigError(f"{path}: [api] must be a table", code="config_bad_field")
    unknown = set(api) - {"listen", "tls_cert", "tls_key"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown field(s) {', '.join(sorted(unknown))} in [api]",
            code="config_bad_field",
            hint="[api] takes listen, tls_cert and tls_key",
        )
    if not api:
        return None, None, None
    listen = parse_listen(_field(api, "api", "listen", str, path), "api.listen", path)
    cert = _optional(api, "api", "tls_cert", str, path, None)
    key = _optional(api, "api", "tls_key", str, path, None)
    if (cert is None) != (key is None):
        raise ConfigError(
            f"{path}: [api] tls_cert and tls_key go together",
            code="config_bad_field",
            hint="set both (a certificate and its key), or neither to use the node's own",
        )
    if cert is None or key is None:
        return listen, None, None
    if not cert or not key:
        raise ConfigError(
            f"{path}: [api] tls_cert and tls_key must be file paths", code="config_bad_field"
        )
    return listen, home.root / Path(cert).expanduser(), home.root / Path(key).expanduser()


def write_config(home: Home, config: NodeConfig) -> None:
    """Write config.toml (mode 0600; it names no secret but belongs to the node's operator)."""
    document: dict[str, Any] = {
        "node": {"id": config.node_id, "name": config.name},
        "listen": {"host": config.listen_host, "port": config.listen_port},
        "segments": {e.segment: e.url for e in config.endpoints},
        "health": {
            "interval_seconds": config.health_interval,
            "request_timeout_seconds": config.request_timeout,
        },
        "log": {"format": config.log_format, "level": config.log_level},
        "delivery": {
            "retry_cap_seconds": config.retry_cap,
            "catch_up_interval_seconds": config.catch_up_interval,
        },
    }
    for name, attribute in _DISK_FIELDS.items():
        value = getattr(config.disk, attribute)
        if value != getattr(DiskThresholds(), attribute):
            document["health"][name] = value
    if not config.decode_helper:
        document["delivery"]["decode_helper"] = False
    if not config.streams:
        document["delivery"]["streams"] = False
    if config.code is not None:
        document["node"]["code"] = config.code
    if config.certificate_days != 365:
        document["node"]["certificate_days"] = config.certificate_days
    if config.renew_before_days != 30:
        document["tls"] = {"renew_before_days": config.renew_before_days}
    if config.monitoring_listen is not None:
        document["monitoring"] = {"listen": _listen_text(*config.monitoring_listen)}
    if config.api_listen is not None:
        document["api"] = {"listen": _listen_text(*config.api_listen)}
        if config.api_tls_cert is not None and config.api_tls_key is not None:
            document["api"]["tls_cert"] = str(config.api_tls_cert)
            document["api"]["tls_key"] = str(config.api_tls_key)
    if config.files_max_upload_mb != 100:
        document["files"] = {"max_upload_mb": config.files_max_upload_mb}
    if config.restore_timeout != 60.0:
        document["delivery"]["restore_catch_up_timeout_seconds"] = config.restore_timeout
    document.update(config.extra)
    header = "# Kakehashi node configuration. Restart the node after editing.\n"
    footer = "" if config.monitoring_listen is not None else MONITORING_EXAMPLE
    footer += "" if config.api_listen is not None else API_EXAMPLE
    tmp = home.config.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(header + tomli_w.dumps(document) + footer)
    os.replace(tmp, home.config)
