"""What keeps `graft serve` standing under hostile clients: a budget of decoded pixels in flight,
connection timeouts below the app (slow or idle request heads), and handing freed memory back.

A 170 KB PNG can hold a 6300 x 6300 RGBA image: 160 MB once decoded, and 7-8 bytes a pixel at the
decode's peak (the RGBA pixels and the RGB square made from them: serve.decode_square; measured
+320 MB for these 39.7 M pixels). Without a bound, eight such uploads at once took the server from
0.8 to 5 GB. DecodeBudget admits a decode only while the pixels of all decodes in flight fit the
budget and a decode slot is free; an upload that does not fit waits a short while, then gets 503
with Retry-After, so the server's peak memory stays near its baseline + budget x 8 bytes, however
many uploads arrive.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import threading
from dataclasses import dataclass, field, fields

from .errors import GraftError

DEFAULT_PIXEL_BUDGET = 64_000_000  # ~500 MB of decode peak at 8 bytes a pixel; 1.6 of the largest images
# Images this large decode in threads of lower priority (lower_priority), and hand the memory they
# freed back to the system after (release_memory).
LARGE_PIXELS = 4_000_000
LARGE_NICE = 10


@dataclass
class Limits:
    """What one client may cost the server. Each field is a `graft serve` flag (--pixel-budget, ...)."""
    pixel_budget: int = field(default=DEFAULT_PIXEL_BUDGET, metadata={"help": (
        "decoded pixels in flight, all requests together: bounds the server's peak memory to about "
        "8 bytes a pixel over its baseline; an image larger than this gets 413")})
    decode_slots: int = field(default=0, metadata={"help": (
        f"images of {LARGE_PIXELS // 10**6} M pixels or more decoded at once (default 0: one per CPU core)")})
    budget_wait: float = field(default=2.0, metadata={"help": (
        "seconds an upload may wait for room in the pixel budget before a 503 with Retry-After")})
    header_timeout: float = field(default=10.0, metadata={"help": (
        "seconds a connection has to send a complete request head, from opening or from its last "
        "response (then 408 and close)")})
    body_timeout: float = field(default=30.0, metadata={"help": (
        "longest wait in seconds for the next piece of a request body (then 408 and close)")})
    keep_alive: float = field(default=5.0, metadata={"help": "seconds an idle connection stays open after a response"})
    # each may hold an upload of up to --max-bytes while it arrives: this bounds bodies in memory
    max_connections: int = field(default=64, metadata={"help": (
        "connections served at once; more get 503 at once (uvicorn's limit_concurrency)")})

    def __post_init__(self):
        bad = [f.name for f in fields(self) if getattr(self, f.name) < (0 if f.name == "decode_slots" else 1e-9)]
        if bad:
            raise GraftError(f"--{bad[0].replace('_', '-')} {getattr(self, bad[0])}: must be positive")

    def slots(self) -> int:
        return self.decode_slots or os.cpu_count() or 1


def add_limit_flags(parser) -> None:
    for f in fields(Limits):
        text = f.metadata["help"]
        if "(default" not in text:
            text += f" (default {f.default:,})" if isinstance(f.default, int) else f" (default {f.default:g})"
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default, help=text)


def limits_from(args) -> Limits:
    return Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})


class UploadError(Exception):
    """A request the server answers with `status` and a message (never a 500). `headers` go with the
    answer; `close` ends the connection after it (a body left unread, or a client too slow to wait for)."""

    def __init__(self, status: int, message: str, headers: dict | None = None, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.headers, self.close = status, message, headers or {}, close


# File signatures of the formats PIL reads that uploads come in: bytes that start like one of these
# but fail to decode are a corrupt image (400), anything else is no image at all (415).
SIGNATURES = [(b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
              (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF")]


def signature(data: bytes) -> str | None:
    """The image format the bytes claim to be, from their first bytes only."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in SIGNATURES if data.startswith(magic)), None)


class DecodeBudget:
    """At most `pixels` decoded pixels in flight, and at most `slots` large decodes at once.

    `hold(n, wait, slot)` is an async context manager: it enters as soon as n pixels (and a slot,
    when `slot`: the server asks one for images of LARGE_PIXELS and more) fit, waiting at most
    `wait` seconds, else raises UploadError 503. Small images take no slot: two slow large decodes
    must not make an ordinary upload wait for them. Smaller requests that fit go ahead of a large one
    that waits (no first-come order): a stream of huge uploads must not stall ordinary ones, and the
    huge one's wait is bounded anyway. Works across event loops and threads (a lock, and each
    waiter's own loop woken thread-safely), so TestClient's loop-per-request use is fine too."""

    def __init__(self, pixels: int, slots: int):
        if pixels < 1 or slots < 1:
            raise ValueError(f"pixel budget {pixels} and decode slots {slots} must be >= 1")
        self.pixels, self.slots = pixels, slots
        self.free_pixels, self.free_slots = pixels, slots
        self.refused = 0  # 503s given so far (GET /info)
        self._lock = threading.Lock()
        self._waiters: list[list] = []  # [pixels, slot, future, loop, granted]

    def _take(self, n: int, slot: bool) -> bool:
        if (self.free_slots or not slot) and n <= self.free_pixels:
            self.free_slots -= slot
            self.free_pixels -= n
            return True
        return False

    def release(self, n: int, slot: bool = True) -> None:
        with self._lock:
            self.free_slots += slot
            self.free_pixels += n
            for waiter in list(self._waiters):
                if self._take(waiter[0], waiter[1]):
                    waiter[4] = True
                    self._waiters.remove(waiter)
                    waiter[3].call_soon_threadsafe(_wake, waiter[2])

    async def acquire(self, n: int, wait: float, slot: bool = True) -> bool:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._take(n, slot):
                return True
            waiter = [n, slot, loop.create_future(), loop, False]
            self._waiters.append(waiter)
        try:
            await asyncio.wait([waiter[2]], timeout=wait)
        except BaseException:  # cancelled: leave the queue, and give back what was granted meanwhile
            if self._leave(waiter):
                self.release(n, slot)
            raise
        if not self._leave(waiter):
            self.refused += 1
            return False
        return True

    def _leave(self, waiter: list) -> bool:
        """Take a waiter off the queue; whether it was granted before that."""
        with self._lock:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            return waiter[4]

    def hold(self, n: int, wait: float, slot: bool = True):
        return _Hold(self, n, wait, slot)


class _Hold:
    def __init__(self, budget: DecodeBudget, n: int, wait: float, slot: bool):
        self.budget, self.n, self.wait, self.slot = budget, n, wait, slot

    async def __aenter__(self):
        if not await self.budget.acquire(self.n, self.wait, self.slot):
            retry = max(1, round(self.wait))
            raise UploadError(503, f"busy decoding other images: this one ({self.n:,} pixels) did not fit the "
                                   f"server's budget of {self.budget.pixels:,} decoded pixels within "
                                   f"{self.wait:g} s; retry later", headers={"Retry-After": str(retry)})

    async def __aexit__(self, *exc):
        self.budget.release(self.n, self.slot)


def _wake(future) -> None:
    if not future.done():
        future.set_result(True)


def timed_protocol(header_timeout: float, body_timeout: float) -> type:
    """uvicorn's h11 protocol with the two timeouts it lacks. uvicorn times a connection out only
    while it is idle after a response (timeout_keep_alive) and cancels that on the first byte: a
    connection that never sends a request, or sends its head a byte at a time, was held for ever.
    Here a request head must be complete within `header_timeout` of the connection opening or of
    its previous response (408, then close; an idle connection is closed without a word), and a
    body the app no longer reads (answered early, e.g. 413) must keep arriving, at most
    `body_timeout` between pieces, or the connection closes. While the app reads a body, the app
    itself times each piece out (read_upload: 408)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    late = b"request head not complete in time"
    head_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(late), late))

    class TimedH11Protocol(H11Protocol):
        _timer = None
        _partial = False

        def _set_timer(self, seconds: float, callback) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_later(seconds, callback) if callback else None

        def _watch(self) -> None:
            """Arm the timer the connection's state calls for (or none while the app has it)."""
            if self.transport is None or self.transport.is_closing():
                self._set_timer(0, None)
            elif self.conn.their_state is h11.IDLE:
                if self._timer is None:
                    self._set_timer(header_timeout, self._head_late)
            elif self.conn.their_state is h11.SEND_BODY and self.conn.our_state in (h11.DONE, h11.MUST_CLOSE):
                self._set_timer(body_timeout, self._close)  # draining a body nobody reads: re-armed per piece
            else:
                self._set_timer(0, None)

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._watch()

        def data_received(self, data: bytes) -> None:
            was_idle = self.conn.their_state is h11.IDLE
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:
                self._partial = True  # a head still incomplete: its deadline stands
            else:
                self._partial = False
                if was_idle or self._timer is not None:
                    self._set_timer(0, None)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._set_timer(0, None)  # a new deadline for the next head, from now
            self._partial = False
            self._watch()

        def connection_lost(self, exc) -> None:
            self._set_timer(0, None)
            super().connection_lost(exc)

        def _head_late(self) -> None:
            self._timer = None
            if not self.transport.is_closing():
                if self._partial:
                    self.transport.write(head_408)
                self.transport.close()

        def _close(self) -> None:
            self._timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return TimedH11Protocol


def lower_priority() -> None:
    """Lower the calling thread's CPU priority (Linux sets niceness per thread; elsewhere nothing).
    A 40 M pixel PNG takes a core for a second or more: in threads of lower priority it uses the
    CPU the ordinary uploads leave, instead of doubling their latency on a small machine."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LARGE_NICE)
    except (AttributeError, OSError):
        pass


def release_memory() -> None:
    """Hand freed heap memory back to the system (glibc only; elsewhere nothing). PIL holds a large
    image in 16 MB blocks; after the first of them is freed, glibc raises its mmap threshold above
    that size, so later blocks come from the worker threads' arenas, and freed arena memory stays
    with the process. Measured with the hostile test's burst (16 uploads of 6300 x 6300 RGBA): the
    server kept 250-320 MB over its baseline afterwards without this call, 20 MB with it; the call
    takes well under a millisecond."""
    if _trim is not None:
        _trim(0)


def _load_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


_trim = _load_trim()
