"""Data sources, decoding and bad input: layouts, image modes, clear errors, safe pickles, CIFAR."""
from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from .conftest import make_folder, make_image, zip_folder
from graftnet.cli import main
from graftnet.data.images import decode, load_images, make_splits, square_uint8
from graftnet.data.sources import CIFAR10_CLASSES, find_cifar10, open_source
from graftnet.errors import DataError
from graftnet.safe_pickle import UnsafePickleError, safe_loads


def load_all(path, skip_bad=False):
    src = open_source(str(path))
    samples = [s for split in src.splits.values() for s in split]
    return load_images(src, samples, 32, skip_bad=skip_bad, workers=1)


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


JPEG = encode(make_image(0, np.random.default_rng(0), size=64), "JPEG")


# ---------------------------------------------------------------- layouts

def test_flat_folder_splits_are_stratified_and_seeded(image_folder):
    src = open_source(str(image_folder))
    assert src.classes == ["cat", "dog", "fox"]
    assert list(src.splits) == ["all"] and len(src.splits["all"]) == 3 * 14
    a = make_splits(src, 0.1, 0.2, seed=0)
    assert set(a) == {"train", "val", "test"}
    for name, samples in a.items():
        assert {label for _, label in samples} == {0, 1, 2}, name
    everything = a["train"] + a["val"] + a["test"]
    assert sorted(everything) == sorted(src.splits["all"])  # disjoint and complete
    assert make_splits(src, 0.1, 0.2, seed=0) == a
    assert sorted(make_splits(src, 0.1, 0.2, seed=1)["test"]) != sorted(a["test"])


@pytest.mark.parametrize("held", ["test", "val"])  # val/ alone is used as the test split
def test_split_folder_keeps_its_held_out_split(tmp_path, held):
    src = open_source(str(make_folder(tmp_path / "d", splits={"train": 8, held: 4})))
    assert src.classes == ["cat", "dog", "fox"] and set(src.splits) == {"train", held}
    s = make_splits(src, 0.1, 0.2, seed=0)
    assert s["test"] == src.splits[held] and len(s["test"]) == 12
    assert sorted(s["train"] + s["val"]) == sorted(src.splits["train"])


@pytest.mark.parametrize("splits", [None, {"train": 4, "test": 2}], ids=["flat", "split"])
@pytest.mark.parametrize("prefix", ["", "cifar10/"], ids=["bare", "wrapped"])
def test_zip_read_in_place(tmp_path, splits, prefix):
    folder = make_folder(tmp_path / "d", n=4, splits=splits)
    archive = zip_folder(folder, tmp_path / "d.zip", prefix)
    src = open_source(str(archive))
    assert src.classes == ["cat", "dog", "fox"]
    assert set(src.splits) == ({"all"} if splits is None else {"train", "test"})
    images = load_all(archive)
    assert len(images) == (12 if splits is None else 18)
    assert images.images[0].shape == (3, 24, 24)


def add_junk(root):
    for junk in (".DS_Store", "cat/.DS_Store", "cat/._000.png", "Thumbs.db", ".hidden/x.png",
                 "__MACOSX/cat/._000.png", "README.md"):  # none of these may be read as an image
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_bytes(b"\0 not an image")
    return root


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_junk_and_readme_ignored(tmp_path, as_zip):
    root = add_junk(make_folder(tmp_path / "d", n=3))
    path = zip_folder(root, tmp_path / "d.zip") if as_zip else root
    src = open_source(str(path))
    assert src.classes == ["cat", "dog", "fox"] and len(src.splits["all"]) == 9
    assert len(load_all(path)) == 9  # nothing junk is decoded


def test_readme_beside_split_folders_in_wrapped_zip(tmp_path):
    root = make_folder(tmp_path / "d", n=2, splits={"train": 3, "test": 2})
    (root / "README.txt").write_text("CIFAR-like export\n")
    src = open_source(str(zip_folder(root, tmp_path / "d.zip", "cifar10/")))
    assert src.classes == ["cat", "dog", "fox"] and set(src.splits) == {"train", "test"}


def test_max_per_class(tmp_path):
    flat_folder = make_folder(tmp_path / "flat", n=14)
    split_folder = make_folder(tmp_path / "split", splits={"train": 14, "test": 6})
    flat = make_splits(open_source(str(flat_folder)), 0.1, 0.2, seed=0, max_per_class=5)
    for label in range(3):
        assert sum(lab == label for part in flat.values() for _, lab in part) == 5
    split = make_splits(open_source(str(split_folder)), 0.1, 0.2, seed=0, max_per_class=5)
    for label in range(3):
        assert sum(lab == label for part in ("train", "val") for _, lab in split[part]) == 5
        assert sum(lab == label for _, lab in split["test"]) == 5


# ---------------------------------------------------------------- image modes

def mode_image(mode: str) -> Image.Image:
    """10x10 image in `mode`; its left half is transparent where the mode allows it."""
    if mode == "L":
        return Image.new("L", (10, 10), 100)
    if mode == "RGBA":
        img = Image.new("RGBA", (10, 10), (255, 0, 0, 255))
        img.paste((0, 0, 255, 0), (0, 0, 5, 10))
        return img
    if mode == "P":
        img = Image.new("P", (10, 10), 0)
        img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
        img.paste(1, (5, 0, 10, 10))
        img.info["transparency"] = 0
        return img
    img = Image.fromarray(np.tile(np.arange(10, dtype=np.uint16) * 6000, (10, 1)))
    assert img.mode == "I;16"
    return img


@pytest.mark.parametrize("mode,left,right", [
    ("L", (100, 100, 100), (100, 100, 100)),
    ("RGBA", (255, 255, 255), (255, 0, 0)),  # transparent over white
    ("P", (255, 255, 255), (0, 255, 0)),
    ("I;16", (0, 0, 0), (255, 255, 255)),    # 16-bit range stretched to 8 bits
])
def test_modes_decode_to_rgb_uint8(mode, left, right):
    t = square_uint8(decode(encode(mode_image(mode)), "x.png"), 32)
    assert t.dtype == torch.uint8 and tuple(t.shape) == (3, 10, 10)
    assert tuple(t[:, 5, 0].tolist()) == left and tuple(t[:, 5, 9].tolist()) == right


def test_square_crop_shrinks_but_never_enlarges():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 10:30] = 200  # the centre square is bright, the sides dark
    cropped = square_uint8(Image.fromarray(arr), 64)
    assert tuple(cropped.shape) == (3, 20, 20) and (cropped == 200).all()
    assert tuple(square_uint8(Image.fromarray(arr), 8).shape) == (3, 8, 8)


# ---------------------------------------------------------------- bad input

def with_bad_file(tmp_path, name, data):
    root = make_folder(tmp_path / "d", n=3)
    (root / "cat" / name).write_bytes(data)
    return root


@pytest.mark.parametrize("name,data,what", [
    ("broken.jpg", np.random.default_rng(1).bytes(500), "corrupt"),
    ("half.jpg", JPEG[: len(JPEG) // 2], "truncated"),
    ("notes.txt", b"some notes", "not an image file"),
])
def test_bad_files_name_the_file(tmp_path, name, data, what):
    root = with_bad_file(tmp_path, name, data)
    with pytest.raises(DataError, match=what) as e:
        load_all(root)
    assert str(root / "cat" / name) in str(e.value)
    images = load_all(root, skip_bad=True)
    assert len(images) == 9 and len(images.skipped) == 1 and name in images.skipped[0]


def test_skip_bad_lists_every_skipped_file(tmp_path):
    root = with_bad_file(tmp_path, "broken.jpg", b"\xff\xd8 not really")
    (root / "dog" / "notes.txt").write_text("hi")
    images = load_all(root, skip_bad=True)
    assert len(images) == 9 and all(k.endswith(".png") for k in images.keys)
    assert sorted(s.split(":")[0].rsplit("/", 1)[-1] for s in images.skipped) == ["broken.jpg", "notes.txt"]


def test_damaged_zip_member(tmp_path):
    archive = zip_folder(make_folder(tmp_path / "d", n=2), tmp_path / "d.zip")
    src = open_source(str(archive))
    key = src.splits["all"][0][0]
    info = zipfile.ZipFile(archive).getinfo(key)
    raw = bytearray(archive.read_bytes())
    raw[info.header_offset + 30 + len(info.filename) + len(info.extra) + 50] ^= 0xFF  # inside the data
    archive.write_bytes(bytes(raw))
    src = open_source(str(archive))
    with pytest.raises(DataError, match="cannot read") as e:
        load_images(src, src.splits["all"], 32, workers=1)
    assert f"{archive}:{key}" in str(e.value)
    images = load_images(src, src.splits["all"], 32, skip_bad=True, workers=1)
    assert len(images) == 5 and key in images.skipped[0]


@pytest.mark.parametrize("case,pattern", [
    ("empty_class", r"class folder\(s\) wolf contain no files"),
    ("missing_in_test", r"missing from test/: fox"),
    ("extra_in_test", r"in test/ but not in train/: wolf"),
    ("no_path", r"does not exist"),
    ("zip_no_classes", r"no class folders found"),
    ("loose_image", r"image stray.png lies outside any class folder"),
    ("not_data", r"not a folder, ZIP archive or CIFAR-10"),
])
def test_layout_errors_name_the_place(tmp_path, case, pattern):
    d = tmp_path / "d"
    if case == "empty_class":
        make_folder(d, n=2)
        (d / "wolf").mkdir()
    elif case == "missing_in_test":
        make_folder(d, splits={"train": 2})
        make_folder(d, classes=("cat", "dog"), splits={"test": 1})
    elif case == "extra_in_test":
        make_folder(d, splits={"train": 2})
        make_folder(d, classes=("cat", "dog", "fox", "wolf"), splits={"test": 1})
    elif case == "zip_no_classes":
        d = tmp_path / "d.zip"
        with zipfile.ZipFile(d, "w") as zf:
            zf.writestr("README.txt", "a ZIP with no class folders")
    elif case == "loose_image":
        make_folder(d, n=2)
        make_image(0, np.random.default_rng(0)).save(d / "stray.png")
    elif case == "not_data":
        d = tmp_path / "data.bin"
        d.write_bytes(b"neither a zip nor a folder")
    with pytest.raises(DataError, match=pattern) as e:
        load_all(d)
    assert str(d) in str(e.value)


# ---------------------------------------------------------------- CLI

def error_line(capsys) -> str:
    err = capsys.readouterr().err  # the rich console writes to stderr
    assert "Traceback" not in err
    return next(x for x in err.splitlines() if x.startswith("error:"))


def test_cli_preview_corrupt_file_is_one_line_error(tmp_path, capsys):
    root = make_folder(tmp_path / "d", classes=("cat", "dog"), n=3)
    (root / "bad").mkdir()  # a one-image class always stays in train, so preview reads it
    (root / "bad" / "broken.jpg").write_bytes(b"garbage bytes, not a jpeg")
    assert main(["preview", "--data", str(root), "--out", str(tmp_path / "p.png")]) == 2
    line = error_line(capsys)
    assert str(root / "bad" / "broken.jpg") in line and "corrupt" in line
    assert not (tmp_path / "p.png").exists()


def test_cli_train_missing_data_path(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code = main(["train", "--data", str(missing), "--out", str(tmp_path / "runs"),
                 "--backbone", "test_efficientnet", "--no-pretrained"])
    assert code == 2
    line = error_line(capsys)
    assert str(missing) in line and "does not exist" in line


# ---------------------------------------------------------------- safe pickles

class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


def test_safe_loads_plain_data():
    obj = {"a": np.arange(6, dtype=np.uint8).reshape(2, 3), "b": [1, 2.5, "x"], "c": b"\x00\x01"}
    for protocol in (2, 4, 5):
        out = safe_loads(pickle.dumps(obj, protocol=protocol))
        assert np.array_equal(out["a"], obj["a"]) and out["a"].dtype == np.uint8
        assert out["b"] == obj["b"] and out["c"] == obj["c"]


def test_safe_loads_refuses_code_and_garbage(tmp_path):
    marker = tmp_path / "pwned"
    data = pickle.dumps({"x": _Evil(f"touch {marker}")})
    with pytest.raises(UnsafePickleError, match=r"(posix|os)\.system"):
        safe_loads(data, "evil.pkl")
    assert not marker.exists()
    with pytest.raises(UnsafePickleError, match="not a readable pickle"):
        safe_loads(b"\x93garbage\x00\x01 not a pickle")


# ---------------------------------------------------------------- CIFAR-10 archive

def fake_cifar(path, n=2, bytes_keys=True, skip=()):
    rng = np.random.default_rng(0)
    batches = {}
    with tarfile.open(path, "w:gz") as tar:
        for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
            if name in skip:
                continue
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            labels = [(i * n + j) % 10 for j in range(n)]
            batch = {b"data": data, b"labels": labels} if bytes_keys else {"data": data, "labels": labels}
            blob = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
            batches[name] = (data, labels)
    return batches


@pytest.mark.parametrize("bytes_keys", [True, False], ids=["bytes_keys", "str_keys"])
def test_cifar_archive(tmp_path, bytes_keys):
    path = tmp_path / "cifar-10-python.tar.gz"
    batches = fake_cifar(path, bytes_keys=bytes_keys)
    src = open_source(str(path))
    assert src.classes == CIFAR10_CLASSES
    assert len(src.splits["train"]) == 10 and len(src.splits["test"]) == 2
    assert [lab for _, lab in src.splits["train"]] == [lab for k in range(1, 6)
                                                        for lab in batches[f"data_batch_{k}"][1]]
    images = load_images(src, src.splits["test"][:1], 32, workers=1)
    expected = batches["test_batch"][0][0].reshape(3, 32, 32)
    assert np.array_equal(images.images[0].numpy(), expected)


def test_cifar_archive_missing_batch(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    fake_cifar(path, skip=("data_batch_5",))
    with pytest.raises(DataError, match="missing data_batch_5") as e:
        open_source(str(path))
    assert str(path) in str(e.value)


def test_find_cifar10(tmp_path, monkeypatch):
    monkeypatch.delenv("GRAFTNET_CIFAR10", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="--data"):
        find_cifar10(cache_dir=str(tmp_path / "cache"), download=False, search_shared=False)
    cached = tmp_path / "cache" / "datasets" / "cifar-10-python.tar.gz"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert find_cifar10(cache_dir=str(tmp_path / "cache"), download=False, search_shared=False) == cached
    monkeypatch.setenv("GRAFTNET_CIFAR10", str(tmp_path / "mine.zip"))
    (tmp_path / "mine.zip").write_bytes(b"x")
    assert find_cifar10(cache_dir=str(tmp_path / "cache"), download=False) == tmp_path / "mine.zip"


# ---------------------------------------------------------------- decoded-image cache

def _decoded(root, cache, skip_bad=False, size=16):
    from graftnet.data.decoded import load_images_cached
    src = open_source(str(root))
    samples = sorted((k, lab) for split in src.splits.values() for k, lab in split)
    return load_images_cached(src, samples, size, skip_bad, 1, None, False, cache)


def test_decoded_cache_serves_the_second_load_without_decoding(tmp_path, monkeypatch):
    import graftnet.data.decoded as decoded
    root = with_bad_file(tmp_path, "broken.jpg", b"\xff\xd8 not really")
    first = _decoded(root, tmp_path / "cache", skip_bad=True)
    assert len(list((tmp_path / "cache" / "decoded").glob("*.safetensors"))) == 1

    def no_decoding(*a, **k):
        raise AssertionError("decoded again")
    monkeypatch.setattr(decoded, "load_images", no_decoding)
    second = _decoded(root, tmp_path / "cache", skip_bad=True)
    assert second.keys == first.keys and torch.equal(second.labels, first.labels)
    assert second.skipped == first.skipped and len(second.skipped) == 1
    assert all(torch.equal(a, b) for a, b in zip(first.images, second.images))
    with pytest.raises(AssertionError, match="decoded again"):  # skip_bad is part of the key
        _decoded(root, tmp_path / "cache", skip_bad=False)
    with pytest.raises(AssertionError, match="decoded again"):  # so is the size
        _decoded(root, tmp_path / "cache", skip_bad=True, size=8)


def test_decoded_cache_follows_the_files_and_survives_damage(tmp_path):
    root = make_folder(tmp_path / "d", n=3)
    first = _decoded(root, tmp_path / "cache")
    (entry,) = (tmp_path / "cache" / "decoded").glob("*.safetensors")
    entry.write_bytes(b"garbage")  # a damaged entry is decoded again, never trusted
    again = _decoded(root, tmp_path / "cache")
    assert all(torch.equal(a, b) for a, b in zip(first.images, again.images))
    victim = sorted((root / "cat").iterdir())[0]
    Image.new("RGB", (20, 20), (255, 0, 0)).save(victim)  # new content: a new entry, new pixels
    changed = _decoded(root, tmp_path / "cache")
    i = changed.keys.index(next(k for k in changed.keys if k.endswith(victim.name) and "cat" in k))
    assert changed.images[i][0].float().mean() > 250
    assert len(list((tmp_path / "cache" / "decoded").glob("*.safetensors"))) == 2


def test_decoded_cache_keeps_images_of_different_sizes(tmp_path):
    root = tmp_path / "d"
    for cls, side in (("big", 30), ("small", 6)):  # squares are shrunk to 16, never enlarged
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (side, side), (i * 50, 0, 0)).save(root / cls / f"{i}.png")
    first = _decoded(root, tmp_path / "cache")
    again = _decoded(root, tmp_path / "cache")
    assert sorted({tuple(im.shape) for im in again.images}) == [(3, 6, 6), (3, 16, 16)]
    assert all(torch.equal(a, b) for a, b in zip(first.images, again.images))
