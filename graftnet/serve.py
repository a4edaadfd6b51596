"""HTTP inference for a finished run or ensemble: `graft serve RUN [--host 127.0.0.1] [--port 8000]`.

    POST /predict   an image: multipart/form-data with the file in field `file`, or the image itself
                    as the body with an image/* content type; ?top=K (default 3).
                    -> {"class", "probability", "top": [{"class", "probability"}, ...]}
    GET  /health    {"status": "ok"} once the model is loaded
    GET  /info      classes, backbone, input size, whether mirrors are scored too (`tta`: --tta, or
                    an ensemble saved with --tta), and members with weights for an ensemble

The model is loaded once, before the server binds its port, and warmed up with one image. Bad input
gets a 4xx with a message, never a 500: a wrong content type 415, bytes that are no image 415, a
corrupt image or a missing `file` field 400, an upload over --max-bytes 413. The size is counted
while the body arrives (and a Content-Length over the limit is refused before reading), so an
oversized upload never sits in memory whole. Decoding runs in worker threads in parallel; the model
runs in one thread with a fixed number of torch threads (default_threads), on micro-batches: the
requests waiting when a pass starts go through together (MicroBatcher), up to --max-batch, so
concurrent load costs one pass over the weights per batch instead of one per request, while a lone
request waits for nobody (--batch-wait-ms 0).
"""

import collections
import io  # no `from __future__ import annotations`: FastAPI reads the route annotations
import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import torch
from PIL import Image

from .data.images import grayscale, square_uint8, to_rgb
from .data.pixels import unreadable_reason
from .errors import GraftError

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 40_000_000  # a 1 KB PNG can claim 100k x 100k pixels: refuse before decoding it
MULTIPART_SLACK = 16 * 1024  # boundaries and part headers around the file in a multipart body


class UploadError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def open_image(data: bytes, gray: bool = False) -> Image.Image:
    """Decode uploaded bytes to RGB (luminance in all three channels for `gray` runs, as they were
    trained), or raise UploadError saying what is wrong with them."""
    if not data:
        raise UploadError(400, "empty upload: no image bytes received")
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as e:  # UnidentifiedImageError, DecompressionBombError, ...
        raise UploadError(415, f"not an image this server can decode ({unreadable_reason(e)})") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise UploadError(413, f"image is {w}x{h} pixels; at most {MAX_PIXELS:,} pixels are accepted")
    try:
        img.load()
        return grayscale(img) if gray else to_rgb(img)
    except Exception as e:  # truncated or corrupt data after a valid header
        raise UploadError(400, f"corrupt or truncated {img.format} image ({type(e).__name__}: {e})") from None


async def read_upload(request, max_bytes: int) -> bytes:
    """The uploaded image's bytes; the body is counted as it arrives and refused past the limit."""
    from starlette.requests import Request
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
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise too_large
        return message

    counted = Request(request.scope, counted_receive)
    if not multipart:
        return b"".join([chunk async for chunk in counted.stream()])
    try:
        form = await counted.form(max_files=1, max_fields=16, max_part_size=MULTIPART_SLACK)
    except UploadError:
        raise
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
               max_batch: int = 16, wait_ms: float = 0.0, tta: bool = False):
    """The FastAPI app serving one run or ensemble folder (loaded here, once). `tta`: score each
    upload and its mirror (an ensemble saved with --tta does so without it)."""
    from fastapi import FastAPI, Query, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse
    from .evaluation import top_classes
    from .predictor import flip_tta, load_predictor
    if predictor is None:
        predictor = load_predictor(run_dir)
    if tta:
        flip_tta(predictor)
    info = {**predictor.info(), "max_bytes": max_bytes}

    def probabilities(images: list) -> torch.Tensor:
        with torch.inference_mode():
            return predictor(images).softmax(1)

    batcher = MicroBatcher(probabilities, max_batch, wait_ms)

    def classify(data: bytes, top: int) -> dict:
        x = square_uint8(open_image(data, predictor.cfg.data.grayscale), predictor.image_size)  # decoded in parallel
        return top_classes(batcher(x), predictor.classes, top)

    classify(_blank_png(), 1)  # warm-up: the first request is not the slow one
    app = FastAPI(title="graftnet", description=f"image classifier served from {run_dir}")

    @app.exception_handler(UploadError)
    async def upload_error(request, exc: UploadError):
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info")
    async def get_info():
        return {**info, "max_batch": max_batch, "batches_by_size": dict(sorted(list(batcher.sizes.items())))}

    @app.post("/predict")
    async def predict(request: Request, top: int = Query(3, ge=1, le=1000)):
        data = await read_upload(request, max_bytes)
        return await run_in_threadpool(classify, data, top)

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
          max_batch: int = 16, wait_ms: float = 0.0, tta: bool = False) -> None:
    import uvicorn
    from .progress import log
    if max_bytes <= 0:
        raise GraftError(f"--max-bytes {max_bytes}: must be positive")
    set_threads(threads or default_threads())
    app = create_app(run_dir, max_bytes, max_batch=max_batch, wait_ms=wait_ms, tta=tta)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"[yellow]warning: listening on {host}: the server has no authentication[/]")
    log(f"serving {run_dir} at http://{host}:{port} (POST /predict, GET /health, GET /info)")
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=access_log)


def add_commands(sub) -> dict:
    p = sub.add_parser("serve", help="HTTP inference for a run or ensemble (FastAPI + uvicorn)")
    p.add_argument("run")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="largest accepted upload")
    p.add_argument("--threads", type=int, help="torch threads for inference (default: half the cores, at most 4)")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--max-batch", type=int, default=16,
                   help="largest micro-batch of concurrent requests per model pass (1: one at a time)")
    p.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="how long a request may wait for others to join its batch (default 0)")
    p.add_argument("--tta", action="store_true",
                   help="score each image and its mirror and average (twice the work per request)")

    def cmd_serve(args) -> None:
        serve(args.run, args.host, args.port, args.max_bytes, args.threads, args.access_log,
              args.max_batch, args.batch_wait_ms, args.tta)
    return {"serve": cmd_serve}
