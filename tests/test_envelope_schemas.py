"""The envelope schemas and the code agree: what check_body accepts, the schema accepts.

Bodies are built here as the code sees them (bytes for bin) and shown to the schemas as
JSON (bin as lowercase hex, see schemas/README.md). That view cannot tell a msgpack str
from a bin, so no case below puts bytes where text belongs or hex text where bytes belong:
check_body tells those apart, a JSON Schema cannot.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from referencing import Registry, Resource

from federation import codec
from federation.envelope import ENVELOPE_LIMITS, Content, Envelope, Kind, seal_batch
from federation.errors import ProtocolError
from federation.rooms import MAX_SENDER_NAME, check_body
from federation.signing import SigningKey

# As tests/federation/conftest.py does: keep Hypothesis's cache out of the source tree.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "kakehashi-hypothesis")

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
BODIES = SCHEMAS / "envelope-bodies"
BASE = "https://kakehashi.example/schemas/"
TARGET = bytes(range(32))
KEY = SigningKey(Ed25519PrivateKey.from_private_bytes(bytes([9]) * 32))
HOME = "mie-pref"
ROOM = "!kaigi2024:mie-pref"
FILE = {
    "sha256": bytes(range(32, 64)),
    "size": 20 * 1024 * 1024,
    "name": "浸水被害_写真.jpg",
    "mime": "image/jpeg",
}


def _load(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text("utf-8"))
    return document


ENVELOPE_SCHEMA_FILES = [
    SCHEMAS / "envelope.schema.json",
    SCHEMAS / "envelope-content.schema.json",
    *sorted(BODIES.glob("*.schema.json")),
]
REGISTRY: Registry = Registry().with_resources(
    (doc["$id"], Resource.from_contents(doc)) for doc in map(_load, ENVELOPE_SCHEMA_FILES)
)


@functools.cache
def validator(ref: str) -> jsonschema.Draft202012Validator:
    """A validator for the schema at `ref` (relative to the schemas/ base), $refs resolved."""
    return jsonschema.Draft202012Validator({"$ref": BASE + ref}, registry=REGISTRY)


def body_schema(kind: Kind, *, creation: bool = False) -> jsonschema.Draft202012Validator:
    if kind is Kind.STATE:
        part = "creation" if creation else "change"
        return validator(f"envelope-bodies/state.schema.json#/$defs/{part}")
    return validator(f"envelope-bodies/{kind.value}.schema.json")


def as_json(value: Any) -> Any:
    """msgpack values as the schemas describe them: bin becomes lowercase hex."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {key: as_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [as_json(item) for item in value]
    return value


def code_accepts(kind: Kind, body: dict[str, Any], creation: bool) -> bool:
    try:
        check_body(kind, body, creation=creation)
    except ProtocolError:
        return False
    return True


def schema_accepts(kind: Kind, body: dict[str, Any], creation: bool) -> bool:
    return body_schema(kind, creation=creation).is_valid(as_json(body))


# --- the schema files themselves -------------------------------------------------------------


@pytest.mark.parametrize("path", ENVELOPE_SCHEMA_FILES, ids=lambda p: p.name)
def test_every_envelope_schema_is_a_valid_draft_2020_12_schema_with_its_own_id(
    path: Path,
) -> None:
    document = _load(path)
    jsonschema.Draft202012Validator.check_schema(document)
    assert document["$id"] == BASE + str(path.relative_to(SCHEMAS))


def test_there_is_one_body_schema_per_kind_and_the_content_schema_lists_them_all() -> None:
    assert {p.name for p in BODIES.glob("*.schema.json")} == {
        f"{kind.value}.schema.json" for kind in Kind
    }
    content = _load(SCHEMAS / "envelope-content.schema.json")
    assert content["properties"]["kind"]["enum"] == [kind.value for kind in Kind]


def test_every_schema_file_has_a_line_in_the_readme_table() -> None:
    readme = (SCHEMAS / "README.md").read_text("utf-8")
    for path in ENVELOPE_SCHEMA_FILES:
        assert f"| `{path.relative_to(SCHEMAS)}` |" in readme


# --- bodies: code and schema agree -----------------------------------------------------------

VALID: list[tuple[Kind, dict[str, Any], bool]] = [
    (Kind.STATE, {"name": "防災連絡室"}, True),
    (Kind.STATE, {"add_nodes": ["ise"], "answers": [bytes(32), b"\x01" * 32]}, False),
    (
        Kind.STATE,
        {
            "name": "x" * 200,
            "topic": "t" * 2000,
            "room_kind": "announcement",
            "add_nodes": ["tsu", "ise"],
            "remove_nodes": [],
            "set_users": {"suzuki@tsu": "member", "k.ito_2-b@ise": "admin"},
            "remove_users": ["old@tsu"],
        },
        True,
    ),
    (Kind.STATE, {"name": "x", "room_kind": "standard"}, True),
    (Kind.STATE, {}, False),
    (Kind.STATE, {"name": "", "topic": ""}, False),
    (Kind.STATE, {"add_nodes": ["ab"] * 256, "remove_users": ["a@ab"] * 300}, False),
    (Kind.STATE, {"set_users": {"9@mie-pref": "member"}, "remove_nodes": ["a-1"]}, False),
    (Kind.STATE_REQUEST, {}, False),
    (Kind.STATE_REQUEST, {"topic": "変更", "add_nodes": ["nabari"]}, False),
    (Kind.MESSAGE, {"text": "こんにちは"}, False),
    (Kind.MESSAGE, {"text": "👍" * (32 * 1024), "format": "markdown"}, False),
    (Kind.MESSAGE, {"text": "x", "format": "plain", "files": [FILE] * 32}, False),
    (Kind.MESSAGE, {"text": "x", "files": []}, False),
    (
        Kind.MESSAGE,
        {
            "text": "x",
            "files": [
                {**FILE, "size": 0, "name": "n" * 255, "mime": "text/plain"},
                {**FILE, "size": 2**53 - 1, "name": "令和6年度 予算.xlsx"},
                {
                    **FILE,
                    "mime": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
                },
            ],
        },
        False,
    ),
    (Kind.MESSAGE, {"text": "x", "announcement": True}, False),
    (Kind.EDIT, {"target": TARGET, "text": "訂正"}, False),
    (Kind.REDACT, {"target": TARGET}, False),
    (Kind.REDACT, {"target": TARGET, "reason": ""}, False),
    (Kind.REDACT, {"target": TARGET, "reason": "誤" * 500}, False),
    (Kind.REACTION, {"target": TARGET, "emoji": "👍"}, False),
    (Kind.REACTION, {"target": TARGET, "emoji": "🇯🇵" * 16}, False),
    (Kind.RECEIPT, {"up_to": TARGET}, False),
    # the sender's display name, set by the sender's node
    (Kind.MESSAGE, {"text": "了解です", "name": "鈴木次郎"}, False),
    (Kind.MESSAGE, {"text": "x", "name": "n" * 100}, False),
    (Kind.MESSAGE, {"text": "x", "name": "Taro Suzuki（伊勢市）"}, False),
    (Kind.REACTION, {"target": TARGET, "emoji": "👍", "name": "鈴木　次郎"}, False),
    (Kind.RECEIPT, {"up_to": TARGET, "name": "鈴木次郎"}, False),
    (Kind.RECEIPT, {"up_to": TARGET, "name": "👍" * 100}, False),
]

INVALID: list[tuple[Kind, dict[str, Any], bool]] = [
    # answers: only a later state change names the requests it grants
    (Kind.STATE, {"name": "x", "answers": [bytes(32)]}, True),
    (Kind.STATE_REQUEST, {"add_nodes": ["ise"], "answers": [bytes(32)]}, False),
    (Kind.STATE, {"answers": [bytes(31)]}, False),
    (Kind.STATE, {"answers": [bytes(32)] * 65}, False),
    # state: creation
    (Kind.STATE, {}, True),
    (Kind.STATE, {"name": ""}, True),
    (Kind.STATE, {"name": "x" * 201}, True),
    (Kind.STATE, {"name": "x", "room_kind": "secret"}, True),
    (Kind.STATE, {"name": 5}, True),
    # state: later change
    (Kind.STATE, {"room_kind": "standard"}, False),
    (Kind.STATE, {"name": None}, False),
    (Kind.STATE, {"topic": None}, False),
    (Kind.STATE, {"topic": "t" * 2001}, False),
    (Kind.STATE, {"colour": "red"}, False),
    (Kind.STATE, {"add_nodes": "tsu"}, False),
    (Kind.STATE, {"add_nodes": ["Tsu"]}, False),
    (Kind.STATE, {"add_nodes": ["t"]}, False),
    (Kind.STATE, {"add_nodes": ["mie--pref"]}, False),
    (Kind.STATE, {"add_nodes": ["tsu-"]}, False),
    (Kind.STATE, {"add_nodes": ["1tsu"]}, False),
    (Kind.STATE, {"add_nodes": ["a" * 33]}, False),
    (Kind.STATE, {"add_nodes": ["ab"] * 257}, False),
    (Kind.STATE, {"remove_nodes": [None]}, False),
    (Kind.STATE, {"set_users": ["suzuki@tsu"]}, False),
    (Kind.STATE, {"set_users": {"suzuki@tsu": "owner"}}, False),
    (Kind.STATE, {"set_users": {"suzuki@tsu": None}}, False),
    (Kind.STATE, {"set_users": {"Suzuki@tsu": "member"}}, False),
    (Kind.STATE, {"set_users": {"suzuki": "member"}}, False),
    (Kind.STATE, {"set_users": {"suzuki@mie--pref": "member"}}, False),
    (Kind.STATE, {"set_users": {"-x@tsu": "member"}}, False),
    (Kind.STATE, {"set_users": {"x" * 65 + "@tsu": "member"}}, False),
    (Kind.STATE, {"remove_users": "suzuki@tsu"}, False),
    (Kind.STATE, {"remove_users": ["a@b@tsu"]}, False),
    (Kind.STATE, {"remove_users": [7]}, False),
    # state-request
    (Kind.STATE_REQUEST, {"room_kind": "announcement"}, False),
    (Kind.STATE_REQUEST, {"name": "x" * 201}, False),
    (Kind.STATE_REQUEST, {"extra": True}, False),
    # message
    (Kind.MESSAGE, {}, False),
    (Kind.MESSAGE, {"text": ""}, False),
    (Kind.MESSAGE, {"text": None}, False),
    (Kind.MESSAGE, {"text": "x" * (32 * 1024 + 1)}, False),
    (Kind.MESSAGE, {"text": ["x"]}, False),
    (Kind.MESSAGE, {"text": "x", "format": "html"}, False),
    (Kind.MESSAGE, {"text": "x", "format": None}, False),
    (Kind.MESSAGE, {"text": "x", "files": {}}, False),
    (Kind.MESSAGE, {"text": "x", "files": [{}] * 33}, False),
    (Kind.MESSAGE, {"text": "x", "files": [FILE] * 33}, False),
    (Kind.MESSAGE, {"text": "x", "files": [{"id": TARGET}]}, False),
    (Kind.MESSAGE, {"text": "x", "files": [{**FILE, "sha256": TARGET[:31]}]}, False),
    (Kind.MESSAGE, {"text": "x", "files": [{**FILE, "sha256": None}]}, False),
    (Kind.MESSAGE, {"text": "x", "files": [{**FILE, "size": -1}]}, False),
    (Kind.MESSAGE, {"text": "x", "files": [{**FILE, "size": 2**53}]}, False),
    (Kind.MESSAGE, {"text": "x", "files": [{**FILE, "size": True}]}, False),
    (Kind.MESSAGE, {"text": "x", "files": [{**FILE, "size": "5"}]}, False),
    (Kind.MESSAGE, {"text": "x", "files": [{**FILE, "name": ""}]}, False),
    (Kind.MESSAGE, {"text": "x", "files": [{**FILE, "name": "n" * 256}]}, False),
    (Kind.MESSAGE, {"text": "x", "files": [{**FILE, "name": "../etc/passwd"}]}, False),
    (Kind.MESSAGE, {"text": "x", "files": [{**FILE, "name": "C:\\x.pdf"}]}, False),
    (Kind.MESSAGE, {"text": "x", "files": [{**FILE, "name": "a\x00b"}]}, False),
    (Kind.MESSAGE, {"text": "x", "files": [{**FILE, "mime": "Image/JPEG"}]}, False),
    (Kind.MESSAGE, {"text": "x", "files": [{**FILE, "mime": "jpeg"}]}, False),
    (Kind.MESSAGE, {"text": "x", "files": [{**FILE, "mime": "a/" + "b" * 126}]}, False),
    (Kind.MESSAGE, {"text": "x", "files": [{**FILE, "extra": 1}]}, False),
    (Kind.MESSAGE, {"text": "x", "files": [FILE, "not a map"]}, False),
    (Kind.MESSAGE, {"text": "x", "html": "<b>x</b>"}, False),
    # edit
    (Kind.EDIT, {"text": "x"}, False),
    (Kind.EDIT, {"target": TARGET}, False),
    (Kind.EDIT, {"target": TARGET, "text": ""}, False),
    (Kind.EDIT, {"target": TARGET[:31], "text": "x"}, False),
    (Kind.EDIT, {"target": TARGET + b"\x00", "text": "x"}, False),
    (Kind.EDIT, {"target": 5, "text": "x"}, False),
    (Kind.EDIT, {"target": TARGET, "text": "x", "reason": "typo"}, False),
    # redact
    (Kind.REDACT, {}, False),
    (Kind.REDACT, {"reason": "x"}, False),
    (Kind.REDACT, {"target": TARGET, "reason": "x" * 501}, False),
    (Kind.REDACT, {"target": TARGET, "reason": None}, False),
    (Kind.REDACT, {"target": None}, False),
    # reaction
    (Kind.REACTION, {"target": TARGET}, False),
    (Kind.REACTION, {"emoji": "👍"}, False),
    (Kind.REACTION, {"target": TARGET, "emoji": ""}, False),
    (Kind.REACTION, {"target": TARGET, "emoji": "👍" * 33}, False),
    (Kind.REACTION, {"target": TARGET, "emoji": "👍", "count": 2}, False),
    # receipt
    (Kind.RECEIPT, {}, False),
    (Kind.RECEIPT, {"target": TARGET}, False),
    (Kind.RECEIPT, {"up_to": TARGET[:16]}, False),
    (Kind.RECEIPT, {"up_to": TARGET, "at": 5}, False),
    # the sender's display name
    (Kind.MESSAGE, {"text": "x", "name": ""}, False),
    (Kind.MESSAGE, {"text": "x", "name": "n" * 101}, False),
    (Kind.MESSAGE, {"text": "x", "name": None}, False),
    (Kind.MESSAGE, {"text": "x", "name": 5}, False),
    (Kind.MESSAGE, {"text": "x", "name": ["鈴木"]}, False),
    (Kind.MESSAGE, {"text": "x", "name": "鈴木\n"}, False),
    (Kind.MESSAGE, {"text": "x", "name": "鈴木\x00"}, False),
    (Kind.MESSAGE, {"text": "x", "name": "\x85鈴木"}, False),
    (Kind.RECEIPT, {"up_to": TARGET, "name": "木鈴\u202e"}, False),
    (Kind.RECEIPT, {"up_to": TARGET, "name": "鈴\u200b木"}, False),
    (Kind.REACTION, {"target": TARGET, "emoji": "👍", "name": "\ufeff"}, False),
    (Kind.REACTION, {"target": TARGET, "emoji": "👍", "name": "鈴\u2066木"}, False),
    (Kind.EDIT, {"target": TARGET, "text": "x", "name": "鈴木次郎"}, False),  # not on edits
    (Kind.REDACT, {"target": TARGET, "name": "鈴木次郎"}, False),  # nor redactions
]


def _case_id(case: Any) -> str:
    return repr(case)[:48]


@pytest.mark.parametrize(("kind", "body", "creation"), VALID, ids=_case_id)
def test_valid_body_passes_check_body_and_its_schema(
    kind: Kind, body: dict[str, Any], creation: bool
) -> None:
    check_body(kind, body, creation=creation)
    body_schema(kind, creation=creation).validate(as_json(body))


@pytest.mark.parametrize(("kind", "body", "creation"), INVALID, ids=_case_id)
def test_invalid_body_is_refused_by_check_body_and_its_schema(
    kind: Kind, body: dict[str, Any], creation: bool
) -> None:
    with pytest.raises(ProtocolError):
        check_body(kind, body, creation=creation)
    assert not schema_accepts(kind, body, creation)


def test_every_kind_has_valid_and_invalid_cases() -> None:
    assert {kind for kind, _, _ in VALID} == set(Kind)
    assert {kind for kind, _, _ in INVALID} == set(Kind)


def test_state_schema_top_level_accepts_creation_and_change_bodies_alike() -> None:
    top = validator("envelope-bodies/state.schema.json")
    assert top.is_valid({"name": "x", "room_kind": "announcement"})
    assert top.is_valid({"topic": "y"})
    assert not top.is_valid({"topic": "y", "room_kind": "announcement"})  # creation needs name


# --- bodies: agreement on random bodies ------------------------------------------------------

_NODE_CANDIDATES = ["tsu", "mie-pref", "ab", "a-1", "t", "Tsu", "mie--pref", "tsu-", "9a", ""]
_USER_CANDIDATES = ["suzuki@tsu", "a@ab", "k.ito_2-b@ise", "Suzuki@tsu", "x@mie--pref", "x@t"]
_USER_CANDIDATES += ["noat", "@tsu", "-x@tsu", "a@b@tsu", "x" * 64 + "@tsu", "x" * 65 + "@tsu"]
_ROLES = ["admin", "member", "owner", ""]
_TEXT_LIMITS = {"text": 32 * 1024, "name": 200, "topic": 2000, "reason": 500, "emoji": 32}
_FIELDS = [
    *_TEXT_LIMITS,
    "format",
    "files",
    "announcement",
    "target",
    "up_to",
    "room_kind",
    "add_nodes",
    "remove_nodes",
    "set_users",
    "remove_users",
    "extra",
]
_others = st.one_of(st.none(), st.booleans(), st.integers(-1, 3), st.just([]), st.just({}))


def _text(limit: int) -> st.SearchStrategy[str]:
    return st.builds(
        lambda ch, n: ch * n,
        st.sampled_from(["a", "あ", "👍"]),
        st.sampled_from([0, 1, 2, limit - 1, limit, limit + 1]),
    )


def _value(name: str) -> st.SearchStrategy[Any]:
    """Values for a field: mostly near its rules (and their edges), sometimes of a wrong type.
    Never bytes where text belongs nor text where bytes belong (the JSON view's blind spot)."""
    if name == "name":  # a room's name (state, 200) or a sender's (100, no hidden characters)
        hidden = ["鈴木\n", "a\x00b", "\x9f", "木鈴\u202e", "\u2060", "全角　空白", "Suzuki"]
        return st.one_of(_text(200), _text(MAX_SENDER_NAME), st.sampled_from(hidden), _others)
    if name in _TEXT_LIMITS:
        return st.one_of(_text(_TEXT_LIMITS[name]), _others)
    if name in ("target", "up_to"):
        return st.one_of(st.binary(min_size=31, max_size=33), _others)
    if name == "format":
        return st.one_of(st.sampled_from(["plain", "markdown", "html"]), _others)
    if name == "room_kind":
        return st.one_of(st.sampled_from(["standard", "announcement", "secret"]), _others)
    if name in ("add_nodes", "remove_nodes"):
        return st.one_of(
            st.lists(st.sampled_from(_NODE_CANDIDATES), max_size=3),
            st.builds(lambda n: ["ab"] * n, st.sampled_from([256, 257])),
            _others,
        )
    if name == "remove_users":
        return st.one_of(st.lists(st.sampled_from(_USER_CANDIDATES), max_size=3), _others)
    if name == "set_users":
        return st.one_of(
            st.dictionaries(
                st.sampled_from(_USER_CANDIDATES),
                st.one_of(st.sampled_from(_ROLES), st.none()),
                max_size=3,
            ),
            _others,
        )
    if name == "files":
        return st.one_of(
            st.builds(lambda n: [{}] * n, st.sampled_from([0, 1, 32, 33])),
            st.builds(lambda n: [FILE] * n, st.sampled_from([1, 32, 33])),
            st.lists(_file_refs(), max_size=3),
            _others,
        )
    return st.one_of(st.text(max_size=3), _others)  # announcement, extra: anything


def _file_refs() -> st.SearchStrategy[dict[str, Any]]:
    """File references near the rules: every field valid, wrong, missing or joined by another.
    sha256 is always bytes or a non-text value, name and mime never bytes (the JSON blind spot).
    """
    fields: dict[str, st.SearchStrategy[Any]] = {
        "sha256": st.one_of(st.binary(min_size=31, max_size=33), _others),
        "size": st.one_of(st.sampled_from([0, 1, 2**53 - 1, 2**53, -1]), _others),
        "name": st.one_of(
            st.sampled_from(["a.pdf", "報告書.xlsx", "", "n" * 255, "n" * 256, "a/b", "a\\b"]),
            st.sampled_from(["tab\there", "del\x7f", "写真 (1).jpg"]),
            _others,
        ),
        "mime": st.one_of(
            st.sampled_from(["image/png", "text/csv", "Image/png", "png", "a/" + "b" * 125]),
            st.sampled_from(["a/" + "b" * 126, "application/vnd.ms-excel", "/x", "x/"]),
            _others,
        ),
        "extra": st.just(1),
    }
    return st.sets(st.sampled_from(sorted(fields)), min_size=3, max_size=5).flatmap(
        lambda names: st.fixed_dictionaries({name: fields[name] for name in sorted(names)})
    )


_VALUES = {name: _value(name) for name in _FIELDS}


@st.composite
def _bodies(draw: st.DrawFn) -> tuple[Kind, dict[str, Any], bool]:
    kind = draw(st.sampled_from(list(Kind)))
    creation = kind is Kind.STATE and draw(st.booleans())
    names = draw(st.sets(st.sampled_from(_FIELDS), max_size=4))
    return kind, {name: draw(_VALUES[name]) for name in sorted(names)}, creation


@settings(max_examples=250, deadline=None, database=None)
@given(case=_bodies())
def test_check_body_and_the_schema_agree_on_random_bodies(
    case: tuple[Kind, dict[str, Any], bool],
) -> None:
    kind, body, creation = case
    assert code_accepts(kind, body, creation) == schema_accepts(kind, body, creation)


# --- real envelopes --------------------------------------------------------------------------


def _contents() -> list[Content]:
    """One envelope of every kind, home seq 1 to 8, with valid dependencies."""
    bodies: list[tuple[Kind, dict[str, Any]]] = [
        (Kind.STATE, {"name": "防災連絡室", "add_nodes": ["tsu"], "room_kind": "standard"}),
        (Kind.STATE, {"topic": "台風", "set_users": {"tanaka@mie-pref": "admin"}}),
        (Kind.STATE_REQUEST, {"add_nodes": ["ise"]}),
        (Kind.MESSAGE, {"text": "避難所を開設しました", "format": "plain"}),
        (Kind.EDIT, {"target": TARGET, "text": "避難所を開設しました。"}),
        (Kind.REDACT, {"target": TARGET, "reason": "重複"}),
        (Kind.REACTION, {"target": TARGET, "emoji": "👍"}),
        (Kind.RECEIPT, {"up_to": TARGET}),
    ]
    return [
        Content(
            room=ROOM,
            origin=HOME,
            seq=seq,
            kind=kind,
            sender="" if kind is Kind.STATE else "tanaka@mie-pref",
            hlc=(1_714_521_600_000 << 16) + seq,
            deps={HOME: seq - 1, "tsu": 4} if seq > 1 else {},
            key_id=KEY.key_id,
            body=body,
        )
        for seq, (kind, body) in enumerate(bodies, start=1)
    ]


@pytest.fixture(scope="module")
def sealed() -> list[Envelope]:
    return seal_batch(_contents(), KEY)


def test_sealed_envelopes_match_the_envelope_schema(sealed: list[Envelope]) -> None:
    wire_schema = validator("envelope.schema.json")
    for env in sealed:
        document = as_json(codec.decode_map(env.to_bytes(), ENVELOPE_LIMITS))
        wire_schema.validate(document)
        assert document["c"] == env.content_bytes.hex()


def test_sealed_contents_match_the_content_schema_and_their_body_schemas(
    sealed: list[Envelope],
) -> None:
    content_schema = validator("envelope-content.schema.json")
    assert {env.content.kind for env in sealed} == set(Kind)
    for env in sealed:
        document = as_json(codec.decode_map(env.content_bytes, ENVELOPE_LIMITS))
        content_schema.validate(document)
        creation = env.content.kind is Kind.STATE and env.content.seq == 1
        body_schema(env.content.kind, creation=creation).validate(document["body"])


def _content_document(sealed: list[Envelope], index: int, **changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = as_json(codec.decode_map(sealed[index].content_bytes))
    document.update(changes)
    return document


@pytest.mark.parametrize(
    ("index", "changes"),
    [
        (0, {"kind": "teleport"}),
        (0, {"v": 2}),
        (0, {"seq": 0}),
        (0, {"body": {"topic": "no name"}}),  # creation without a name
        (1, {"body": {"name": "x", "room_kind": "announcement"}}),  # kind fixed at creation
        (2, {"body": {"room_kind": "announcement"}}),
        (3, {"body": {"target": TARGET.hex(), "text": "x"}}),  # an edit's body on a message
        (3, {"body": []}),
        (3, {"sender": "Tanaka@mie-pref"}),
        (3, {"room": "kaigi:mie-pref"}),
        (3, {"room": "!kaigi:mie--pref"}),
        (3, {"origin": "Mie"}),
        (3, {"deps": {"mie-pref": 0}}),
        (3, {"deps": {"Mie": 1}}),
        (3, {"hlc": -1}),
        (3, {"hlc": 2**64}),
        (3, {"kid": "KEY"}),
        (3, {"extra": 1}),
    ],
)
def test_content_schema_refuses_what_the_code_refuses(
    sealed: list[Envelope], index: int, changes: dict[str, Any]
) -> None:
    document = _content_document(sealed, index, **changes)
    assert not validator("envelope-content.schema.json").is_valid(document)


def test_content_schema_accepts_an_unmodified_document(sealed: list[Envelope]) -> None:
    # The control for the refusals above: the same construction without a change is valid.
    for index in range(len(sealed)):
        assert validator("envelope-content.schema.json").is_valid(_content_document(sealed, index))


@pytest.mark.parametrize(
    "changes",
    [
        {"sig": "00" * 63},
        {"p": ["00" * 31]},
        {"p": ["00" * 32] * 41},
        {"i": -1},
        {"n": 0},
        {"c": "0"},
        {"c": "ABCD"},
        {"x": 1},
    ],
    ids=repr,
)
def test_envelope_schema_refuses_a_malformed_wire_map(
    sealed: list[Envelope], changes: dict[str, Any]
) -> None:
    document = as_json(codec.decode_map(sealed[1].to_bytes(), ENVELOPE_LIMITS))
    assert validator("envelope.schema.json").is_valid(document)
    document.update(changes)
    assert not validator("envelope.schema.json").is_valid(document)
