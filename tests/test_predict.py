"""`graft predict` as a user meets it: a folder with a bad file in it, and output into a pipe."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from graftnet import config
from graftnet.cli import main
from graftnet.data.pixels import decode
from graftnet.errors import DataError
from graftnet.export import exporter
from graftnet.train.pipeline import train

from .conftest import ROOT, make_folder, tiny_overrides

# long enough that an 80-column table would wrap the rows and cut the names
CLASSES = ("airplane_seen_from_below_at_dusk", "automobile_parked_on_a_wet_street",
           "bird_on_a_branch_in_the_rain")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    data = make_folder(tmp / "data", classes=CLASSES, splits={"train": 8, "test": 3})
    run_dir = Path(train(config.resolve(None, tiny_overrides(data, tmp, **{"train.epochs": 1,
                                                                           "backbone.precision": "fp32"}))))
    exporter.export_run(run_dir)
    return run_dir


@pytest.fixture
def inbox(run, tmp_path):
    """Four readable images, one file that is no image at all, one truncated PNG."""
    data = config.resolve(run / "config.yaml").data.path
    folder = tmp_path / "inbox"
    folder.mkdir()
    for i, cls in enumerate(CLASSES):
        shutil.copy(f"{data}/test/{cls}/000.png", folder / f"{i}_{cls}.png")
    shutil.copy(f"{data}/test/{CLASSES[0]}/001.png", folder / "3_more.png")
    (folder / "1b_broken.jpg").write_bytes(np.random.default_rng(0).bytes(300))
    (folder / "2b_cut.png").write_bytes((folder / "3_more.png").read_bytes()[:200])
    return folder


def test_undecodable_file_message_names_the_path_not_a_buffer(tmp_path):
    where = str(tmp_path / "photo.jpg")
    with pytest.raises(DataError) as e:
        decode(b"not an image at all", where)
    assert str(e.value).startswith(f"{where}: ") and "object at 0x" not in str(e.value)
    assert "BytesIO" not in str(e.value)


@pytest.mark.parametrize("onnx", [False, True])
def test_predict_folder_reports_bad_files_and_goes_on(run, inbox, capsys, onnx):
    assert main(["predict", str(run), str(inbox), "--json"] + ["--onnx"] * onnx) == 0
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert [r["file"].rsplit("/", 1)[1] for r in results] == sorted(p.name for p in inbox.iterdir())
    bad = {r["file"].rsplit("/", 1)[1]: r["error"] for r in results if "error" in r}
    assert set(bad) == {"1b_broken.jpg", "2b_cut.png"}
    assert "truncated" in bad["2b_cut.png"] and all("0x" not in e and "--skip-bad" not in e for e in bad.values())
    assert sum("class" in r for r in results) == 4
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 2 and str(inbox / "1b_broken.jpg") in skipped[0]

    assert main(["predict", str(run), str(inbox)] + ["--onnx"] * onnx) == 0
    out = capsys.readouterr().out
    assert "predictions (4 images; 2 unreadable, skipped)" in out and "broken" not in out


def test_predict_one_bad_file_is_one_clear_error(run, inbox, capsys):
    assert main(["predict", str(run), str(inbox / "1b_broken.jpg")]) == 2
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("error:"))
    assert str(inbox / "1b_broken.jpg") in line and "0x" not in line and "--skip-bad" not in line
    for f in inbox.iterdir():
        if f.name not in ("1b_broken.jpg", "2b_cut.png"):
            f.unlink()
    assert main(["predict", str(run), str(inbox)]) == 2  # nothing readable: nothing to predict
    assert "none of the 2 image files could be read" in capsys.readouterr().err


def _piped(*args) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run([sys.executable, "-m", "graftnet.cli", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT, check=True,
                         env={**env, "PYTHONPATH": str(ROOT), "GRAFTNET_QUIET": "1"})
    return out.stdout.splitlines()


def test_piped_predict_table_keeps_rows_and_names_whole(run, inbox):
    for f in (inbox / "1b_broken.jpg", inbox / "2b_cut.png"):
        f.unlink()
    lines = _piped("predict", str(run), str(inbox), "--top", "3")
    rows = [[c.strip() for c in line.strip("│ ").split("│")] for line in lines if line.startswith("│")]
    assert sorted(r[0] for r in rows) == sorted(p.name for p in inbox.iterdir())  # one line each
    for file, cls, probability, top in rows:
        assert cls in CLASSES and float(probability) > 0  # whole names, not "airp…"
        assert [t.rsplit(" ", 1)[0] for t in top.split(", ")] == sorted(CLASSES, key=top.index)


def test_piped_backbones_list_is_not_wrapped():
    lines = _piped("backbones")
    assert any(line.startswith("efficientnet_lite0 ") and "tf_efficientnet_lite0" in line for line in lines)
    assert "any timm architecture name works too: hub weights when online, --weights FILE offline" in lines
