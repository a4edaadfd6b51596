"""`graft serve` against hostile clients, on a real server subprocess: uploads that decode to huge
images, decompression bombs, slow request heads and bodies, idle connections and clients that leave
mid-upload, beside normal traffic. The server must keep its memory within a bound derived from its
pixel budget, keep answering normal requests at close to their usual speed, cut slow clients off
within its timeouts and never answer 500 or print a traceback."""
import io
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from graftnet import config, serve
from graftnet.data.images import square_uint8
from graftnet.serve_limits import DEFAULT_PIXEL_BUDGET, DecodeBudget, UploadError
from graftnet.train.pipeline import train

from .conftest import ROOT, make_folder, make_image, tiny_overrides

# Short timeouts keep the test quick; the memory limits are the defaults.
TIMEOUTS = {"--header-timeout": 2.0, "--body-timeout": 2.0, "--keep-alive": 1.0}
SLACK_S = 1.5  # on top of a timeout: scheduling on a busy 2-core machine
BYTES_PER_PIXEL = 8  # decode peak per budgeted pixel (7 measured: RGBA + the RGB square) and a margin
RSS_SLACK_MB = 150  # request bodies, threads' stacks, allocator slack


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def huge_rgba_png() -> bytes:
    """6300 x 6300 RGBA (39.7 M pixels, under MAX_PIXELS) in ~170 KB: 160 MB once decoded."""
    return png_bytes(Image.new("RGBA", (6300, 6300), (30, 120, 200, 128)), optimize=True)


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h grey pixels, with one compressed row of data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * (w + 1))) + chunk(b"IEND", b""))


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    make_image(0, np.random.default_rng(0), size=64).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    return train(config.resolve(None, tiny_overrides(make_folder(tmp / "data", n=8), tmp,
                                                      **{"train.epochs": 1})))


class Server:
    def __init__(self, run: Path, log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url, self.log = f"http://127.0.0.1:{self.port}", log
        cmd = [sys.executable, "-m", "graftnet.cli", "serve", str(run), "--port", str(self.port)]
        cmd += [str(x) for kv in TIMEOUTS.items() for x in kv]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"),
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.time() + 120
        while time.time() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError(f"server did not start: {log.read_text()[-2000:]}")

    def memory_mb(self, key: str = "VmRSS") -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        raise KeyError(key)

    def reset_peak(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS

    def stderr(self) -> str:
        return self.log.read_text()

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=30)


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    s = Server(run, tmp_path_factory.mktemp("server") / "stderr.log")
    yield s
    s.proc.terminate()
    s.proc.wait(timeout=30)


def assert_quiet(server: Server) -> None:
    err = server.stderr()
    assert "Traceback" not in err and "Exception in ASGI application" not in err, err[-3000:]


def normal_load(url: str, stop: threading.Event, out: list, threads: int = 2) -> list[threading.Thread]:
    """Each thread posts a small PNG again and again until `stop`; appends (seconds, status)."""
    image = png_bytes(make_image(1, np.random.default_rng(1), size=64))

    def loop():
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                r = c.post(f"{url}/predict", content=image, headers={"content-type": "image/png"})
                out.append((time.perf_counter() - t0, r.status_code))
    workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    return workers


def timed_normal_load(url: str, seconds: float) -> list:
    stop, out = threading.Event(), []
    workers = normal_load(url, stop, out)
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join(30)
    return out


def test_memory_and_latency_hold_under_huge_uploads(server):
    """8 uploads at once of a 170 KB PNG that decodes to 160 MB, twice each, decompression bombs
    and clients leaving mid-head and mid-body, beside normal traffic: peak memory within baseline +
    pixel budget x 8 bytes and back near the baseline after, normal latency within 2x, 200 or 503
    + Retry-After for the huge ones, 413 for the bombs, no 500, no traceback."""
    timed_normal_load(server.url, 1.0)  # warm the connection pools and the allocator
    alone = timed_normal_load(server.url, 3.0)
    baseline = server.memory_mb()
    server.reset_peak()
    huge, bomb, beyond = huge_rgba_png(), png_header_only(100_000, 100_000), png_header_only(7000, 7000)
    hostile: list = []

    def upload(data: bytes, times: int):
        with httpx.Client(timeout=60) as c:
            for _ in range(times):
                r = c.post(f"{server.url}/predict", content=data, headers={"content-type": "image/png"})
                hostile.append((len(data), r.status_code, r.headers.get("retry-after")))
    def nuisance():  # meanwhile: heads and bodies left half-sent, by clients that then leave
        while not stop.is_set():
            for start in (b"POST /predict HTTP/1.1\r\nHost: x\r\n", b"POST /predict HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Type: image/png\r\nContent-Length: 99999\r\n\r\n" + huge[:5000]):
                with server.connect() as s:
                    s.sendall(start)
                    time.sleep(0.2)
    stop, together = threading.Event(), []
    workers = normal_load(server.url, stop, together) + [threading.Thread(target=nuisance, daemon=True)]
    workers[-1].start()
    attackers = [threading.Thread(target=upload, args=(huge, 2)) for _ in range(8)]
    attackers += [threading.Thread(target=upload, args=(data, 3)) for data in (bomb, beyond)]
    for a in attackers:
        a.start()
    for a in attackers:
        a.join(120)
    stop.set()
    for w in workers:
        w.join(30)
    peak = server.memory_mb("VmHWM")
    time.sleep(1.0)
    after = server.memory_mb()
    bound = baseline + DEFAULT_PIXEL_BUDGET * BYTES_PER_PIXEL / 2**20 + RSS_SLACK_MB
    median_alone = statistics.median(t for t, _ in alone)
    median_together = statistics.median(t for t, _ in together)
    print(f"RSS baseline {baseline:.0f} MB, peak {peak:.0f} MB (bound {bound:.0f}), after {after:.0f} MB; "
          f"normal median {median_alone * 1000:.1f} ms alone, {median_together * 1000:.1f} ms beside "
          f"{len(hostile)} hostile uploads {sorted({s for _, s, _ in hostile})}")
    assert {s for _, s in alone + together} == {200}
    assert peak <= bound
    assert after <= baseline + RSS_SLACK_MB  # the burst's memory went back
    assert median_together <= 2 * median_alone
    huge_status = [s for n, s, _ in hostile if n == len(huge)]
    assert len(huge_status) == 16 and set(huge_status) <= {200, 503} and 200 in huge_status
    assert all(retry and int(retry) >= 1 for _, s, retry in hostile if s == 503)
    assert [s for n, s, _ in hostile if n != len(huge)] == [413] * 6
    assert_quiet(server)


def read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and when (seconds from now)."""
    t0, got = time.perf_counter(), b""
    sock.settimeout(limit)
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return got, time.perf_counter() - t0


def test_slow_and_idle_clients_are_cut_off(server):
    """Idle connections, request heads sent a line at a time, bodies that stall (while read, and
    after an early 413): each closed within its timeout; a slow head or body gets 408."""
    head_t, body_t, idle_t = (TIMEOUTS[k] for k in ("--header-timeout", "--body-timeout", "--keep-alive"))
    results = {}

    def idle():
        with server.connect() as s:
            results["idle"] = read_until_closed(s, head_t + 10)

    def slow_head():
        with server.connect() as s:
            t0 = time.perf_counter()
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
            try:
                for i in range(40):  # a header line every 0.25 s: the head never ends by itself
                    time.sleep(0.25)
                    s.sendall(b"X-%d: y\r\n" % i)
            except OSError:  # closed by the server
                pass
            got, _ = read_until_closed(s, 1)
            results["slow_head"] = got, time.perf_counter() - t0

    def stalled_body(length: int):
        with server.connect() as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                      b"Content-Length: %d\r\n\r\n" % length + b"\x89PNG" * 25)
            results[length] = read_until_closed(s, body_t + 10)

    def after_response():
        with server.connect() as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            results["keep_alive"] = read_until_closed(s, idle_t + 10)

    def trickle_after_413():
        with server.connect() as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                      b"Content-Length: 99999999\r\n\r\n")
            for _ in range(12):  # 3 s of a body nobody reads, slowly: each piece re-arms the timeout
                time.sleep(0.25)
                s.sendall(b"x" * 10)
            results["after_413"] = read_until_closed(s, body_t + 10)  # then it stops: cut off

    jobs = [idle, slow_head, lambda: stalled_body(100_000), after_response, trickle_after_413]
    threads = [threading.Thread(target=j) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    print({k: (v[0][:12], round(v[1], 2)) for k, v in results.items()})
    assert results["idle"][0] == b"" and results["idle"][1] <= head_t + SLACK_S
    assert results["slow_head"][0].startswith(b"HTTP/1.1 408") and results["slow_head"][1] <= head_t + SLACK_S
    got, waited = results[100_000]
    assert got.startswith(b"HTTP/1.1 408") and b"stalled" in got and waited <= body_t + SLACK_S
    got, waited = results["keep_alive"]
    assert got.startswith(b"HTTP/1.1 200") and waited <= idle_t + SLACK_S
    got, waited = results["after_413"]
    assert got.startswith(b"HTTP/1.1 413") and waited <= body_t + SLACK_S
    assert_quiet(server)


def test_clients_leaving_mid_upload_are_quiet(server):
    """A client that closes its connection halfway through a raw or multipart body: no traceback in
    the server's log, and the server goes on answering."""
    head = b"--zz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n"
    for ctype, first in ((b"image/png", b"\x89PNG" * 250), (b"multipart/form-data; boundary=zz", head + b"\1" * 900)):
        for _ in range(3):
            with server.connect() as s:
                s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nContent-Length: 100000\r\n\r\n"
                          % ctype + first)
                time.sleep(0.1)
    time.sleep(0.5)
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert_quiet(server)


@pytest.fixture(scope="module")
def client(run):
    return TestClient(serve.create_app(run))


@pytest.mark.parametrize("data, status, message", [
    (jpeg_bytes()[:20], 400, "corrupt or truncated JPEG"),  # cut inside its header
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, 400, "corrupt or truncated PNG"),
    (b"GIF89a\x10\x00", 400, "corrupt or truncated GIF"),
    (b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\0" * 8, 400, "corrupt or truncated WEBP"),
    (b"BM" + b"\0" * 10, 400, "corrupt or truncated BMP"),
    (b"RIFF\x10\x00\x00\x00WAVEfmt " + b"\0" * 8, 415, "not an image"),
    (b"hello, no image here", 415, "not an image"),
    (png_header_only(100_000, 100_000), 413, "at most 40,000,000 pixels"),  # PIL's own bomb check
    (png_header_only(7000, 7000), 413, "7000x7000"),
])
def test_corrupt_images_are_400_and_non_images_415(client, data, status, message):
    r = client.post("/predict", content=data, headers={"content-type": "image/png"})
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_budget_refuses_when_full_and_lets_small_ones_pass():
    import asyncio

    async def scenario():
        budget = DecodeBudget(pixels=100, slots=2)
        async with budget.hold(80, 1):
            t0 = time.perf_counter()
            with pytest.raises(UploadError) as e:  # does not fit while the 80 are in flight
                async with budget.hold(30, 0.2):
                    pass
            assert e.value.status == 503 and e.value.headers["Retry-After"] == "1"
            assert 0.15 < time.perf_counter() - t0 < 1
            async with budget.hold(20, 0.2):  # fits beside them: no wait
                assert budget.free_pixels == 0 and budget.free_slots == 0
            big = asyncio.create_task(budget.hold(50, 2).__aenter__())
            await asyncio.sleep(0.1)
            assert not big.done()  # waiting for the 80 to go
        await asyncio.wait_for(big, 1)  # granted once they went
        assert budget.free_pixels == 50 and budget.refused == 1
        budget.release(50)
        assert (budget.free_pixels, budget.free_slots) == (100, 2)
        async with budget.hold(10, 1), budget.hold(10, 1):  # both slots taken by large decodes
            async with budget.hold(5, 0.1, slot=False):  # a small image needs none
                assert (budget.free_pixels, budget.free_slots) == (75, 0)
        assert (budget.free_pixels, budget.free_slots) == (100, 2)
    asyncio.run(scenario())


def test_decode_square_gives_the_old_pixels():
    """The banded decode gives exactly the pixels of decoding the whole image the way `graft
    predict` does (to_rgb or grayscale, then square_uint8), for every kind of image."""
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (411, 157, 4), dtype=np.uint8), "RGBA")
    p = rgba.convert("RGB").quantize(64)
    images = [rgba, rgba.convert("LA"), rgba.convert("L"), p, rgba.convert("1"),
              Image.fromarray(rng.integers(100, 60000, (157, 411), dtype=np.uint16))]
    encoded = [png_bytes(im) for im in images] + [png_bytes(p, transparency=3)]
    for fmt in ("JPEG", "GIF", "WEBP"):
        buf = io.BytesIO()
        (rgba.convert("CMYK") if fmt == "JPEG" else rgba).save(buf, fmt)
        encoded.append(buf.getvalue())
    for data in encoded:
        for gray in (False, True):
            for size in (32, 224):
                want = square_uint8(serve.open_image(data, gray), size)
                got = serve.decode_square(serve.open_upload(data), gray, size)
                assert torch_equal(want, got), (Image.open(io.BytesIO(data)).mode, gray, size)


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())
