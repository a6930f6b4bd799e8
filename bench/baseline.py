"""The same-run baseline of the delivery figures: one core, no I/O.

What one core can do of the envelope pipeline with 1 KiB message bodies:
`seal_batch` (canonical msgpack encode, SHA-256 ids, Merkle tree, one Ed25519
signature, inclusion paths) + `Envelope.to_bytes` + `Envelope.from_bytes`
(decode, canonical check) + `RootCache.verify` (path hashes, one Ed25519 verify
per batch). No sockets, no SQLite, no event loop.

- `throughput_eps(batch)`: envelopes/s in batches of `batch` (like the sender's).
- `single_ms()`: per-envelope milliseconds for lone envelopes (a batch of one, as
  an interactive send is): samples for p50/p99.
- `fanout_ms(receivers)`: one lone envelope sealed once, decoded and verified by
  `receivers` receivers, all on one core: samples for p99.
"""

from __future__ import annotations

import time

from federation.envelope import Content, Envelope, Kind, RootCache, seal_batch
from federation.signing import SigningKey

ROOM = "!benchroom0000000:mie-pref"
ORIGIN = "tsu"
TEXT_BYTES = 1024


def text(tag: str) -> str:
    """A 1 KiB message body (ASCII, so 1024 bytes) starting with `tag`."""
    return (tag + " " + "x" * TEXT_BYTES)[:TEXT_BYTES]


class Contents:
    """Message contents of one origin in one room, in sequence (1 KiB bodies)."""

    def __init__(self) -> None:
        self.key = SigningKey.generate()
        self.seq = 0
        self.hlc = 1 << 40

    def make(self, count: int) -> list[Content]:
        contents = []
        for _ in range(count):
            self.seq += 1
            self.hlc += 1
            deps = {"mie-pref": 1}
            if self.seq > 1:
                deps[ORIGIN] = self.seq - 1
            contents.append(
                Content(
                    room=ROOM,
                    origin=ORIGIN,
                    seq=self.seq,
                    kind=Kind.MESSAGE,
                    sender="",
                    hlc=self.hlc,
                    deps=deps,
                    key_id=self.key.key_id,
                    body={"text": text(f"m{self.seq}")},
                )
            )
        return contents


def _pipeline(contents: list[Content], key: SigningKey, cache: RootCache) -> None:
    wires = [e.to_bytes() for e in seal_batch(contents, key)]
    public = key.public_raw
    for wire in wires:
        cache.verify(Envelope.from_bytes(wire), public)


def throughput_eps(batch: int, seconds: float = 2.0) -> float:
    """Envelopes per second through seal + to_bytes + from_bytes + verify, one core."""
    source = Contents()
    cache = RootCache()
    _pipeline(source.make(batch), source.key, cache)  # warm-up
    done, spent = 0, 0.0
    while spent < seconds:
        contents = source.make(batch)  # not timed: the node builds them from the request
        started = time.perf_counter()
        _pipeline(contents, source.key, cache)
        spent += time.perf_counter() - started
        done += batch
    return done / spent


def single_ms(count: int) -> list[float]:
    """Milliseconds per lone envelope (batch of one) through the pipeline."""
    source = Contents()
    cache = RootCache()
    samples = []
    for _ in range(count + 20):
        contents = source.make(1)
        started = time.perf_counter()
        _pipeline(contents, source.key, cache)
        samples.append((time.perf_counter() - started) * 1000)
    return samples[20:]


def fanout_ms(receivers: int, count: int) -> list[float]:
    """Milliseconds to seal one envelope and have `receivers` receivers decode and verify it."""
    source = Contents()
    samples = []
    public = source.key.public_raw
    for _ in range(count + 5):
        contents = source.make(1)
        started = time.perf_counter()
        wire = seal_batch(contents, source.key)[0].to_bytes()
        for _ in range(receivers):
            RootCache().verify(Envelope.from_bytes(wire), public)
        samples.append((time.perf_counter() - started) * 1000)
    return samples[5:]
