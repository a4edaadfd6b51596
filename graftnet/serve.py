"""HTTP inference for a finished run or ensemble: `graft serve RUN [--host 127.0.0.1] [--port 8000]`.

    POST /predict   an image: multipart/form-data with the file in field `file`, or the image itself
                    as the body with an image/* content type; ?top=K (default 3).
                    -> {"class", "probability", "top": [{"class", "probability"}, ...]}
    GET  /health    {"status": "ok"} once the model is loaded
    GET  /info      classes, backbone, input size (and members with weights for an ensemble)

The model is loaded once, before the server binds its port, and warmed up with one image. Bad input
gets a 4xx with a message, never a 500: a wrong content type 415, bytes that are no image 415, a
corrupt image or a missing `file` field 400, an upload over --max-bytes 413. The size is counted
while the body arrives (and a Content-Length over the limit is refused before reading), so an
oversized upload never sits in memory whole. Decoding runs in worker threads in parallel; the model
runs one request at a time under a lock with a fixed number of torch threads (default_threads), which
on a small CPU is as fast as running several at once and keeps memory flat.
"""

import io  # no `from __future__ import annotations`: FastAPI reads the route annotations
import threading
from pathlib import Path

import torch
from PIL import Image

from .data.images import grayscale, square_uint8, to_rgb
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
        raise UploadError(415, f"not an image this server can decode ({type(e).__name__}: {e})") from None
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


def create_app(run_dir: str | Path, max_bytes: int = DEFAULT_MAX_BYTES, predictor=None):
    """The FastAPI app serving one run or ensemble folder (loaded here, once)."""
    from fastapi import FastAPI, Query, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse
    from .evaluation import top_classes
    from .predictor import load_predictor
    if predictor is None:
        predictor = load_predictor(run_dir)
    info = {**predictor.info(), "max_bytes": max_bytes}
    lock = threading.Lock()

    def classify(data: bytes, top: int) -> dict:
        x = square_uint8(open_image(data, predictor.cfg.data.grayscale), predictor.image_size)  # decoding runs outside the lock
        with lock, torch.inference_mode():
            probs = predictor([x]).softmax(1)[0]
        return top_classes(probs, predictor.classes, top)

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
        return info

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
          max_bytes: int = DEFAULT_MAX_BYTES, threads: int | None = None, access_log: bool = False) -> None:
    import uvicorn
    from .progress import log
    if max_bytes <= 0:
        raise GraftError(f"--max-bytes {max_bytes}: must be positive")
    set_threads(threads or default_threads())
    app = create_app(run_dir, max_bytes)
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

    def cmd_serve(args) -> None:
        serve(args.run, args.host, args.port, args.max_bytes, args.threads, args.access_log)
    return {"serve": cmd_serve}
