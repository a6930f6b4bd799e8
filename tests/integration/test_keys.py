"""Key lifecycle on running nodes: signing key and TLS certificate rotation through the
authority, automatic renewal, federation key rotation seen by a node that was offline,
and delivery held for a suspended node until it is resumed."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from federation import codec
from federation.envelope import Envelope
from federation.roster import MemberStatus
from gateway import tls
from gateway.node import Node
from gateway.transport import FEDERATION_PREFIX, HEADER_NODE, MSGPACK

from .conftest import Cluster, eventually

pytestmark = pytest.mark.integration

KAKEHASHI = str(Path(sys.executable).parent / "kakehashi")


async def three(cluster: Cluster) -> tuple[Node, Node, Node]:
    mie = await cluster.authority()
    tsu = await cluster.member("tsu", "津市", "242012")
    ise = await cluster.member("ise", "伊勢市", "242039")
    await eventually(lambda: {n.roster.version for n in cluster.nodes.values()} == {3})
    return mie, tsu, ise


async def count(node: Node, room: str) -> int:
    return (await node.rooms.store.counts()).get(room, (0, 0))[0]


async def holds(node: Node, room: str, expected: int, timeout: float = 20) -> None:  # noqa: ASYNC109
    async def check() -> bool:
        return await count(node, room) >= expected

    await eventually(check, timeout=timeout)
    assert await count(node, room) == expected


async def cli(*args: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "KAKEHASHI_HOME"}
    process = await asyncio.create_subprocess_exec(
        KAKEHASHI,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, (out + err).decode()


async def test_signing_key_rotation_keeps_old_history_verifiable(cluster: Cluster) -> None:
    mie, tsu, ise = await three(cluster)
    room = await mie.rooms.create("連絡室", nodes=["tsu", "ise"])
    await eventually(lambda: tsu.rooms.state(room) is not None)
    await tsu.rooms.send(room, [f"旧鍵 {i}" for i in range(20)])
    old_key = tsu.rooms.signing_key.key_id
    summary = await tsu.keys.rotate_signing()
    assert summary["previous"] == old_key != summary["key_id"]
    await tsu.rooms.send(room, [f"新鍵 {i}" for i in range(20)])
    await holds(ise, room, 41)
    kids = {
        Envelope.from_bytes(wire).content.key_id
        for _, wire in await ise.rooms.store.history(room, 100)
    }
    assert {old_key, summary["key_id"]} <= kids
    published = ise.roster.member("tsu")
    assert published is not None
    old = published.signing_key(old_key)
    assert old is not None and old.not_after is not None  # closed, with an overlap
    # A node that joins the room now gets the whole history and verifies both keys.
    yokkaichi = await cluster.member("yokkaichi", "四日市市", "242021")
    await mie.rooms.invite(room, "yokkaichi")
    await holds(yokkaichi, room, 42)
    # The rotated key survives a restart.
    await cluster.stop("tsu")
    tsu = await cluster.start("tsu")
    assert tsu.rooms.signing_key.key_id == summary["key_id"]


async def test_tls_rotation_during_a_transfer_loses_nothing(cluster: Cluster) -> None:
    _mie, tsu, ise = await three(cluster)
    room = await tsu.rooms.create("大量送信", nodes=["ise"])
    await eventually(lambda: ise.rooms.state(room) is not None)
    await ise.rooms.send(room, ["切替前"])  # ise's stream to tsu: tsu's old certificate
    await eventually(lambda: ise.streams.is_open("tsu"))
    old_context = tls.client_context(tsu.home.tls_cert, tsu.home.tls_key, tsu.home.ca_cert)
    old_fingerprint = tls.fingerprint(tls.load_certificate_pem(tsu.home.tls_cert.read_bytes()))

    async def transfer() -> None:
        for batch in range(30):
            await tsu.rooms.send(room, [f"{batch}-{i}" for i in range(100)])
            await asyncio.sleep(0.02)

    sending = asyncio.create_task(transfer())
    await asyncio.sleep(0.2)
    summary = await tsu.keys.rotate_tls()
    await sending
    await holds(ise, room, 3002, timeout=60)
    new_fingerprint = bytes.fromhex(summary["fingerprint"])
    assert new_fingerprint != old_fingerprint
    await eventually(lambda: ise.roster.member("tsu").tls_fingerprint == new_fingerprint)  # type: ignore[union-attr]
    assert tls.fingerprint(tls.load_certificate_pem(tsu.home.tls_cert.read_bytes())) == (
        new_fingerprint
    )
    assert (tsu.home.tls_key.stat().st_mode & 0o777) == 0o600

    async def health_with(context: object) -> tuple[int, dict[str, object]]:
        import aiohttp

        target = f"https://127.0.0.1:{ise.federation_port}{FEDERATION_PREFIX}/health"
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
            session.post(
                target,
                data=codec.encode({"node": "tsu"}),
                headers={HEADER_NODE: "tsu", "Content-Type": MSGPACK},
            ) as response,
        ):
            return response.status, codec.decode_map(await response.read())

    status, _ = await health_with(old_context)
    assert status == 200  # the replaced certificate is still accepted during the overlap
    cluster.clocks["ise"].offset = 2 * 86400.0
    status, answer = await health_with(old_context)
    assert (status, answer["error"]) == (403, "certificate_replaced")
    # tsu's batches went on a stream opened after the switch, with the new certificate:
    # past the overlap they still go through, without a refused delivery.
    assert tsu.streams.is_open("ise")
    failures = tsu.outbox.stats("ise").failures  # type: ignore[union-attr]
    await tsu.rooms.send(room, ["切替後"])
    await holds(ise, room, 3003, timeout=30)
    assert tsu.outbox.stats("ise").failures == failures  # type: ignore[union-attr]
    # ise's stream, pinned to tsu's old certificate, was replaced when the roster changed.
    failures = ise.outbox.stats("tsu").failures  # type: ignore[union-attr]
    await ise.rooms.send(room, ["受信側も"])
    await holds(tsu, room, 3004, timeout=30)
    assert ise.outbox.stats("tsu").failures == failures  # type: ignore[union-attr]


async def test_certificate_due_for_renewal_is_renewed_at_start(cluster: Cluster) -> None:
    mie, tsu, ise = await three(cluster)
    before = tls.fingerprint(tls.load_certificate_pem(tsu.home.tls_cert.read_bytes()))
    await cluster.stop("tsu")
    cluster.clocks["tsu"].offset = 340 * 86400.0  # 25 days left on a 365-day certificate
    tsu = await cluster.start("tsu")

    def renewed() -> bool:
        entry = mie.roster.member("tsu")
        return entry is not None and entry.tls_fingerprint != before

    await eventually(renewed, timeout=15)
    entry = mie.roster.member("tsu")
    assert entry is not None

    def installed() -> bool:
        held = tls.load_certificate_pem(tsu.home.tls_cert.read_bytes())
        return tls.fingerprint(held) == entry.tls_fingerprint

    await eventually(installed, timeout=10)
    await eventually(lambda: ise.monitor.health("tsu") is not None)


async def test_federation_key_rotation_reaches_a_node_that_was_offline(cluster: Cluster) -> None:
    mie, tsu, ise = await three(cluster)
    assert mie.authority is not None
    old_key = mie.roster.federation_key
    await cluster.stop("ise")
    code, out = await cli("keys", "rotate", "--federation", "--home", str(mie.home.root), "--json")
    assert code == 0, out
    assert mie.roster.federation_key != old_key
    await mie.authority.update_member("tsu", relay=True)  # a version signed by the new key
    version = mie.roster.version
    await eventually(lambda: tsu.roster.version == version)
    ise = await cluster.start("ise")
    await eventually(lambda: ise.roster.version == version, timeout=15)
    assert ise.roster.federation_key == mie.roster.federation_key
    # And it still starts from what it stored (the announcing version is verified by
    # the key before it).
    await cluster.stop("ise")
    ise = await cluster.start("ise")
    assert ise.roster.version == version


async def test_suspended_node_gets_what_was_held_after_resume(cluster: Cluster) -> None:
    mie, tsu, ise = await three(cluster)
    assert mie.authority is not None
    room = await mie.rooms.create("連絡室", nodes=["tsu", "ise"])
    await eventually(lambda: tsu.rooms.state(room) is not None)
    await mie.authority.set_status("tsu", MemberStatus.SUSPENDED, "点検")
    await eventually(lambda: ise.roster.member("tsu").status is MemberStatus.SUSPENDED)  # type: ignore[union-attr]
    # The suspended node learns it (it may still read the roster), and sends nothing.
    await eventually(lambda: tsu.roster.member("tsu").status is MemberStatus.SUSPENDED)  # type: ignore[union-attr]
    await ise.rooms.send(room, [f"停止中 {i}" for i in range(10)])
    await asyncio.sleep(1.5)
    assert await count(tsu, room) == 1  # only the room's creation
    depths = await ise.rooms.store.outbox_depths()
    assert depths["tsu"][0] == 10  # kept for it
    await mie.authority.set_status("tsu", MemberStatus.ACTIVE, "点検完了")
    await holds(tsu, room, 11, timeout=10)
    await eventually(lambda: tsu.roster.member("tsu").active)  # type: ignore[union-attr]


async def test_keys_rotate_from_the_cli(cluster: Cluster) -> None:
    _mie, tsu, _ise = await three(cluster)
    home = str(tsu.home.root)
    code, out = await cli("keys", "rotate", "--home", home)
    assert code == 2 and "--signing" in out
    code, out = await cli("keys", "rotate", "--signing", "--home", home, "--json")
    assert code == 0, out
    data = json.loads(out)
    assert data["key"] == "signing" and data["key_id"] == tsu.rooms.signing_key.key_id
    code, out = await cli(
        "audit", "show", "--event", "signing_key_rotated", "--home", home, "--json"
    )
    assert code == 0, out
    (record,) = json.loads(out)
    assert record["fields"]["new_key_id"] == data["key_id"]
    await cluster.stop("tsu")  # the last head is signed at stop, with the new key
    code, out = await cli("audit", "verify", "--home", home)
    assert code == 0 and "intact" in out, out
    await cluster.start("tsu")
    code, out = await cli("keys", "rotate", "--federation", "--home", home)
    assert code == 1 and "not_authority" in out


async def test_revoked_node_history_stays_valid_and_what_it_signs_later_is_refused(
    cluster: Cluster,
) -> None:
    mie, tsu, ise = await three(cluster)
    assert mie.authority is not None
    room = await mie.rooms.create("連絡室", nodes=["tsu", "ise"])
    await eventually(lambda: tsu.rooms.state(room) is not None)
    await tsu.rooms.send(room, [f"失効前 {i}" for i in range(5)])
    await holds(ise, room, 6)
    await asyncio.sleep(1.1)  # signatures carry seconds: "after" must be a later second
    await mie.authority.set_status("tsu", MemberStatus.REVOKED, "端末紛失")
    await eventually(lambda: ise.roster.member("tsu").status is MemberStatus.REVOKED)  # type: ignore[union-attr]
    # The home node took tsu out of the room (one state change).
    await eventually(lambda: mie.rooms.state(room).nodes == {"mie-pref", "ise"})  # type: ignore[union-attr]
    # What tsu signed before stays history: a node joining now receives and verifies it.
    yokkaichi = await cluster.member("yokkaichi", "四日市市", "242021")
    await mie.rooms.invite(room, "yokkaichi")
    await holds(yokkaichi, room, 8)
    # What it signs after is refused, whoever carries it.
    (late_id,) = await tsu.rooms.send(room, ["失効後"])
    late = next(wire for eid, wire in await tsu.rooms.store.history(room, 1) if eid == late_id)
    entry = ise.roster.member("mie-pref")
    assert entry is not None
    response = await ise.client.request(
        entry, "POST", "/envelopes", codec.encode_frame({"envelopes": [late]})
    )
    answer = codec.decode_map(response.body, canonical=False)
    assert [code for _, code in answer["refused"]] == ["origin_revoked"]
    assert await count(mie, room) == 8


async def test_members_keep_exchanging_while_the_authority_is_down(cluster: Cluster) -> None:
    _mie, tsu, ise = await three(cluster)
    room = await tsu.rooms.create("町同士", nodes=["ise"])
    await eventually(lambda: ise.rooms.state(room) is not None)
    await cluster.stop("mie-pref")
    await tsu.rooms.send(room, ["県のサーバ停止中"])
    await ise.rooms.send(room, ["こちらは届いています"])
    await holds(ise, room, 3)
    await holds(tsu, room, 3)
