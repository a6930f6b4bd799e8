"""Names of things in a federation: node ids, local government codes, key ids.

- A node id is a short lowercase label an operator can type and read aloud:
  2-32 characters, `a-z`, `0-9` and `-`, starting with a letter, not ending with
  `-` (`mie-pref`, `tsu`, `yokkaichi`).
- A local government code (全国地方公共団体コード, JIS X 0402 plus check digit) is
  6 digits; the last is a check digit over the first five (weights 6..2, mod 11),
  so a mistyped code is caught at `init` rather than shown wrong for years.
- A key id is the first 16 hex characters of SHA-256 of the raw public key.
- A federation id is a node-id-like label with a random suffix, made by the
  authority at creation.
"""

from __future__ import annotations

import hashlib
import re

from .errors import ProtocolError

__all__ = [
    "CHECKED_NODE_IDS",
    "check_federation_id",
    "check_municipality_code",
    "check_node_id",
    "check_segment_name",
    "key_id",
    "municipality_check_digit",
]

_NODE_ID = re.compile(r"^[a-z][a-z0-9-]{0,30}[a-z0-9]\Z")
_FEDERATION_ID = re.compile(r"^[a-z][a-z0-9-]{1,62}[a-z0-9]\Z")
_SEGMENT = re.compile(r"^[a-z][a-z0-9-]{0,30}\Z")
_CODE = re.compile(r"^[0-9]{6}\Z")


CHECKED_NODE_IDS: set[str] = set()
"""Node ids `check_node_id` has accepted (bounded): a hot path may test membership
instead of calling it. Read only."""
_VALID_CACHE_LIMIT = 4096


def check_node_id(node_id: object) -> str:
    """Return `node_id` if it is a valid node id, else raise `ProtocolError` saying why."""
    if type(node_id) is str and node_id in CHECKED_NODE_IDS:
        return node_id  # every envelope names several node ids; good ones are remembered
    if not isinstance(node_id, str) or not _NODE_ID.match(node_id) or "--" in node_id:
        raise ProtocolError(
            f"invalid node id {node_id!r}: use 2-32 characters a-z, 0-9 and '-', "
            "starting with a letter (for example 'tsu' or 'mie-pref')",
            code="bad_node_id",
        )
    if len(CHECKED_NODE_IDS) < _VALID_CACHE_LIMIT:
        CHECKED_NODE_IDS.add(node_id)
    return node_id


def check_federation_id(federation_id: object) -> str:
    """Return `federation_id` if it is well formed."""
    if not isinstance(federation_id, str) or not _FEDERATION_ID.match(federation_id):
        raise ProtocolError(f"invalid federation id {federation_id!r}", code="bad_federation_id")
    return federation_id


def check_segment_name(segment: object) -> str:
    """Return `segment` (a network segment name such as 'lgwan' or 'internet') if well formed."""
    if not isinstance(segment, str) or not _SEGMENT.match(segment):
        raise ProtocolError(
            f"invalid segment name {segment!r}: use lowercase letters, digits and '-'",
            code="bad_segment",
        )
    return segment


def municipality_check_digit(first_five: str) -> int:
    """The JIS X 0402 check digit for the first five digits of a local government code."""
    total = sum(
        int(digit) * weight for digit, weight in zip(first_five, (6, 5, 4, 3, 2), strict=True)
    )
    # 11 - remainder may be 10 or 11; the check digit is its ones digit.
    return (11 - total % 11) % 10


def check_municipality_code(code: object) -> str:
    """Return `code` if it is a 6-digit local government code with a correct check digit."""
    if not isinstance(code, str) or not _CODE.match(code):
        raise ProtocolError(
            f"invalid local government code {code!r}: expected 6 digits, e.g. 242012 for Tsu",
            code="bad_municipality_code",
        )
    if municipality_check_digit(code[:5]) != int(code[5]):
        raise ProtocolError(
            f"local government code {code} has a wrong check digit "
            f"(expected {code[:5]}{municipality_check_digit(code[:5])})",
            code="bad_municipality_code",
        )
    return code


def key_id(raw_public_key: bytes) -> str:
    """Key id: the first 16 hex characters of SHA-256 of the raw public key."""
    return hashlib.sha256(raw_public_key).hexdigest()[:16]
