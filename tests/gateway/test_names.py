"""Display names of other nodes' users (gateway.names) and how the directory shows people.

Envelopes here are sealed with a real key and kept in a real SQLite store; nothing runs
over the network (tests/integration/test_api.py covers names crossing between nodes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from federation.envelope import Content, Envelope, Kind, seal_batch
from federation.signing import SigningKey
from gateway.accounts import Principal, UserView
from gateway.names import RemoteNames, latest_names
from gateway.staff import StaffRole
from gateway.store import Store
from gateway.views import Directory

ROOM = "!bosai2024:tsu"
KEY = SigningKey(Ed25519PrivateKey.from_private_bytes(bytes([7]) * 32))
TARGET = bytes(range(32))


def envelope(
    origin: str,
    sender: str,
    hlc: int,
    kind: Kind = Kind.RECEIPT,
    name: str | None = "鈴木次郎",
) -> Envelope:
    body: dict[str, Any] = {"up_to": TARGET} if kind is Kind.RECEIPT else {"text": "了解"}
    if name is not None:
        body["name"] = name
    content = Content(
        room=ROOM,
        origin=origin,
        seq=1,
        kind=kind,
        sender=sender,
        hlc=hlc,
        deps={} if origin == "tsu" else {"tsu": 1},
        key_id=KEY.key_id,
        body=body,
    )
    (sealed,) = seal_batch([content], KEY)
    return sealed


# --------------------------------------------------------------------------- latest_names


def test_the_name_of_the_latest_envelope_wins_in_any_order() -> None:
    old = envelope("ise", "suzuki@ise", 100, name="鈴木")
    new = envelope("ise", "suzuki@ise", 200, Kind.MESSAGE, name="鈴木次郎")
    for batch in ([old, new], [new, old]):
        assert latest_names(batch, "tsu") == {"suzuki@ise": (200, "鈴木次郎")}


def test_no_name_is_taken_for_a_user_of_another_node_than_the_origin() -> None:
    # ise naming a user of nabari (the room rules refuse such an envelope before this).
    spoof = envelope("ise", "yamada@nabari", 300, name="偽名")
    assert latest_names([spoof], "tsu") == {}


def test_no_name_is_taken_for_this_nodes_own_users_nor_from_envelopes_without_one() -> None:
    own = envelope("tsu", "tanaka@tsu", 100, name="田中")
    unnamed = envelope("ise", "suzuki@ise", 200, name=None)
    node_itself = envelope("ise", "", 300, Kind.MESSAGE, name="伊勢市")
    assert latest_names([own, unnamed, node_itself], "tsu") == {}


# --------------------------------------------------------------------------- sending


def principal(display_name: str) -> Principal:
    return Principal(
        user_id="suzuki@ise",
        login="suzuki",
        role=StaffRole.STAFF,
        display_name=display_name,
        department="",
        session_id="s",
        token_id="t",
        expires_at=0,
    )


def test_a_users_envelopes_carry_their_display_name_when_the_protocol_takes_it() -> None:
    assert principal("鈴木次郎").sender_name == "鈴木次郎"
    # Stored under rules older than the protocol's (too long, a hidden character): the
    # envelopes go without a name rather than be refused.
    assert principal("名" * 101).sender_name is None
    assert principal("鈴木\u200b次郎").sender_name is None


# --------------------------------------------------------------------------- RemoteNames


async def test_names_are_kept_in_the_accepting_transaction_and_read_back_at_start(
    tmp_path: Path,
) -> None:
    path = tmp_path / "node.db"
    async with Store(path) as store:
        names = RemoteNames(store=store, node_id="tsu")
        await names.load()
        steps = [
            [envelope("ise", "suzuki@ise", 200, name="鈴木次郎")],
            [envelope("ise", "suzuki@ise", 100, name="鈴木(旧姓)")],  # older, arrives later
            [envelope("ise", "ito@ise", 150, Kind.MESSAGE, name="伊藤三郎")],
            [envelope("ise", "yamada@nabari", 400, name="偽名")],
        ]
        for step in steps:
            await store.write_all(names.write(step))
            names.on_accepted(step)
        assert names.get("suzuki@ise") == "鈴木次郎"
        assert names.get("ito@ise") == "伊藤三郎"
        assert names.get("yamada@nabari") is None
        assert names.get("tanaka@tsu") is None
        # A rename at ise arrives with a newer envelope.
        renamed = [envelope("ise", "suzuki@ise", 500, name="鈴木二郎")]
        await store.write_all(names.write(renamed))
        names.on_accepted(renamed)
        assert names.get("suzuki@ise") == "鈴木二郎"

    async with Store(path) as store:
        again = RemoteNames(store=store, node_id="tsu")
        await again.load()
        assert again.get("suzuki@ise") == "鈴木二郎"
        assert again.get("ito@ise") == "伊藤三郎"
        assert again.get("yamada@nabari") is None


async def test_names_of_a_rolled_back_step_are_not_kept(tmp_path: Path) -> None:
    async with Store(tmp_path / "node.db") as store:
        names = RemoteNames(store=store, node_id="tsu")
        step = [envelope("ise", "suzuki@ise", 100)]
        try:
            async with store.transaction() as db:
                for sql, rows in names.write(step):
                    await db.executemany(sql, rows)
                raise RuntimeError("the step's other writes failed")
        except RuntimeError:
            pass
        await names.load()
        assert names.get("suzuki@ise") is None


# --------------------------------------------------------------------------- Directory


class Roster:
    def member(self, node_id: str) -> Any:
        towns = {"tsu": "津市", "ise": "伊勢市"}

        class Member:
            name = towns[node_id]

        return Member() if node_id in towns else None


async def local_users() -> list[UserView]:
    return [
        UserView(
            login="tanaka",
            user_id="tanaka@tsu",
            display_name="田中太郎",
            department="防災課",
            role=StaffRole.STAFF,
            disabled=False,
            created_at=0,
            updated_at=0,
            last_login_at=None,
        )
    ]


async def test_directory_names_local_users_from_accounts_others_from_their_nodes() -> None:
    remote = {"suzuki@ise": "鈴木次郎", "tanaka@tsu": "偽の田中"}
    directory = Directory(
        node_id="tsu",
        users=local_users,
        roster=Roster,  # type: ignore[arg-type]
        remote=remote.get,
    )
    await directory.refresh()
    assert directory.name("tanaka@tsu") == "田中太郎"
    assert directory.name("sato@tsu") == "sato@tsu"  # this node's, unknown: never remote
    assert directory.name("suzuki@ise") == "鈴木次郎"
    assert directory.name("ito@ise") == "ito@ise"  # ise has sent no name for ito yet
    assert directory.person("suzuki@ise") == {
        "user": "suzuki@ise",
        "display_name": "鈴木次郎",
        "node": "ise",
        "municipality": "伊勢市",
    }
