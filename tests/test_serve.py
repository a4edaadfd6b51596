"""`graft serve`: predict / health / info through FastAPI's TestClient, every kind of bad upload
answered with a 4xx and a message, and a short load test against a real server subprocess."""
import asyncio
import io
import json
import os
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from graftnet import config, serve
from graftnet.ensemble import build_ensemble
from graftnet.evaluation import predict
from graftnet.train.pipeline import train

from .conftest import ROOT, make_folder, tiny_overrides

CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    data = make_folder(tmp / "data", n=14)
    a = train(config.resolve(None, tiny_overrides(data, tmp, name="a")))
    b = train(config.resolve(None, tiny_overrides(data, tmp, name="b", **{"backbone.image_size": 40,
                                                                          "train.epochs": 1})))
    return data, a, b


@pytest.fixture(scope="module")
def client(runs):
    return TestClient(serve.create_app(runs[1], max_bytes=4000))


def png(size=24, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


def test_predict_health_info(runs, client):
    data, a, _ = runs
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert info["classes"] == CLASSES and info["backbone"] == "test_efficientnet"
    assert info["image_size"] == 32 and info["max_bytes"] == 4000
    image = data / "fox" / "002.png"
    expected = predict(a, image, top=3)[0]
    r = client.post("/predict", files={"file": ("x.png", image.read_bytes(), "image/png")})
    assert r.status_code == 200
    body = r.json()
    assert body["class"] == expected["class"]
    assert body["probability"] == pytest.approx(expected["probability"], abs=1e-5)
    assert [t["class"] for t in body["top"]] == [t["class"] for t in expected["top"]]
    # the same image as a raw body, and a JPEG with another content type, and ?top
    raw = client.post("/predict?top=2", content=image.read_bytes(), headers={"content-type": "image/png"})
    assert raw.status_code == 200 and raw.json()["class"] == body["class"] and len(raw.json()["top"]) == 2
    buf = io.BytesIO()
    Image.open(image).save(buf, "JPEG")
    r = client.post("/predict", content=buf.getvalue(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200 and r.json()["class"] in CLASSES


@pytest.mark.parametrize("kwargs, status, message", [
    ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported content type"),
    ({"content": b"{}", "headers": {"content-type": "application/json"}}, 415, "'file'"),
    ({"content": b"not an image at all", "headers": {"content-type": "image/png"}}, 415, "not an image"),
    ({"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty upload"),
    ({"content": png()[:60], "headers": {"content-type": "image/png"}}, 400, "truncated"),
    ({"files": {"image": ("x.png", png(), "image/png")}}, 400, "missing file field"),
    ({"data": {"file": "just text"}, "files": {"other": ("a.txt", b"x", "text/plain")}}, 400,
     "missing file field"),
    ({"files": {"file": ("x.txt", b"plain text", "text/plain")}}, 415, "not an image"),
    ({"content": b"garbage", "headers": {"content-type": "multipart/form-data; boundary=zz"}}, 400,
     "multipart"),
    ({"content": os.urandom(5000), "headers": {"content-type": "image/png"}}, 413, "limit of 4,000"),
    ({"files": {"file": ("big.png", os.urandom(5000), "image/png")}}, 413, "limit"),
])
def test_bad_uploads_get_4xx_with_a_message(client, kwargs, status, message):
    r = client.post("/predict", **kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def _stream(content_type: bytes, chunks: list[bytes]):
    """A Request whose body arrives chunk by chunk; returns it and the list of chunks handed out."""
    from starlette.requests import Request
    sent = []

    async def receive():
        sent.append(len(sent))
        return {"type": "http.request", "body": chunks[len(sent) - 1], "more_body": len(sent) < len(chunks)}
    scope = {"type": "http", "method": "POST", "path": "/predict", "query_string": b"",
             "headers": [(b"content-type", content_type)]}
    return Request(scope, receive), sent


@pytest.mark.parametrize("multipart", [False, True])
def test_size_is_checked_while_reading(multipart):
    if multipart:
        head = b'--zz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        request, sent = _stream(b"multipart/form-data; boundary=zz", [head] + [b"\1" * 1000] * 100)
    else:  # no Content-Length (chunked): the limit is counted as the chunks arrive
        request, sent = _stream(b"image/png", [b"\1" * 1000] * 100)
    with pytest.raises(serve.UploadError) as e:
        asyncio.run(serve.read_upload(request, 4000))
    assert e.value.status == 413
    limit = 4000 + (serve.MULTIPART_SLACK if multipart else 0)
    assert len(sent) <= limit // 1000 + 2  # refused as soon as the limit was passed, not at the end
    request, sent = _stream(b"image/png", [b"\1" * 1000] * 3)
    assert len(asyncio.run(serve.read_upload(request, 4000))) == 3000


def test_pixel_cap_and_bad_query(client, monkeypatch):
    monkeypatch.setattr(serve, "MAX_PIXELS", 30 * 30)
    r = client.post("/predict", content=png(size=40), headers={"content-type": "image/png"})
    assert r.status_code == 413 and "40x40 pixels" in r.json()["detail"]
    assert client.post("/predict?top=0", content=png(), headers={"content-type": "image/png"}).status_code == 422
    assert client.get("/predict").status_code == 405


def test_serves_an_ensemble(runs, tmp_path):
    data, a, b = runs
    ens = build_ensemble([a, b], str(data), out=tmp_path, name="ens")
    with TestClient(serve.create_app(ens)) as c:
        info = c.get("/info").json()
        assert info["kind"] == "ensemble" and info["image_size"] == 40
        assert [m["image_size"] for m in info["members"]] == [32, 40]
        image = data / "cat" / "001.png"
        r = c.post("/predict", files={"file": ("c.png", image.read_bytes(), "image/png")})
        assert r.status_code == 200
        assert r.json()["probability"] == pytest.approx(predict(ens, image)[0]["probability"], abs=1e-5)
    with TestClient(serve.create_app(ens, tta=True)) as c:   # --tta: each upload and its mirror
        assert c.get("/info").json()["tta"] and all(m["tta"] for m in c.get("/info").json()["members"])
        r = c.post("/predict", files={"file": ("c.png", image.read_bytes(), "image/png")})
        flipped = predict(ens, image, tta=True)[0]["probability"]
        assert flipped != pytest.approx(predict(ens, image)[0]["probability"], abs=1e-4)
        assert r.json()["probability"] == pytest.approx(flipped, abs=1e-5)


def test_load_in_a_real_server_subprocess(runs):
    """bench/serve_load.py, shortened: zero errors, bounded RSS growth, latency percentiles."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "serve_load.py"), str(runs[1]),
                          "--requests", "300", "--concurrency", "4", "--max-rss-growth-mb", "24"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0, out.stderr
    assert result["errors"] == 0 and result["requests"] == 300 and result["ok"]
    assert result["rss_growth_mb"] <= 24 and result["rss_mb"]["end"] > 50  # a real process was measured
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]
    assert sum(int(k) * v for k, v in result["batches_by_size"].items()) >= 300  # + the warm-up


def test_micro_batcher_groups_waiting_requests_and_routes_each_answer():
    import threading
    import time

    import torch
    seen = []

    def slow_double(xs):
        seen.append(len(xs))
        time.sleep(0.05)  # while this pass runs, the other requests queue up
        return [torch.tensor(2 * x) for x in xs]

    batcher = serve.MicroBatcher(slow_double, max_batch=4)
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, int(batcher(i)))) for i in range(9)]
    for t in threads:
        t.start()
        time.sleep(0.002)
    for t in threads:
        t.join(5)
    assert results == {i: 2 * i for i in range(9)}  # each request got its own row
    assert 2 <= max(seen) <= 4 and sum(seen) == 9  # batched, never beyond max_batch
    assert sum(batcher.sizes.values()) == len(seen)

    def broken(xs):
        raise ValueError("model failed")
    with pytest.raises(ValueError, match="model failed"):
        serve.MicroBatcher(broken)(1)  # the error reaches the caller instead of hanging it
    with pytest.raises(Exception, match="max-batch"):
        serve.MicroBatcher(slow_double, max_batch=0)


def test_concurrent_requests_answer_like_single_ones(runs):
    from concurrent.futures import ThreadPoolExecutor
    app = serve.create_app(runs[1], max_batch=8)
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 0)] * 4
    with TestClient(app) as c:
        alone = {col: c.post("/predict", content=png(color=col), headers={"content-type": "image/png"}).json()
                 for col in set(colors)}
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda col: c.post("/predict", content=png(color=col),
                                                        headers={"content-type": "image/png"}).json(), colors))
        info = c.get("/info").json()
    for col, answer in zip(colors, together):
        assert answer["class"] == alone[col]["class"]
        assert answer["probability"] == pytest.approx(alone[col]["probability"], abs=1e-5)
    assert info["max_batch"] == 8 and sum(int(k) * v for k, v in info["batches_by_size"].items()) >= 16
