"""Hostile input: looping and dangling links, ZIP bombs and escaping member names, one-class data,
1x1 images, and property-based trees of folders, archives and damaged images. Every case ends in
a data source and decoded images, or in one DataError; nothing is ever written outside the data."""
from __future__ import annotations

import io
import os
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st
from PIL import Image

from .conftest import make_folder, make_image, zip_folder
from graftnet.data.files import list_images
from graftnet.data.images import decode, load_images, make_splits, square_uint8
from graftnet.data.pixels import read_squares, readable, square_array
from graftnet.data.sources import MAX_MEMBER_BYTES, open_source
from graftnet.errors import DataError, GraftError


def load_all(path, skip_bad=False):
    src = open_source(str(path))
    samples = [s for split in src.splits.values() for s in split]
    return load_images(src, samples, 32, skip_bad=skip_bad, workers=1)


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


_PICTURE = make_image(1, np.random.default_rng(0), size=20)
IMAGES = {fmt: encode(_PICTURE, fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")}


# ---------------------------------------------------------------- symbolic links

@pytest.mark.parametrize("kind,words", [("loop", "symbolic link loops"),
                                        ("dangling", "symbolic link to a missing file")])
def test_broken_links_name_the_link_and_skip_bad_skips_them(tmp_path, kind, words):
    root = make_folder(tmp_path / "d", n=2)
    link = root / "cat" / "a.png"
    if kind == "loop":
        os.symlink("b.png", link)
        os.symlink("a.png", root / "cat" / "b.png")
    else:
        os.symlink("gone.png", link)
    with pytest.raises(DataError, match=words) as e:
        load_all(root)
    assert str(link) in str(e.value)
    images = load_all(root, skip_bad=True)
    assert len(images) == 6 and all(words in s for s in images.skipped)
    assert str(link) in images.skipped[0]


def test_folder_links_are_followed_but_never_around_a_loop(tmp_path, capsys):
    root = make_folder(tmp_path / "d", classes=("cat", "dog"), n=2)
    make_folder(tmp_path / "elsewhere", classes=("fox",), n=2)
    os.symlink(tmp_path / "elsewhere" / "fox", root / "fox")   # a class kept in another place
    os.symlink("..", root / "cat" / "up")                      # back to the data's own root
    os.symlink(root, tmp_path / "elsewhere" / "fox" / "data")  # and round through the other place
    src = open_source(str(root))
    assert src.classes == ["cat", "dog", "fox"] and len(src.splits["all"]) == 6
    err = capsys.readouterr().err
    assert f"{root / 'cat' / 'up'}: symbolic link back to a folder above it; not followed" in err
    assert len(load_all(root)) == 6


# ---------------------------------------------------------------- ZIP archives

def zip_with(tmp_path, name: str, data: bytes, method=zipfile.ZIP_DEFLATED) -> Path:
    archive = zip_folder(make_folder(tmp_path / "d", n=2), tmp_path / "d.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    return archive


@pytest.mark.parametrize("size,words", [(MAX_MEMBER_BYTES + 1, "over the 64 MiB"),
                                        (5 << 20, "over 100:1")],
                         ids=["too_large", "bomb_ratio"])
def test_zip_bombs_are_refused_before_reading(tmp_path, size, words):
    archive = zip_with(tmp_path, "cat/bomb.png", bytes(size))
    assert archive.stat().st_size < size // 100
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=words) as e:
        load_all(archive)
    assert f"{archive}:cat/bomb.png" in str(e.value) and time.perf_counter() - t0 < 2
    images = load_all(archive, skip_bad=True)
    assert len(images) == 6 and "cat/bomb.png" in images.skipped[0]


def declare_size(archive: Path, name: str, size: int) -> None:
    """Rewrite a member's uncompressed size in both its headers, leaving its data as it was."""
    raw = bytearray(archive.read_bytes())
    at = raw.find(b"PK\x01\x02")
    while at >= 0:
        n = int.from_bytes(raw[at + 28:at + 30], "little")
        if raw[at + 46:at + 46 + n] == name.encode():
            local = int.from_bytes(raw[at + 42:at + 46], "little")
            raw[at + 24:at + 28] = raw[local + 22:local + 26] = size.to_bytes(4, "little")
        at = raw.find(b"PK\x01\x02", at + 4)
    archive.write_bytes(bytes(raw))


def test_zip_member_that_lies_about_its_size_is_not_read_past_it(tmp_path):
    archive = zip_with(tmp_path, "cat/liar.png", bytes(3 << 20))
    declare_size(archive, "cat/liar.png", 1000)
    assert zipfile.ZipFile(archive).getinfo("cat/liar.png").file_size == 1000
    with pytest.raises(DataError, match="cannot read the file") as e:
        load_all(archive)
    assert f"{archive}:cat/liar.png" in str(e.value)


def test_zip_member_compressed_with_an_unbounded_method_is_refused(tmp_path):
    archive = zip_with(tmp_path, "cat/x.png", IMAGES["PNG"], zipfile.ZIP_BZIP2)
    with pytest.raises(DataError, match="compressed with bzip2") as e:
        load_all(archive)
    assert f"{archive}:cat/x.png" in str(e.value)


def test_zip_members_that_could_escape_are_ignored_with_one_line(tmp_path, capsys):
    folder = make_folder(tmp_path / "d", n=2)
    archive = zip_folder(folder, tmp_path / "d.zip")
    escaping = ["/etc/x.png", "../x.png", "cat/../../y.png", "C:/evil.png", "cat\\..\\..\\z.png",
                "\\\\server\\share\\w.png"]
    with zipfile.ZipFile(archive, "a") as zf:
        for name in escaping:
            zf.writestr(zipfile.ZipInfo(name), IMAGES["PNG"])
        zf.writestr(zipfile.ZipInfo("dog\\win.png"), IMAGES["PNG"])  # made on Windows: a separator
    src = open_source(str(archive))
    assert src.classes == ["cat", "dog", "fox"] and len(src.splits["all"]) == 7
    assert "dog\\win.png" in [k for k, _ in src.splits["all"]]
    lines = [x for x in capsys.readouterr().err.splitlines() if "could leave" in x]
    assert len(lines) == 1 and str(archive) in lines[0] and all(n in lines[0] for n in escaping)
    assert len(load_all(archive)) == 7


# ---------------------------------------------------------------- one class

@pytest.mark.parametrize("layout", ["flat", "splits", "wrapped_zip"])
def test_one_class_is_an_error_naming_it(tmp_path, layout):
    if layout == "flat":
        data = make_folder(tmp_path / "d", classes=("cat",), n=3)
    elif layout == "splits":
        data = make_folder(tmp_path / "d", classes=("cat",), splits={"train": 3, "test": 2})
    else:
        data = zip_folder(make_folder(tmp_path / "d", classes=("cat",), n=3), tmp_path / "d.zip", "export/")
    with pytest.raises(DataError, match="has one class, cat .*a classifier needs at least two") as e:
        open_source(str(data))
    assert str(data) in str(e.value)


def test_one_class_is_one_line_from_the_cli(tmp_path, capsys):
    from graftnet.cli import main
    data = make_folder(tmp_path / "d", classes=("cat",), n=3)
    assert main(["preview", "--data", str(data), "--out", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"error: {data}: the data has one class, cat" in err


def test_one_class_allowed_when_asked(tmp_path):
    data = make_folder(tmp_path / "d", classes=("cat",), n=3)
    assert open_source(str(data), min_classes=1).classes == ["cat"]


# ---------------------------------------------------------------- decoding

def test_one_pixel_image_decodes_to_a_writable_array_without_a_warning():
    img = decode(encode(Image.new("RGB", (1, 1), (9, 8, 7)), "PNG"), "dot.png")
    assert square_array(img, 32).flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = square_uint8(img, 32)
    assert t.tolist() == [[[9]], [[8]], [[7]]]


def test_predict_messages_name_the_file_and_no_flag(tmp_path):
    folder = tmp_path / "inbox"
    folder.mkdir()
    (folder / "ok.png").write_bytes(IMAGES["PNG"])
    os.symlink("loop2.png", folder / "loop1.png")
    os.symlink("loop1.png", folder / "loop2.png")
    os.symlink("nowhere.png", folder / "gone.png")
    (folder / "album.png").mkdir()                           # a folder with an image's name
    (folder / "album.png" / "inside.jpg").write_bytes(IMAGES["JPEG"])
    (folder / "cut.png").write_bytes(IMAGES["PNG"][:40])
    paths = list_images(folder)
    assert [p.name for p in paths] == ["inside.jpg", "cut.png", "gone.png", "loop1.png", "loop2.png", "ok.png"]
    decoded = read_squares(paths, 32)
    errors = {p.name: d for p, d in zip(paths, decoded) if isinstance(d, str)}
    assert set(errors) == {"cut.png", "gone.png", "loop1.png", "loop2.png"}
    assert "symbolic link loops" in errors["loop1.png"]
    assert "symbolic link to a missing file (nowhere.png)" in errors["gone.png"]
    for name, message in errors.items():
        assert message.startswith(f"{folder / name}: ") and "skip-bad" not in message and " at 0x" not in message
    with pytest.raises(DataError, match="symbolic link to a missing file") as e:
        list_images(folder / "gone.png")
    assert str(folder / "gone.png") in str(e.value)


# ---------------------------------------------------------------- properties

FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])


def damaged(data: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(st.just(data), st.integers(0, len(data)).map(lambda n: data[:n]),
                     st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)).map(
                         lambda f: data[:f[0]] + bytes([data[f[0]] ^ f[1]]) + data[f[0] + 1:]))


WHOLE = st.sampled_from(list(IMAGES.values()))
CONTENT = st.one_of(*[damaged(d) for d in IMAGES.values()], st.binary(max_size=300))
PICTURE = st.one_of(WHOLE, WHOLE, CONTENT)       # mostly images, so that many data sets open
WORD = st.one_of(st.sampled_from(["cat", "dog", "fox", "a b", "x\ny", "Ünï", "猫", ".DS_Store", "__MACOSX"]),
                 st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\\\0"),
                         min_size=1, max_size=8)).filter(lambda s: s not in (".", ".."))
SUFFIX = st.sampled_from([".png", ".jpg", ".png", ".gif", ".bmp", ".webp", ".txt", ""])


@st.composite
def data_set(draw) -> list[tuple[list[str], bytes]]:
    """(path parts, bytes) of a data set as a user makes one: a wrapper folder or none, split
    folders or none, one to three classes (one: the one-class error), files of any name."""
    wrapper = draw(st.lists(WORD, max_size=1))
    splits = draw(st.sampled_from([[], ["train", "test"], ["train"], ["train", "val", "test"]]))
    n = draw(st.sampled_from([2, 3, 1, 2, 3]))
    classes = draw(st.lists(WORD, min_size=n, max_size=n, unique=True))
    files = []
    for split in splits or [None]:
        for c in classes:
            for name, suffix, data in draw(st.lists(st.tuples(WORD, SUFFIX, PICTURE), min_size=1, max_size=2)):
                files.append(([*wrapper, *([split] if split else []), c, name + suffix], data))
    return files


# extra entries anywhere: names in any encoding, undecodable bytes too, and links that go wrong
BYTES_NAME = st.binary(min_size=1, max_size=10).map(
    lambda b: b.replace(b"/", b"_").replace(b"\0", b"_").replace(b".", b"_", 1))
PLACE = st.one_of(st.sampled_from([b"train", b"test", b"cat", b"dog"]), WORD.map(str.encode), BYTES_NAME)
EXTRA = st.tuples(st.lists(PLACE, min_size=1, max_size=3), SUFFIX.map(str.encode),
                  st.sampled_from(["file", "dir", "dangling", "loop", "uplink"]), CONTENT)


def build_tree(root: bytes, files, extras) -> None:
    entries = [([p.encode() for p in parts], b"", "file", data) for parts, data in files] + extras
    for parts, suffix, kind, data in entries:
        path = os.path.join(root, *parts[:-1], parts[-1] + suffix)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if kind == "file":
                with open(path, "wb") as f:
                    f.write(data)
            elif kind == "dir":
                os.makedirs(path, exist_ok=True)
            else:
                os.symlink({"dangling": b"missing" + suffix, "loop": os.path.basename(path),
                            "uplink": b".."}[kind], path)
        except OSError:  # a name taken already (a file where a folder was to be): left out
            pass


def opens_or_says_why(location: str) -> None:
    """The CLI's way in: open, split, decode (skipping and not). Only a GraftError may stop it."""
    try:
        src = open_source(location)
        make_splits(src, 0.1, 0.2, seed=0)
    except GraftError as e:
        event("refused: " + str(e).rsplit(": ", 1)[-1][:30].encode("ascii", "replace").decode())
        return
    samples = [s for split in src.splits.values() for s in split]
    kept = load_images(src, samples, 16, skip_bad=True, workers=1)
    assert len(kept) + len(kept.skipped) == len(samples)
    event(f"opened, {'some' if kept.skipped else 'no'} files skipped")
    try:
        assert len(load_images(src, samples, 16, workers=1)) == len(samples)
    except GraftError:
        assert kept.skipped


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working folder of its own, and a check that nothing appeared beside the data."""
    monkeypatch.chdir(tmp_path)

    def run(make, check):
        before = sorted(os.listdir(tmp_path))
        with tempfile.TemporaryDirectory(dir=tmp_path) as d:
            check(make(Path(d)))
        assert sorted(os.listdir(tmp_path)) == before
    return run


# PIL warns, rather than fails, on some truncated TIFFs (the image decodes in part)
PIL_TIFF = pytest.mark.filterwarnings("ignore:Truncated File Read")


@PIL_TIFF
@FUZZ
@given(files=data_set(), extras=st.lists(EXTRA, max_size=4))
def test_any_folder_tree_opens_or_fails_with_one_data_error(sandbox, files, extras):
    def make(d):
        build_tree(os.fsencode(d / "data"), files, extras)
        return str(d / "data")
    sandbox(make, opens_or_says_why)


# member names in every form: absolute, a drive, "..", Windows separators, trailing separators
SEGMENT = st.one_of(st.sampled_from(["train", "test", "cat", "dog", "..", ".", "", "C:"]), WORD)
MEMBER = st.tuples(st.sampled_from(["", "/", "\\", "./", "../", "C:\\"]), st.lists(SEGMENT, min_size=1, max_size=3),
                   st.sampled_from(["/", "\\"]), st.sampled_from(["", ".png", ".jpg", ".txt", "/", "\\"])
                   ).map(lambda m: m[0] + m[2].join(m[1]) + m[3])
METHOD = st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2,
                          zipfile.ZIP_LZMA])


def build_zip(path: Path, members, damage) -> None:
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as zf:
        warnings.simplefilter("ignore")  # duplicate names are part of the test
        for name, data, method in members:
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    if damage is not None:
        raw = bytearray(path.read_bytes())
        at, bits = damage
        if bits == 0:
            del raw[at % (len(raw) + 1):]
        else:
            raw[at % len(raw)] ^= bits
        path.write_bytes(bytes(raw))


@PIL_TIFF
@FUZZ
@given(files=data_set(), lead=st.sampled_from(["", "./", "/"]), sep=st.sampled_from(["/", "/", "\\"]),
       methods=st.lists(METHOD, min_size=1), extras=st.lists(st.tuples(MEMBER, CONTENT, METHOD), max_size=5),
       damage=st.none() | st.none() | st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)))
def test_any_zip_opens_or_fails_with_one_data_error(sandbox, files, lead, sep, methods, extras, damage):
    members = [(lead + sep.join(parts), data, methods[i % len(methods)]) for i, (parts, data) in enumerate(files)]
    def make(d):
        build_zip(d / "data.zip", members + extras, damage)
        return str(d / "data.zip")
    sandbox(make, opens_or_says_why)


@settings(FUZZ, max_examples=600)
@given(data=CONTENT, suffix=st.sampled_from([".png", ".jpg", ".webp", ".tif", ".txt"]))
def test_any_bytes_decode_or_fail_with_one_data_error(sandbox, data, suffix):
    def check(d):
        path = d / f"photo{suffix}"
        path.write_bytes(data)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            decoded = read_squares([path], 16)           # predict's way in
            try:
                image = readable(path, decoded) and decoded[0]
            except DataError as e:
                assert str(e).startswith(f"{path}: ") and " object at 0x" not in str(e)
                return
            assert image.dtype == np.uint8 and image.shape[0] == 3 and image.flags.writeable
            square_uint8(decode(data, str(path)), 16)    # load_images' way in
        assert not [w for w in caught if "not writable" in str(w.message)]
    sandbox(lambda d: d, check)
