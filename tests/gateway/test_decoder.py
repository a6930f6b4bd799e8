"""Decoding received batches on the helper process: the same results as in the node's own
process, a fallback when the helper fails, and no helper outliving its node."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sealing import sealed_messages

import gateway.decoder as decoder_module
from federation import codec
from federation.envelope import Envelope
from federation.errors import ProtocolError
from federation.signing import SigningKey
from gateway.decoder import OFFLOAD_MIN, Decoded, Decoder, decode_here

KEY = SigningKey(Ed25519PrivateKey.from_private_bytes(bytes([9]) * 32))
ROOM = "!decoder01:mie-pref"


def batch(count: int) -> list[bytes]:
    """`count` wires of one signing batch from tsu, with refusals of every kind mixed in."""
    envelopes = sealed_messages(
        ROOM,
        "tsu",
        range(1, count + 1),
        key=KEY,
        sender="tanaka@tsu",
        text="お知らせ {}".format,
        others={"mie-pref": 1},
        hlc0=1_714_521_600_000 << 16,
        extra={"name": "田中太郎"},
    )
    wires = [envelope.to_bytes() for envelope in envelopes]
    good = wires[5]
    raw = msgpack.unpackb(good, raw=False)
    wires[1] = b"\xc1 not msgpack"
    wires[2] = good[:-7]  # truncated
    wires[3] = b"\x00" * (70 * 1024)  # oversized
    wires[4] = codec.encode_frame(raw | {"i": True})  # a bool where an integer belongs
    wires[6] = codec.encode_frame(  # content not canonical (uint8 for a small int)
        raw | {"c": raw["c"].replace(b"\xa1v\x01", b"\xa1v\xcc\x01")}
    )
    return wires


def same(left: Decoded, right: Decoded) -> bool:
    """Equal envelopes (every field) or equal refusals (code, message, status)."""
    if isinstance(left, ProtocolError) or isinstance(right, ProtocolError):
        return (
            isinstance(left, ProtocolError)
            and isinstance(right, ProtocolError)
            and (left.code, str(left), left.status) == (right.code, str(right), right.status)
        )
    return (left, left.id, left.wire, left.content.__repr__()) == (
        right,
        right.id,
        right.wire,
        right.content.__repr__(),
    )


async def ready(decoder: Decoder, wires: list[bytes]) -> None:
    """Start the helper and wait until it answers."""
    await decoder.decode(wires)
    deadline = time.monotonic() + 20
    while decoder._state is not decoder_module._Helper.READY:
        assert time.monotonic() < deadline, f"helper not ready: {decoder._state}"
        await asyncio.sleep(0.02)


@pytest.fixture
async def decoder() -> AsyncIterator[Decoder]:
    decoder = Decoder(use_helper=True)
    yield decoder
    await decoder.stop()


async def test_the_helper_decodes_and_refuses_exactly_as_the_node_does(decoder: Decoder) -> None:
    wires = batch(OFFLOAD_MIN + 10)
    await ready(decoder, wires)
    offloaded = await decoder.decode(wires)
    assert decoder.offloaded == len(wires)
    here = decode_here(wires)
    assert all(same(a, b) for a, b in zip(offloaded, here, strict=True))
    codes = [e.code for e in offloaded if isinstance(e, ProtocolError)]
    assert codes == [
        "malformed_msgpack",
        "malformed_msgpack",
        "envelope_too_large",
        "bad_envelope",
        "non_canonical",
    ]
    assert sum(isinstance(e, Envelope) for e in offloaded) == len(wires) - 5


async def test_small_batches_are_decoded_in_the_node_without_the_helper(decoder: Decoder) -> None:
    await ready(decoder, batch(OFFLOAD_MIN))
    before = decoder.offloaded
    small = batch(OFFLOAD_MIN - 1)
    decoded = await decoder.decode(small)
    assert decoder.offloaded == before
    assert all(same(a, b) for a, b in zip(decoded, decode_here(small), strict=True))


async def test_a_helper_that_dies_is_replaced_and_nothing_is_lost_meanwhile(
    decoder: Decoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    wires = batch(OFFLOAD_MIN)
    await ready(decoder, wires)
    first = decoder.helper_pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    # Decoded in the node while the helper is gone: the same results, none lost.
    for _ in range(3):
        decoded = await decoder.decode(wires)
        assert all(same(a, b) for a, b in zip(decoded, decode_here(wires), strict=True))
    assert decoder._state is decoder_module._Helper.FAILED
    monkeypatch.setattr(decoder_module, "RESTART_DELAY", 0.0)
    await ready(decoder, wires)
    assert decoder.helper_pid not in (None, first)
    before = decoder.offloaded
    await decoder.decode(wires)
    assert decoder.offloaded == before + len(wires)


async def test_a_helper_that_dies_leaves_no_pipe_error_unretrieved(decoder: Decoder) -> None:
    # When the helper goes first, asyncio fails the input pipe's close with BrokenPipeError;
    # unless the decoder takes that result, Python 3.11 logs "Future exception was never
    # retrieved" at an error level once the pipe is collected.
    reported: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(
        lambda _loop, context: reported.append(context)
    )
    await ready(decoder, batch(OFFLOAD_MIN))
    pid, process = decoder.helper_pid, decoder._process
    assert pid is not None and process is not None and process.stdin is not None
    os.kill(pid, signal.SIGSTOP)  # reads nothing more: what follows stays queued here
    process.stdin.write(b"\xff" * 1_000_000)
    os.kill(pid, signal.SIGKILL)
    del process  # collected below, with its pipe's close result
    deadline = time.monotonic() + 10
    while decoder._state is not decoder_module._Helper.FAILED:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await decoder.stop()
    for _ in range(3):
        gc.collect()
        await asyncio.sleep(0.01)
    assert [context.get("message") for context in reported] == []


async def test_a_helper_that_answers_nonsense_is_dropped(decoder: Decoder) -> None:
    wires = batch(OFFLOAD_MIN)
    await ready(decoder, wires)
    process = decoder._process
    assert process is not None and process.stdin is not None
    # A request the helper cannot read: it ends, and the request waiting is decoded here.
    process.stdin.write(b"\x00\x00\x00\x03\xc1\xc1\xc1")
    decoded = await decoder.decode(wires)
    assert all(same(a, b) for a, b in zip(decoded, decode_here(wires), strict=True))
    deadline = time.monotonic() + 10
    while decoder._state is not decoder_module._Helper.FAILED:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def test_stopping_the_decoder_ends_its_helper(decoder: Decoder) -> None:
    await ready(decoder, batch(OFFLOAD_MIN))
    pid = decoder.helper_pid
    assert pid is not None
    await decoder.stop()
    assert decoder.helper_pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_the_helper_does_not_outlive_a_node_killed_with_sigkill() -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        sys.path[:0] = {sys.path!r}
        from tests.gateway.test_decoder import batch, ready
        from gateway.decoder import Decoder

        async def main():
            decoder = Decoder(use_helper=True)
            await ready(decoder, batch(80))
            print("helper", decoder.helper_pid, flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
        """
    )
    node = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert node.stdout is not None
        line = node.stdout.readline()
        while not line.startswith("helper "):  # the node's own log lines come first
            line = node.stdout.readline()
        helper = int(line.split()[1])
        os.kill(helper, 0)  # running
        node.kill()
        node.wait()
        deadline = time.monotonic() + 10
        while True:
            try:
                os.kill(helper, 0)
            except ProcessLookupError:
                break
            # A zombie is gone too: it has exited and waits for init to reap it.
            with open(f"/proc/{helper}/stat") as stat:
                if stat.read().split()[2] == "Z":
                    break
            assert time.monotonic() < deadline, "the helper outlived its node"
            time.sleep(0.05)  # the helper is not our child: nothing to wait on but its pid
    finally:
        node.kill()
        node.wait()
        if node.stdout is not None:
            node.stdout.close()
