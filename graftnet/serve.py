"""HTTP inference for a finished run or ensemble: `graft serve RUN [--host 127.0.0.1] [--port 8000]`.

    POST /predict   an image: multipart/form-data with the file in field `file`, or the image itself
                    as the body with an image/* content type; ?top=K (default 3).
                    -> {"class", "probability", "top": [{"class", "probability"}, ...]}
    GET  /health    {"status": "ok"} once the model is loaded
    GET  /info      classes, backbone, input size, whether mirrors are scored too (`tta`: --tta, or
                    an ensemble saved with --tta), members with weights for an ensemble, the limits
                    below and how many uploads were refused as busy (`refused_busy`)

The model is loaded once, before the server binds its port, and warmed up with one image. Bad input
gets a 4xx with a message, never a 500: a wrong content type 415, bytes that are no image 415,
bytes that start like an image (JPEG, PNG, GIF, WEBP, BMP, TIFF signature) but do not decode 400, a
missing `file` field 400, an upload over --max-bytes 413, an image over the pixel limit (MAX_PIXELS,
or --pixel-budget when smaller) 413. The size is counted while the body arrives (and a Content-Length
over the limit is refused before reading), so an oversized upload never sits in memory whole.

Hostile clients (serve_limits.py): an upload's header says how many pixels it will decode to before
any are decoded; at most --pixel-budget pixels are in flight, and at most --decode-slots decodes of
4 M pixels or more at once, so a 170 KB PNG of 6300 x 6300 pixels (160 MB decoded) cannot take the
memory with it, eight at once no more than one. An upload that does not fit waits up to --budget-wait seconds, then gets
503 with Retry-After. Images of 4 M pixels and more decode in threads of lower CPU priority, and the
memory they freed is handed back to the system after each. A request head must be complete within
--header-timeout of the connection opening or of its last response (408), a body may pause at most
--body-timeout between pieces (408), an idle connection closes after --keep-alive seconds, and a
client that leaves mid-upload is dropped without a log line; at most --max-connections are served
at once (more get 503), which bounds the upload bodies held in memory. Decoding runs in worker threads in
parallel; the model runs in one thread with a fixed number of torch threads (default_threads), on
micro-batches: the requests waiting when a pass starts go through together (MicroBatcher), up to
--max-batch, so concurrent load costs one pass over the weights per batch instead of one per
request, while a lone request waits for nobody (--batch-wait-ms 0).
"""

import asyncio
import collections
import io  # no `from __future__ import annotations`: FastAPI reads the route annotations
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image

from .data.images import grayscale, square_uint8, to_rgb
from .data.pixels import unreadable_reason
from .errors import GraftError
from .options import number
from .serve_limits import (LARGE_PIXELS, DecodeBudget, Limits, UploadError, add_limit_flags, limits_from,
                           lower_priority, release_memory, signature, timed_protocol)

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 40_000_000  # a 1 KB PNG can claim 100k x 100k pixels: refuse before decoding it
MULTIPART_SLACK = 16 * 1024  # boundaries and part headers around the file in a multipart body
HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I", "F")  # to_rgb stretches these by the whole image's range
BAND_PIXELS = 1 << 20  # decode_square converts about a million pixels at a time


def open_upload(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """The uploaded image, its header read but its pixels not yet decoded, or UploadError: 400 for
    no bytes or bytes that start like an image but do not open (corrupt), 415 for bytes that are no
    image at all, 413 for more pixels than max_pixels (and never more than MAX_PIXELS)."""
    if not data:
        raise UploadError(400, "empty upload: no image bytes received")
    limit = MAX_PIXELS if max_pixels is None else min(max_pixels, MAX_PIXELS)
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # PIL's own cap, above ours
        raise UploadError(413, f"image too large ({e}); at most {limit:,} pixels are accepted") from None
    except Exception as e:  # UnidentifiedImageError, SyntaxError from a broken header, ...
        claimed = signature(data)
        if claimed:
            raise UploadError(400, f"corrupt or truncated {claimed} image ({unreadable_reason(e)})") from None
        raise UploadError(415, f"not an image this server can decode ({unreadable_reason(e)})") from None
    w, h = img.size
    if w * h > limit:
        raise UploadError(413, f"image is {w}x{h} pixels; at most {limit:,} pixels are accepted")
    return img


def decode_square(img: Image.Image, gray: bool, size: int) -> torch.Tensor:
    """square_uint8(to_rgb(img) or grayscale(img), size): the same pixels in less memory. The
    centre square is converted a band of rows at a time into one RGB image, instead of whole-image
    copies (to_rgb peaks at 16 bytes a pixel for RGBA: the image, its RGBA copy, a white background
    and the composite; here 7-8). Conversion is per pixel, so cropping first changes nothing;
    16-bit and float images are stretched by their whole range and go the old way. No JPEG draft()
    or reduce() before converting: both change the pixels the model sees (DCT scaling is not PIL's
    resize, and compositing alpha does not commute with averaging)."""
    try:
        img.load()
        if img.mode in HIGH_DEPTH or (img.mode == "RGB" and not gray):
            return square_uint8(img if img.mode == "RGB" else grayscale(img) if gray else to_rgb(img), size)
        convert = grayscale if gray else to_rgb
        w, h = img.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        square = Image.new("RGB", (s, s))
        band = max(1, BAND_PIXELS // s)
        for y in range(0, s, band):
            square.paste(convert(img.crop((left, top + y, left + s, top + min(s, y + band)))), (0, y))
        img.close()  # the decoded pixels go now, before the resize
        return square_uint8(square, size)
    except Exception as e:  # truncated or corrupt data after a valid header
        raise UploadError(400, f"corrupt or truncated {img.format} image ({type(e).__name__}: {e})") from None


def open_image(data: bytes, gray: bool = False) -> Image.Image:
    """Decode uploaded bytes to RGB (luminance in all three channels for `gray` runs, as they were
    trained), or raise UploadError saying what is wrong with them: the whole image, as `graft
    predict` decodes it (the server itself uses open_upload + decode_square)."""
    img = open_upload(data)
    try:
        img.load()
        return grayscale(img) if gray else to_rgb(img)
    except Exception as e:  # truncated or corrupt data after a valid header
        raise UploadError(400, f"corrupt or truncated {img.format} image ({type(e).__name__}: {e})") from None


async def read_upload(request, max_bytes: int, body_timeout: float | None = None) -> bytes:
    """The uploaded image's bytes; the body is counted as it arrives and refused past the limit
    (413), a wait of more than body_timeout seconds for its next piece ends it (408), and a client
    that leaves before the end gets UploadError 499 (nobody reads the answer; no traceback)."""
    from starlette.requests import ClientDisconnect, Request
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = media == "multipart/form-data"
    if not multipart and not media.startswith("image/"):
        raise UploadError(415, f"unsupported content type {media or '(none)'}: send multipart/form-data "
                               "with the image in a field named 'file', or the image itself as the "
                               "body with an image/* content type")
    limit = max_bytes + (MULTIPART_SLACK if multipart else 0)
    too_large = UploadError(413, f"upload larger than the limit of {max_bytes:,} bytes")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    received = 0

    async def counted_receive():
        nonlocal received
        try:
            message = await asyncio.wait_for(request.receive(), body_timeout)
        except asyncio.TimeoutError:
            raise UploadError(408, f"upload stalled: no data for {body_timeout:g} s", close=True) from None
        received += len(message.get("body", b""))
        if received > limit:
            raise UploadError(too_large.status, too_large.message, close=True)  # the rest stays unread
        return message

    counted = Request(request.scope, counted_receive)
    gone = UploadError(499, "client disconnected before the upload was complete")
    if not multipart:
        try:
            return b"".join([chunk async for chunk in counted.stream()])
        except ClientDisconnect:
            raise gone from None
    try:
        form = await counted.form(max_files=1, max_fields=16, max_part_size=MULTIPART_SLACK)
    except UploadError:
        raise
    except ClientDisconnect:
        raise gone from None
    except Exception as e:  # MultiPartException, or starlette's HTTPException wrapping it
        raise UploadError(400, f"malformed multipart body: {getattr(e, 'detail', None) or e}") from None
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise UploadError(400, "missing file field: send the image in a multipart field named 'file'")
        data = await upload.read()
    finally:
        await form.close()
    if len(data) > max_bytes:
        raise too_large
    return data


class MicroBatcher:
    """Runs `fn(list of inputs) -> rows` in one thread on batches of waiting requests. A batch takes
    whatever is queued when the previous pass ends, up to max_batch, after waiting at most wait_ms
    for company. On a CPU a pass over 8 images costs far less than 8 passes over 1 (the weights are
    read once), so throughput under concurrent load grows; with wait_ms 0 a lone request is not
    delayed at all. `sizes` counts the batches by size (GET /info shows it)."""

    def __init__(self, fn, max_batch: int = 16, wait_ms: float = 0.0):
        if max_batch < 1 or wait_ms < 0:
            raise GraftError("--max-batch must be >= 1 and --batch-wait-ms >= 0")
        self.fn, self.max_batch, self.wait = fn, max_batch, wait_ms / 1000
        self.queue: queue.Queue = queue.Queue()
        self.sizes: collections.Counter = collections.Counter()
        threading.Thread(target=self._loop, name="graft-batcher", daemon=True).start()

    def __call__(self, x):
        future: Future = Future()
        self.queue.put((x, future))
        return future.result()

    def _take(self) -> list:
        items = [self.queue.get()]
        deadline = time.monotonic() + self.wait
        while len(items) < self.max_batch:
            try:
                left = deadline - time.monotonic()
                items.append(self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _loop(self) -> None:
        while True:
            items = self._take()
            self.sizes[len(items)] += 1
            try:
                rows = self.fn([x for x, _ in items])
                for (_, future), row in zip(items, rows):
                    future.set_result(row)
            except Exception as e:  # noqa: BLE001 - every waiting request gets the error
                for _, future in items:
                    future.set_exception(e)


def create_app(run_dir: str | Path, max_bytes: int = DEFAULT_MAX_BYTES, predictor=None,
               max_batch: int = 16, wait_ms: float = 0.0, tta: bool = False, limits: Limits | None = None):
    """The FastAPI app serving one run or ensemble folder (loaded here, once). `tta`: score each
    upload and its mirror (an ensemble saved with --tta does so without it). `limits`: the decode
    budget and the body timeout (the connection timeouts are the server's: serve())."""
    from fastapi import FastAPI, Query, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse
    from .evaluation import top_classes
    from .multilabel import labels_above
    from .predictor import flip_tta, load_predictor
    limits = limits or Limits()
    budget = DecodeBudget(limits.pixel_budget, limits.slots())
    if predictor is None:
        predictor = load_predictor(run_dir)
    if tta:
        flip_tta(predictor)
    info = {**predictor.info(), "max_bytes": max_bytes, "limits": {**asdict(limits), "decode_slots": budget.slots}}
    gray, size = predictor.cfg.data.grayscale, predictor.image_size

    multilabel = predictor.spec.multilabel  # a sigmoid per label; the answer: labels above threshold

    def probabilities(images: list) -> torch.Tensor:
        with torch.inference_mode():
            logits = predictor(images)
            return logits.sigmoid() if multilabel else logits.softmax(1)

    batcher = MicroBatcher(probabilities, max_batch, wait_ms)
    large = ThreadPoolExecutor(budget.slots, "graft-decode-large", initializer=lower_priority)

    def decode(img: Image.Image) -> torch.Tensor:  # in a worker thread: decodes run in parallel
        x = decode_square(img, gray, size)
        if img.size[0] * img.size[1] >= LARGE_PIXELS:
            release_memory()
        return x

    batcher(decode(open_upload(_blank_png())))  # warm-up: the first request is not the slow one
    app = FastAPI(title="graftnet", description=f"image classifier served from {run_dir}")

    @app.exception_handler(UploadError)
    async def upload_error(request, exc: UploadError):
        headers = {**exc.headers, **({"connection": "close"} if exc.close else {})}
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=headers)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info")
    async def get_info():
        return {**info, "max_batch": max_batch, "batches_by_size": dict(sorted(list(batcher.sizes.items()))),
                "refused_busy": budget.refused}

    @app.post("/predict")
    async def predict(request: Request, top: int = Query(3, ge=1, le=1000)):
        data = await read_upload(request, max_bytes, limits.body_timeout)
        img = await run_in_threadpool(open_upload, data, budget.pixels)  # the header only: its size
        del data
        pixels = img.size[0] * img.size[1]
        large_one = pixels >= LARGE_PIXELS  # seconds of CPU: a slot, and a lower priority than ordinary uploads
        async with budget.hold(pixels, limits.budget_wait, slot=large_one):
            if large_one:
                x = await asyncio.get_running_loop().run_in_executor(large, decode, img)
            else:
                x = await run_in_threadpool(decode, img)
        del img
        probs = await run_in_threadpool(batcher, x)
        if multilabel:
            return labels_above(probs.tolist(), predictor.classes, predictor.spec.thresholds, top)
        return top_classes(probs, predictor.classes, top)

    return app


def _blank_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(buf, "PNG")
    return buf.getvalue()


def default_threads() -> int:
    """Half the cores, at most 4: the rest decode uploads and run the event loop. A torch pool as
    wide as the machine collapses when anything else runs: measured on the 2-core box under load,
    Lite0 at 128 px took 26 ms per image with 1 thread and 230-480 ms with 2 (threads spin-waiting
    on each other's barriers)."""
    import os
    return max(1, min(4, (os.cpu_count() or 1) // 2))


def set_threads(threads: int) -> None:
    torch.set_num_threads(max(1, threads))
    try:
        torch.set_num_interop_threads(1)  # one inference at a time: no inter-op parallelism to use
    except RuntimeError:  # already set (a parallel op ran before): keep it
        pass


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000,
          max_bytes: int = DEFAULT_MAX_BYTES, threads: int | None = None, access_log: bool = False,
          max_batch: int = 16, wait_ms: float = 0.0, tta: bool = False, limits: Limits | None = None) -> None:
    import uvicorn
    from .progress import log
    if max_bytes <= 0:
        raise GraftError(f"--max-bytes {max_bytes}: must be positive")
    limits = limits or Limits()
    check_address(host, port)  # before the model loads: a busy port is said in a second, not after
    set_threads(threads or default_threads())
    app = create_app(run_dir, max_bytes, max_batch=max_batch, wait_ms=wait_ms, tta=tta, limits=limits)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"[yellow]warning: listening on {host}: the server has no authentication[/]")
    log(f"serving {run_dir} at http://{host}:{port} (POST /predict, GET /health, GET /info)")
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=access_log,
                http=timed_protocol(limits.header_timeout, limits.body_timeout),
                timeout_keep_alive=limits.keep_alive, limit_concurrency=limits.max_connections)


def check_address(host: str, port: int) -> None:
    """One line for an address the server cannot listen on (a port in use, a host not of this
    machine), instead of uvicorn's exit after the model has loaded."""
    import socket
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, OverflowError) as e:
        raise GraftError(f"--host {host} --port {port}: not an address to listen on ({e})") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(addr)
        except OSError as e:
            raise GraftError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port "
                             "or stop what is using it") from None


def add_commands(sub) -> dict:
    p = sub.add_parser("serve", help="HTTP inference for a run or ensemble (FastAPI + uvicorn)")
    p.add_argument("run")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=number(int, 0, 65535), default=8000)
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                   help=f"largest accepted upload in bytes (default {DEFAULT_MAX_BYTES:,})")
    p.add_argument("--threads", type=int, help="torch threads for inference (default: half the cores, at most 4)")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--max-batch", type=int, default=16,
                   help="largest micro-batch of concurrent requests per model pass (1: one at a time; default 16)")
    p.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="how long a request may wait for others to join its batch (default 0)")
    p.add_argument("--tta", action="store_true",
                   help="score each image and its mirror and average (twice the work per request)")
    add_limit_flags(p)

    def cmd_serve(args) -> None:
        serve(args.run, args.host, args.port, args.max_bytes, args.threads, args.access_log,
              args.max_batch, args.batch_wait_ms, args.tta, limits_from(args))
    return {"serve": cmd_serve}
