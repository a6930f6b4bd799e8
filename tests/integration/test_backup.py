"""A town's disk dies; IT restores last night's backup; peers fill in everything newer.

Real nodes on 127.0.0.1 with mutual TLS; `kakehashi backup` and `kakehashi restore` run
as subprocesses, as an operator runs them (backup while the node runs). The restored
node must end with exactly the authority's timelines, its own envelopes made after the
backup included, and must not send anything before it has them back: a new envelope
reusing one of their sequence numbers would be dropped by every peer as a duplicate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import stat
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from federation.envelope import Envelope, Kind
from federation.errors import ProtocolError
from gateway.backup import RESTORED_AT
from gateway.config import Home, load_config, write_config
from gateway.node import Node

from .conftest import Cluster, eventually

pytestmark = pytest.mark.integration

KAKEHASHI = str(Path(sys.executable).parent / "kakehashi")
PASSPHRASE = "夜間バックアップ 2025"


async def cli(*args: str | Path, passphrase: str | None = None) -> tuple[int, str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("KAKEHASHI_HOME", "KAKEHASHI_BACKUP_PASSPHRASE")
    }
    if passphrase is not None:
        env["KAKEHASHI_BACKUP_PASSPHRASE"] = passphrase
    process = await asyncio.create_subprocess_exec(
        KAKEHASHI,
        *map(str, args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def timeline(node: Node, room: str) -> list[Envelope]:
    rows = await node.rooms.store.history(room, 10**6)
    return [Envelope.from_bytes(wire) for _, wire in reversed(rows)]


def texts(envelopes: list[Envelope]) -> list[str]:
    return [e.content.body["text"] for e in envelopes if e.content.kind is Kind.MESSAGE]


def holds(node: Node, room: str, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        counts = await node.rooms.store.counts()
        return counts.get(room, (0, 0))[0] >= count

    return check


async def send_when_caught_up(node: Node, room: str, text: str) -> tuple[bytes, int]:
    """Send as soon as the node allows it: (envelope id, refusals met before)."""
    held = 0
    deadline = time.monotonic() + 60
    while True:
        try:
            (envelope_id,) = await node.rooms.send(room, [text])
            return envelope_id, held
        except ProtocolError as exc:
            assert exc.code == "catching_up" and exc.status == 503, exc.code
            held += 1
            assert time.monotonic() < deadline, "local sends stayed held"
            await asyncio.sleep(0.05)


def set_restore_timeout(home: Home, seconds: float) -> None:
    write_config(home, dataclasses.replace(load_config(home), restore_timeout=seconds))


async def outbox_empty(node: Node) -> bool:
    return not await node.rooms.store.outbox_depths()


async def pair_with_a_room(cluster: Cluster) -> tuple[Node, Node, str]:
    mie = await cluster.authority()
    tsu = await cluster.member("tsu", "津市", "242012")
    await eventually(lambda: mie.roster.version == tsu.roster.version == 2)
    room = await mie.rooms.create("防災連絡", nodes=["tsu"])
    await eventually(lambda: tsu.rooms.state(room) is not None)
    await mie.rooms.send(room, ["mie before 1", "mie before 2"])
    await tsu.rooms.send(room, ["tsu before 1", "tsu before 2"])
    for node in (mie, tsu):
        await eventually(holds(node, room, 5), timeout=30)
    return mie, tsu, room


async def test_restored_node_catches_up_to_the_same_timelines_and_never_reuses_a_seq(
    cluster: Cluster, tmp_path: Path
) -> None:
    mie, tsu, room = await pair_with_a_room(cluster)
    home = tsu.home
    secret = tmp_path / "passphrase.txt"
    secret.write_text(PASSPHRASE + "\n")
    file = tmp_path / "tsu-nightly.kkb"

    async def keep_talking() -> None:
        for k in range(5):
            await mie.rooms.send(room, [f"mie during {k}"])
            await tsu.rooms.send(room, [f"tsu during {k}"])
            await asyncio.sleep(0.05)

    # Last night's backup, taken while tsu runs and both keep talking.
    (code, out, err), _ = await asyncio.gather(
        cli("backup", file, "--home", home.root, "--passphrase-file", secret, "--json"),
        keep_talking(),
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["node_id"] == "tsu" and summary["database_pages"] > 0
    assert summary["bytes"] == file.stat().st_size
    assert stat.S_IMODE(file.stat().st_mode) == 0o600

    # The day goes on: tsu and mie talk, tsu opens a room, mie opens another with tsu.
    await tsu.rooms.send(room, [f"tsu after {k}" for k in range(3)])
    await mie.rooms.send(room, ["mie after"])
    tsu_room = await tsu.rooms.create("津市 新規", nodes=["mie-pref"])
    await tsu.rooms.send(tsu_room, ["tsu in its own room"])
    mie_room = await mie.rooms.create("県 新規", nodes=["tsu"])
    await mie.rooms.send(mie_room, ["mie in its new room"])
    await eventually(holds(tsu, mie_room, 2), timeout=30)
    await tsu.rooms.send(mie_room, ["tsu answers in mie's room"])
    await eventually(lambda: outbox_empty(tsu), timeout=30)
    for at_room, count in ((room, 5 + 10 + 4), (tsu_room, 2), (mie_room, 3)):
        await eventually(holds(mie, at_room, count), timeout=30)
    last_seq = tsu.rooms.vector(room)["tsu"]

    # The disk dies; mie carries on meanwhile.
    await cluster.stop("tsu")
    shutil.rmtree(home.root)
    await mie.rooms.send(room, ["mie while tsu is down"])

    code, out, err = await cli(
        "restore", file, "--home", home.root, "--passphrase-file", secret, "--json"
    )
    assert code == 0, err
    restored = json.loads(out)
    assert restored["node_id"] == "tsu" and restored["created"] == summary["created"]
    assert restored["moved_aside"] is None
    for key in home.keys.iterdir():
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE(home.database.stat().st_mode) == 0o600

    tsu = await cluster.start("tsu")
    assert tsu.rooms.catching_up
    envelope_id, held = await send_when_caught_up(tsu, room, "tsu first after restore")
    assert held >= 1  # sent at once, it was held until the catch-up pass had run
    sent = next(e for e in await timeline(tsu, room) if e.id == envelope_id)
    assert sent.content.seq == last_seq + 1  # the next number, not one used before the crash

    # The authority takes it (an equivocating envelope would be dropped as a duplicate).
    await eventually(holds(mie, room, 5 + 10 + 4 + 2), timeout=30)
    assert envelope_id in [e.id for e in await timeline(mie, room)]
    for at_room in (room, tsu_room, mie_room):
        reference = await timeline(mie, at_room)
        await eventually(
            lambda at_room=at_room, reference=reference: _same(tsu, at_room, reference),
            timeout=30,
        )
    at_tsu = await timeline(tsu, room)
    assert len(texts(at_tsu)) == len(set(texts(at_tsu)))  # every message once
    assert {f"tsu after {k}" for k in range(3)} <= set(texts(at_tsu))
    assert "tsu first after restore" in texts(at_tsu)
    assert "mie while tsu is down" in texts(at_tsu)
    assert texts(await timeline(tsu, tsu_room)) == ["tsu in its own room"]
    assert texts(await timeline(tsu, mie_room)) == [
        "mie in its new room",
        "tsu answers in mie's room",
    ]
    pairs = [(e.content.origin, e.content.seq) for e in await timeline(mie, room)]
    assert len(pairs) == len(set(pairs))

    # Its certificate and the roster still work: the authority sees it up; the flag is gone.
    def tsu_up() -> bool:
        view = next(v for v in mie.peer_views() if v["node_id"] == "tsu")
        return bool(view["health"] == "up")

    await eventually(tsu_up, timeout=30)
    assert await tsu.store.get_meta(RESTORED_AT) is None
    assert (await tsu.status())["catching_up"] is False


async def _same(node: Node, room: str, reference: list[Envelope]) -> bool:
    return [e.id for e in await timeline(node, room)] == [e.id for e in reference]


async def test_restored_home_node_does_not_grant_a_state_request_a_second_time(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The backup holds a request to tsu's room but not tsu's answer, made later. On start
    the restored tsu finds the request unanswered; the answer comes back in the catch-up,
    so it must not grant it again (a second grant could undo later changes)."""
    mie, tsu, _ = await pair_with_a_room(cluster)
    home = tsu.home
    room = await tsu.rooms.create("津市 広報", nodes=["mie-pref"])
    await eventually(lambda: mie.rooms.state(room) is not None, timeout=30)
    tsu.rooms.hold_local()  # tsu takes the request in but cannot answer it yet
    assert await mie.rooms.change(room, {"name": "津市 広報課"}) == "requested"
    await eventually(holds(tsu, room, 2), timeout=30)
    file = tmp_path / "tsu.kkb"
    code, _, err = await cli("backup", file, "--home", home.root, passphrase=PASSPHRASE)
    assert code == 0, err
    tsu.rooms.release_local()
    await eventually(
        lambda: getattr(mie.rooms.state(room), "name", "") == "津市 広報課", timeout=30
    )
    await cluster.stop("tsu")
    shutil.rmtree(home.root)
    code, _, err = await cli("restore", file, "--home", home.root, passphrase=PASSPHRASE)
    assert code == 0, err

    tsu = await cluster.start("tsu")
    await send_when_caught_up(tsu, room, "after the restore")
    # Had tsu answered again, that answer (queued when sends reopened) would come first.
    await eventually(lambda: _has_text(mie, room, "after the restore"), timeout=30)
    answers = [e for e in await timeline(mie, room) if e.content.body.get("answers")]
    assert len(answers) == 1
    assert [e.id for e in await timeline(tsu, room)] == [e.id for e in await timeline(mie, room)]


async def _has_text(node: Node, room: str, text: str) -> bool:
    return text in texts(await timeline(node, room))


async def test_restored_node_holds_local_sends_until_a_peer_has_answered(
    cluster: Cluster, tmp_path: Path
) -> None:
    mie, tsu, room = await pair_with_a_room(cluster)
    home = tsu.home
    file = tmp_path / "tsu.kkb"
    code, _, err = await cli("backup", file, "--home", home.root, passphrase=PASSPHRASE)
    assert code == 0, err
    await tsu.rooms.send(room, ["tsu after the backup"])
    await eventually(holds(mie, room, 6), timeout=30)
    last_seq = tsu.rooms.vector(room)["tsu"]
    await cluster.stop("tsu")
    await cluster.stop("mie-pref")  # no peer answers while tsu comes back
    shutil.rmtree(home.root)
    code, _, err = await cli("restore", file, "--home", home.root, passphrase=PASSPHRASE)
    assert code == 0, err
    set_restore_timeout(home, 600)

    tsu = await cluster.start("tsu")
    with pytest.raises(ProtocolError) as held:
        await tsu.rooms.send(room, ["too early"])
    assert held.value.code == "catching_up" and held.value.status == 503
    code, _, err = await cli("room", "send", "--home", home.root, room, "too early")
    assert code == 1 and "catching_up" in err and "Traceback" not in err
    code, out, _ = await cli("status", "--home", home.root, "--json")
    assert code == 0 and json.loads(out)["catching_up"] is True
    code, out, _ = await cli("status", "--home", home.root)
    assert code == 0 and "catching up" in out
    await asyncio.sleep(2)  # peers unreachable: still held (the timeout is 10 minutes)
    assert tsu.rooms.catching_up
    assert await tsu.store.get_meta(RESTORED_AT) is not None

    mie = await cluster.start("mie-pref")
    envelope_id, _ = await send_when_caught_up(tsu, room, "tsu once mie is back")
    sent = next(e for e in await timeline(tsu, room) if e.id == envelope_id)
    assert sent.content.seq == last_seq + 1
    await eventually(holds(mie, room, 7), timeout=30)
    assert "tsu after the backup" in texts(await timeline(tsu, room))
    assert await tsu.store.get_meta(RESTORED_AT) is None


async def test_isolated_restored_node_sends_after_the_restore_timeout(
    cluster: Cluster, tmp_path: Path
) -> None:
    """No peer answers at all: after `restore_catch_up_timeout_seconds` the node works
    anyway (with a warning in its log), and does not wait again on its next start."""
    _, tsu, room = await pair_with_a_room(cluster)
    home = tsu.home
    file = tmp_path / "tsu.kkb"
    code, _, err = await cli("backup", file, "--home", home.root, passphrase=PASSPHRASE)
    assert code == 0, err
    await cluster.stop("tsu")
    await cluster.stop("mie-pref")
    shutil.rmtree(home.root)
    code, _, err = await cli("restore", file, "--home", home.root, passphrase=PASSPHRASE)
    assert code == 0, err
    set_restore_timeout(home, 1.0)

    tsu = await cluster.start("tsu")
    assert tsu.rooms.catching_up
    await send_when_caught_up(tsu, room, "alone but working")
    assert await tsu.store.get_meta(RESTORED_AT) is None
    await cluster.stop("tsu")
    tsu = await cluster.start("tsu")
    assert not tsu.rooms.catching_up


async def test_restore_refuses_a_running_nodes_home_and_a_non_empty_home_without_force(
    cluster: Cluster, tmp_path: Path
) -> None:
    mie = await cluster.authority()
    home = mie.home
    (tmp_path / "backups").mkdir()
    file = tmp_path / "backups" / "mie.kkb"
    code, _, err = await cli("backup", file, "--home", home.root, passphrase=PASSPHRASE)
    assert code == 0, err
    config = home.config.read_bytes()

    code, _, err = await cli("restore", file, "--home", home.root, "--force", passphrase=PASSPHRASE)
    assert code == 1 and "already_running" in err and "Traceback" not in err
    await cluster.stop("mie-pref")

    code, _, err = await cli("restore", file, "--home", home.root, passphrase=PASSPHRASE)
    assert code == 1 and "home_not_empty" in err and "--force" in err
    code, _, err = await cli(
        "restore", file, "--home", home.root, "--force", passphrase="not the passphrase"
    )
    assert code == 1 and "bad_passphrase" in err and "Traceback" not in err
    assert home.config.read_bytes() == config
    assert sorted(p.name for p in home.root.parent.iterdir()) == ["backups", "mie-pref"]

    code, out, err = await cli(
        "restore", file, "--home", home.root, "--force", "--json", passphrase=PASSPHRASE
    )
    assert code == 0, err
    aside = Path(json.loads(out)["moved_aside"])
    assert aside.name.startswith("mie-pref.before-restore-") and (aside / "node.db").is_file()
    mie = await cluster.start("mie-pref")  # a federation of one: nothing to catch up
    await eventually(lambda: not mie.rooms.catching_up, timeout=30)
