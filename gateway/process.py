"""Settings of the process a node runs in (`kakehashi run`), made once before it starts.

The cyclic garbage collector: CPython runs a young collection each time the tracked
objects allocated minus those freed pass 700. A node under load allocates several
dicts and objects per envelope, and a whole batch of them (up to a few thousand
envelopes) is alive from planning to commit, so with the defaults it collected about
750 times, 6 of them full, in a 100,000-envelope transfer: half a second of CPU in
each of the two node processes, about 8% of their event loops, while reference
counting frees nearly all of it anyway. With a young threshold of 10,000
the same run collected 3 and 38 times, taking 7 and 163 ms. Cyclic garbage waits a
little longer before it is freed: a node holding 1,000,000 envelopes in an outbox
peaked at 109 MB instead of 102 MB.

The C allocator (glibc's malloc): a batch on its way to or from a peer is a few
buffers of up to `MAX_BATCH_REQUEST_BYTES` (the frame, its masked copy, what TLS
reads and writes, the database's parameters). By default glibc gives a block above a
threshold (128 KiB at first) pages of its own straight from the kernel and hands them
back when it is freed, and it hands back the free top of its heaps once that passes
twice the threshold. It raises the threshold as such blocks are freed, but batches
vary in size and are made on three threads, so in a 100,000-envelope transfer the
sending node took about 145,000 page faults (1.45 per envelope: each page given back
is zeroed again by the kernel on its next use), the receiving node about 36,000. With
`ALLOCATOR_MMAP_THRESHOLD` above the largest batch and `ALLOCATOR_TRIM_THRESHOLD`
above what a few batches take, each took about 24,000; in 15 alternating runs the
transfer was 6.8% faster on average (faster in 13), with 13% less CPU per envelope at
the sender and 7% less at the receiver. Memory that is free stays with the process up
to that much: a node holding 1,000,000 envelopes in an outbox peaked at 146 MB against
147 MB. An operator who sets glibc's own malloc settings in the environment
(`GLIBC_TUNABLES`, `MALLOC_*_`) keeps them; other C libraries are left as they are.
"""

from __future__ import annotations

import ctypes
import gc
import os

import structlog

from .transport import MAX_BATCH_REQUEST_BYTES

__all__ = [
    "ALLOCATOR_MMAP_THRESHOLD",
    "ALLOCATOR_TRIM_THRESHOLD",
    "COLLECTOR_THRESHOLDS",
    "tune",
    "tune_allocator",
    "tune_collector",
]

COLLECTOR_THRESHOLDS = (10_000, 20, 20)
"""Young, middle and old generation thresholds (CPython's defaults: 700, 10, 10)."""

ALLOCATOR_MMAP_THRESHOLD = 2 * MAX_BATCH_REQUEST_BYTES
"""Bytes from which a block gets pages of its own from the kernel (glibc: 128 KiB,
raised as such blocks are freed, up to 32 MiB)."""
ALLOCATOR_TRIM_THRESHOLD = 4 * ALLOCATOR_MMAP_THRESHOLD
"""Free bytes at the top of a heap from which they are handed back to the kernel."""

# mallopt(3) parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_OPERATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

log = structlog.get_logger("kakehashi.process")


def tune_collector() -> None:
    """Apply `COLLECTOR_THRESHOLDS` to this process (once, before the node starts)."""
    gc.set_threshold(*COLLECTOR_THRESHOLDS)


def tune_allocator() -> str:
    """Apply the allocator thresholds to this process if its C library is glibc and the
    operator has not set them; returns what was done ("tuned", or why not)."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(
        name in os.environ for name in _OPERATOR_SETTINGS
    ):
        return "set by the operator"
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "not glibc"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, ALLOCATOR_MMAP_THRESHOLD) != 1:
        return "refused"
    if mallopt(_M_TRIM_THRESHOLD, ALLOCATOR_TRIM_THRESHOLD) != 1:
        return "refused"
    return "tuned"


def tune() -> None:
    """Both settings, once, before the node starts (`kakehashi run`)."""
    tune_collector()
    outcome = tune_allocator()
    log.info(
        "process_tuned",
        allocator=outcome,
        mmap_threshold=ALLOCATOR_MMAP_THRESHOLD,
        trim_threshold=ALLOCATOR_TRIM_THRESHOLD,
    )
