"""Decoded images on disk (data/records.py, data/decoded.py, data/decoding.py): the records hold
exactly the pixels memory would, a run read from disk equals the run held in memory, worker
processes decode what threads decode, and damaged or cut-short records are decoded again."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from graftnet import config
from graftnet.data import decoded, decoding
from graftnet.data.images import load_images
from graftnet.data.records import DiskImages, Joined, Picked, available_memory
from graftnet.data.sources import open_source
from graftnet.errors import DataError
from graftnet.model import load_model
from graftnet.train.pipeline import train

from .conftest import make_folder, tiny_overrides, zip_folder


def _mixed_folder(root):
    """Images of several sizes and shapes (some under, some over the size kept), one corrupt."""
    make_folder(root, n=6)
    rng = np.random.default_rng(1)
    for i, (w, h) in enumerate([(50, 20), (19, 33), (64, 64), (7, 7), (100, 41)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "dog" / f"odd{i}.png")
    (root / "fox" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def _samples(source):
    return sorted(s for split in source.splits.values() for s in split)


def test_records_hold_the_pixels_memory_holds(tmp_path):
    source = open_source(str(_mixed_folder(tmp_path / "data")))
    samples = _samples(source)
    mem = load_images(source, samples, 32, skip_bad=True, workers=2)
    disk = load_images(source, samples, 32, skip_bad=True, workers=2, records=tmp_path / "r.records")
    assert isinstance(disk.images, DiskImages) and isinstance(mem.images, list)
    assert disk.keys == mem.keys and torch.equal(disk.labels, mem.labels) and disk.skipped == mem.skipped
    assert len(mem.skipped) == 1 and "broken.png" in mem.skipped[0]
    assert {im.shape[-1] for im in mem.images} == {7, 19, 20, 24, 32}  # never enlarged, shrunk to 32
    for a, b in zip(mem.images, disk.images):
        assert torch.equal(a, b)
    assert disk.images.nbytes == sum(im.numel() for im in mem.images) == os.path.getsize(tmp_path / "r.records")
    assert [torch.equal(a, b) for a, b in zip(disk.images.load(), mem.images)] == [True] * len(mem)
    # subsets and joins stay on disk and read the right records
    idx = [5, 0, 3, 3]
    sub = disk.subset(idx)
    assert isinstance(sub.images, DiskImages) and sub.keys == [mem.keys[i] for i in idx]
    assert all(torch.equal(sub.images[j], mem.images[i]) for j, i in enumerate(idx))
    assert isinstance(sub.subset([1, 0]).images, DiskImages)
    both = disk.joined(mem.subset([2]))
    assert isinstance(both.images, Joined) and len(both) == len(mem) + 1
    assert torch.equal(both.images[-1], mem.images[2]) and torch.equal(both.images[0], mem.images[0])
    assert isinstance(both.subset([0, len(mem)]).images, Picked)
    assert [x.shape for x in disk.images[1:3]] == [mem.images[1].shape, mem.images[2].shape]
    # a bad file without --skip-bad: one line, and no records file left behind looking complete
    with pytest.raises(DataError, match="broken.png.*--skip-bad"):
        load_images(source, samples, 32, records=tmp_path / "s.records")
    assert not list(tmp_path.glob("s.records*"))


def test_processes_decode_what_threads_decode_from_a_zip(tmp_path, monkeypatch):
    """`data.decode_in: processes`: DataLoader workers, each with its own handle on the archive."""
    archive = zip_folder(make_folder(tmp_path / "data", n=40), tmp_path / "data.zip")
    source = open_source(str(archive))
    samples = _samples(source)
    threads = load_images(source, samples, 24, workers=2)
    monkeypatch.setattr(decoding, "CHUNK", 7)  # many hand-overs, a short last one
    seen = []
    real = decoding._in_processes
    monkeypatch.setattr(decoding, "_in_processes", lambda *a: seen.append(1) or real(*a))
    procs = load_images(source, samples, 24, workers=2, records=tmp_path / "p.records", processes=True)
    assert seen
    assert procs.keys == threads.keys
    assert all(torch.equal(a, b) for a, b in zip(procs.images, threads.images))
    # the parent's archive still reads after the workers read theirs
    assert source.read(samples[0][0])[:4] == b"\x89PNG"


def test_cache_places_records_in_memory_or_on_disk_and_redecodes_damage(tmp_path, monkeypatch):
    source = open_source(str(make_folder(tmp_path / "data", n=10)))
    samples = _samples(source)
    cache = tmp_path / "cache"
    args = (source, samples, 24, False, 1, None, False, cache)
    first = decoded.load_images_cached(*args, "no")
    assert isinstance(first.images, DiskImages)
    (records,) = (cache / "decoded").glob("*.records")
    stamp = records.stat().st_mtime_ns
    assert isinstance(decoded.load_images_cached(*args, "yes").images, list)
    # auto: in memory while a quarter of what is available holds them, else on disk
    monkeypatch.setattr(decoded, "available_memory", lambda: 4 * first.images.nbytes)
    assert isinstance(decoded.load_images_cached(*args, "auto").images, list)
    monkeypatch.setattr(decoded, "available_memory", lambda: 4 * first.images.nbytes - 1)
    again = decoded.load_images_cached(*args, "auto")
    assert isinstance(again.images, DiskImages) and records.stat().st_mtime_ns == stamp  # read, not decoded
    # a cut-short records file is decoded again, not trusted
    with open(records, "r+b") as f:
        f.truncate(records.stat().st_size - 5)
    redone = decoded.load_images_cached(*args, "no")
    assert records.stat().st_size == first.images.nbytes
    assert all(torch.equal(a, b) for a, b in zip(redone.images, first.images))
    # no cache folder: records in a temporary folder, the same pixels
    scratch = decoded.load_images_cached(source, samples, 24, False, 1, None, False, None, "no")
    assert isinstance(scratch.images, DiskImages) and not scratch.images.path.startswith(str(cache))
    assert all(torch.equal(a, b) for a, b in zip(scratch.images, first.images))
    assert available_memory() > 0


def _state(run):
    return load_model(run)[0].state_dict()


def test_a_run_read_from_disk_equals_the_run_held_in_memory(image_folder, tmp_path):
    """Frozen head on cached features, then fine-tuning with augmentation: every weight and every
    score the same whether the decoded images sit in memory or are read per batch from records."""
    runs = {}
    for mode in ("yes", "no"):
        cfg = config.resolve(None, tiny_overrides(image_folder, tmp_path, **{
            "train.epochs": 2, "finetune.epochs": 1, "finetune.unfreeze": "top:1", "train.augment": "flip",
            "data.in_memory": mode, "name": f"mem-{mode}", "cache_dir": str(tmp_path / f"cache-{mode}")}))
        runs[mode] = train(cfg)
    a, b = _state(runs["yes"]), _state(runs["no"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads((runs[m] / "test_metrics.json").read_text()) for m in ("yes", "no")]
    assert metrics[0]["accuracy"] == metrics[1]["accuracy"]
    assert list((tmp_path / "cache-no" / "decoded").glob("*.records"))


def test_predict_goes_through_a_folder_a_chunk_at_a_time(image_folder, tmp_path, monkeypatch):
    from graftnet.data import pixels
    from graftnet.evaluation import predict
    run = train(config.resolve(None, tiny_overrides(image_folder, tmp_path, **{"train.epochs": 1})))
    (image_folder / "cat" / "bad.png").write_bytes(b"not an image")
    whole = predict(run, image_folder)
    seen = []
    real = pixels.read_squares
    monkeypatch.setattr(pixels, "PREDICT_CHUNK", 5)
    monkeypatch.setattr(pixels, "read_squares", lambda paths, *a: seen.append(len(paths)) or real(paths, *a))
    chunked = predict(run, image_folder)
    assert max(seen) == 5 and sum(seen) == len(whole)
    assert [r["file"] for r in chunked] == [r["file"] for r in whole]
    assert [r.get("class") for r in chunked] == [r.get("class") for r in whole]
    assert sum("error" in r for r in chunked) == 1
    for r, w in zip(chunked, whole):
        if "probability" in r:
            assert r["probability"] == pytest.approx(w["probability"], abs=1e-6)
    with pytest.raises(DataError, match="bad.png"):
        predict(run, image_folder / "cat" / "bad.png")



def test_multilabel_rows_survive_the_record_cache(tmp_path):
    from graftnet.data.labels import open_data
    from graftnet.config import DataConfig

    from .conftest import make_multilabel_folder
    folder = make_multilabel_folder(tmp_path / "data", n=30)
    source = open_data(DataConfig(path=str(folder), labels="labels.csv"), None)
    samples = _samples(source)
    mem = load_images(source, samples, 24, workers=1)
    args = (source, samples, 24, False, 1, None, False, tmp_path / "cache", "no")
    for disk in (decoded.load_images_cached(*args), decoded.load_images_cached(*args)):  # written, then read
        assert isinstance(disk.images, DiskImages) and disk.labels.shape == (len(samples), len(source.classes))
        assert torch.equal(disk.labels, mem.labels) and disk.keys == mem.keys
