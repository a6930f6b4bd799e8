"""Decoding received envelopes, on a helper process when a batch is large.

Decoding an envelope (msgpack, the canonical-form check, the header checks) is the
largest single cost of the event loop per received envelope. While a node catches
up, it is the bottleneck and the node serving it is nearly idle, so a second core
is free. Large batches are therefore screened by a helper process (`python -m
gateway.decoder`, which runs `federation.envelope.screen`), and the event loop only
rebuilds what the helper accepted (`Envelope.from_screened`, a third of the cost).

Strategy:
- Only catch-up pages come here (`RoomService.decode`); a push is decoded in the
  event loop, since during a stream the sending node needs the other core.
- Batches under `OFFLOAD_MIN` envelopes are decoded in the event loop: a lone
  message's latency does not pay for a trip between processes.
- The helper starts on the first large batch; until it has answered once, decoding
  stays in the loop. It reads length-prefixed msgpack requests on its standard input
  and answers on its standard output, in order.
- It exits when its standard input closes, so it never outlives the node, even one
  killed with SIGKILL.
- If it dies, answers nonsense or takes longer than `ANSWER_TIMEOUT`, the batches
  waiting on it are decoded in the loop, it is stopped, and a new one is tried after
  `RESTART_DELAY`.

Invariant: the same bytes give the same envelopes and the same refusals (code,
message) on either path.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import os
import signal
import sys
import time
from collections.abc import Sequence

import msgpack
import structlog

from federation.envelope import Envelope, Screened, screen
from federation.errors import ProtocolError

__all__ = ["ANSWER_TIMEOUT", "OFFLOAD_MIN", "RESTART_DELAY", "Decoder", "decode_here"]

OFFLOAD_MIN = 64
"""Smallest batch sent to the helper (catch-up pages and full pushes are larger)."""
ANSWER_TIMEOUT = 10.0
"""Seconds the helper may take over one batch before it is considered stuck."""
RESTART_DELAY = 30.0
"""Seconds after a helper failed before another is started."""
log = structlog.get_logger("kakehashi.decoder")
_LENGTH = 4  # bytes of the big-endian length before each frame
_MAX_FRAME = 256 * 1024 * 1024

Decoded = Envelope | ProtocolError
"""One received envelope, decoded, or why it is refused."""


def decode_here(wires: Sequence[bytes]) -> list[Decoded]:
    """Decode in this process."""
    decoded: list[Decoded] = []
    for wire in wires:
        try:
            decoded.append(Envelope.from_bytes(wire))
        except ProtocolError as exc:
            decoded.append(exc)
    return decoded


def _rebuild(wire: bytes, verdict: object) -> Decoded:
    """The envelope or refusal the helper's verdict on `wire` stands for."""
    if type(verdict) is bytes and len(verdict) == 32:
        try:
            return Envelope.from_screened(wire, verdict)
        except Exception:  # not what the helper checked: judge it here
            return decode_here([wire])[0]
    if (
        type(verdict) is list
        and len(verdict) == 3
        and type(verdict[0]) is str
        and type(verdict[1]) is str
        and type(verdict[2]) is int
    ):
        return ProtocolError(verdict[1], code=verdict[0], status=verdict[2])
    return decode_here([wire])[0]


class _Helper(enum.Enum):
    """Where the helper process stands."""

    OFF = "off"
    """Not started (or stopped with the node)."""
    STARTING = "starting"
    """Started, its first answer awaited."""
    READY = "ready"
    """Answering: large batches go to it."""
    FAILED = "failed"
    """Died or stuck; another is tried `RESTART_DELAY` after `failed_at`."""


class _HelperGone(Exception):
    """The helper cannot answer this request; decode it here."""


class Decoder:
    """Decodes received batches; owns the helper process and its reader task."""

    def __init__(self, *, use_helper: bool = True) -> None:
        self._use_helper = use_helper and (os.cpu_count() or 1) > 1
        self._state = _Helper.OFF
        self._failed_at = 0.0
        self._process: asyncio.subprocess.Process | None = None
        self._waiting: collections.deque[asyncio.Future[list[object]]] = collections.deque()
        self._starter: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self.offloaded = 0
        """Envelopes the helper screened (for tests and metrics)."""

    @property
    def helper_pid(self) -> int | None:
        """The helper process's id while one runs."""
        return self._process.pid if self._process is not None else None

    async def decode(self, wires: Sequence[bytes]) -> list[Decoded]:
        """Each of `wires` decoded, or the refusal it earns, in order."""
        if len(wires) >= OFFLOAD_MIN and self._helper_ready():
            try:
                verdicts = await self._ask(wires)
            except _HelperGone:
                pass
            else:
                self.offloaded += len(wires)
                return [
                    _rebuild(wire, verdict) for wire, verdict in zip(wires, verdicts, strict=True)
                ]
        return decode_here(wires)

    async def stop(self) -> None:
        """Stop the helper; safe to call twice."""
        self._use_helper = False
        if self._starter is not None:
            self._starter.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._starter
            self._starter = None
        await self._end("stopped")
        self._state = _Helper.OFF

    # the helper ---------------------------------------------------------------------

    def _helper_ready(self) -> bool:
        """True when the helper answers; starts one when none runs (and one is due)."""
        if self._state is _Helper.READY:
            return True
        due = self._state is _Helper.OFF or (
            self._state is _Helper.FAILED and time.monotonic() - self._failed_at >= RESTART_DELAY
        )
        if self._use_helper and due:
            self._state = _Helper.STARTING
            self._starter = asyncio.create_task(self._start(), name="decode-helper-start")
        return False

    async def _start(self) -> None:
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway.decoder",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            self._reader = asyncio.create_task(self._read(), name="decode-helper-read")
            await self._ask([])  # proves it imported and answers
        except asyncio.CancelledError:
            raise
        except (_HelperGone, OSError) as exc:
            await self._fail(f"could not start: {exc}")
            return
        self._state = _Helper.READY
        log.info("decode_helper_started", pid=self._process.pid)

    async def _ask(self, wires: Sequence[bytes]) -> list[object]:
        process = self._process
        if process is None or process.stdin is None:
            raise _HelperGone
        request = msgpack.packb(list(wires), use_bin_type=True)
        answer: asyncio.Future[list[object]] = asyncio.get_running_loop().create_future()
        self._waiting.append(answer)
        try:
            process.stdin.write(len(request).to_bytes(_LENGTH, "big") + request)
            await process.stdin.drain()
            verdicts = await asyncio.wait_for(asyncio.shield(answer), ANSWER_TIMEOUT)
        except (OSError, RuntimeError) as exc:  # the pipe broke under us
            await self._fail(f"pipe closed: {exc}")
            raise _HelperGone from exc
        except TimeoutError:
            await self._fail(f"no answer within {ANSWER_TIMEOUT:.0f}s")
            raise _HelperGone from None
        if len(verdicts) != len(wires):
            await self._fail("answered for another number of envelopes")
            raise _HelperGone
        return verdicts

    async def _read(self) -> None:
        """Hand each answer to the oldest request waiting; fail the helper on EOF."""
        process = self._process
        assert process is not None and process.stdout is not None
        try:
            while True:
                size = int.from_bytes(await process.stdout.readexactly(_LENGTH), "big")
                if size > _MAX_FRAME:
                    raise ValueError(f"answer of {size} bytes")
                body = await process.stdout.readexactly(size)
                verdicts = msgpack.unpackb(body, raw=False)
                if type(verdicts) is not list or not self._waiting:
                    raise ValueError("an answer nobody asked for")
                waiter = self._waiting.popleft()
                if not waiter.done():
                    waiter.set_result(verdicts)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # EOF, a broken frame: the helper is of no more use
            self._reader = None  # this task is ending; _fail must not wait for it
            await self._fail(f"stopped answering: {type(exc).__name__}: {exc}")

    async def _fail(self, reason: str) -> None:
        if self._state is _Helper.FAILED:
            return
        if self._use_helper:
            log.warning("decode_helper_failed", reason=reason, retry_in_s=RESTART_DELAY)
        self._state = _Helper.FAILED
        self._failed_at = time.monotonic()
        await self._end(reason)

    async def _end(self, reason: str) -> None:
        """Stop the process and the reader; every request still waiting is decoded here."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(_HelperGone(reason))
                waiter.exception()  # retrieved: an abandoned one must not warn
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()  # the helper exits at end of input
        try:
            await asyncio.wait_for(process.wait(), 2.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        if process.stdin is not None:
            # How the input pipe closed (BrokenPipeError when the helper went first), taken
            # here: left alone, Python 3.11 logs it at exit as "Future exception was never
            # retrieved".
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(process.stdin.wait_closed(), 1.0)


def _serve() -> None:
    """The helper: screen each request from standard input until it closes."""
    # Ctrl-C reaches the whole process group; the node ends the helper by closing its input.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header = source.read(_LENGTH)
        if len(header) < _LENGTH:
            return  # the node closed the pipe, or is gone
        body = source.read(int.from_bytes(header, "big"))
        wires = msgpack.unpackb(body, raw=False)
        verdicts: list[Screened] = screen(wires)
        answer = msgpack.packb(verdicts, use_bin_type=True)
        try:
            sink.write(len(answer).to_bytes(_LENGTH, "big") + answer)
            sink.flush()
        except BrokenPipeError:
            os._exit(0)  # the node is gone (killed): nobody is left to answer, or to tell


if __name__ == "__main__":
    _serve()
