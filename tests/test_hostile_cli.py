"""Every command on a corpus of careless and hostile inputs: each ends in exit code 2 and one line
starting with "error:" (the last line of the output), never a traceback, never an "internal
error", and leaves no half-made run folder behind. The data and model files' own property tests are
in test_hostile_data.py and test_hostile_models.py; the server's in test_serve_hostile.py."""
from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest

from graftnet.cli import main, unexpected
from tests.conftest import TINY, make_folder

RUN_FLAGS = ["--backbone", TINY, "--no-pretrained", "--image-size", "32", "--epochs", "1",
             "--batch-size", "8", "--hidden", "8", "--set", "data.workers=1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A data folder, a finished tiny run, and hostile files beside them."""
    root = tmp_path_factory.mktemp("hostile")
    w = {"root": root, "data": make_folder(root / "data", n=8),
         "other": make_folder(root / "other", classes=("owl", "bat"), n=6),
         "cache": root / "cache", "runs": root / "runs"}
    common = [*RUN_FLAGS, "--cache-dir", str(w["cache"]), "--out", str(w["runs"])]
    assert main(["train", "--data", str(w["data"]), *common, "--name", "good"]) == 0
    w["run"] = w["runs"] / "good"
    assert main(["train", "--data", str(w["other"]), *common, "--name", "owls"]) == 0
    w["owls"] = w["runs"] / "owls"
    w["common"] = common
    (root / "empty").mkdir()
    (root / "text.txt").write_text("not an image and not an archive\n")
    (root / "garbage.zip").write_bytes(os.urandom(2048))
    (root / "binary.yaml").write_bytes(bytes(range(256)))
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "tag.yaml").write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    (root / "bool.yaml").write_text("head:\n  dropout: true\n")
    (root / "garbage.safetensors").write_bytes(os.urandom(4096))
    (root / "garbage.h5").write_bytes(os.urandom(4096))
    (root / "garbage.csv").write_bytes(b"\xff\xfe\x00garbage,,,\n\x00")
    (root / "missing_row.csv").write_text("file,labels\ncat/000.png,cat|dog\ncat/404.png,dog\n")
    (root / "space.yaml").write_text("wingspan: {type: int, low: 1, high: 3}\n")
    (root / "tasks.yaml").write_text("tasks:\n  - {name: a, classes: [cat, unicorn]}\n")
    mixed = make_folder(root / "mixed", classes=("a", "b"), n=3, splits={"train": 3, "test": 2})
    shutil.rmtree(mixed / "test" / "b")
    make_folder(mixed / "test", classes=("c",), n=2, seed=1)
    w["mixed"] = mixed
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("no images here\n")
    bad = root / "corrupt"
    for cls in ("a", "b"):
        (bad / cls).mkdir(parents=True)
        for i in range(3):
            (bad / cls / f"{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(200))
    one = make_folder(root / "one", classes=("cat",), n=4, splits={"train": 4, "test": 2})
    w["one"] = one
    loop = make_folder(root / "loop", classes=("a", "b"), n=3)
    os.symlink("y.png", loop / "a" / "x.png")
    os.symlink("x.png", loop / "a" / "y.png")
    w["loop"] = loop
    with zipfile.ZipFile(root / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as zf:  # 200 MB of zeros
        for cls in ("a", "b"):
            with zf.open(f"{cls}/big.png", "w", force_zip64=True) as f:
                for _ in range(100):
                    f.write(bytes(1 << 20))
    # run folders that are not what they claim
    fake = root / "fake_run"
    fake.mkdir()
    (fake / "config.yaml").write_text("data: {path: nowhere}\n")
    w["fake_run"] = fake
    broken = root / "broken_run"
    shutil.copytree(w["run"], broken)
    (broken / "model.json").write_text("[1, 2]")
    w["broken_run"] = broken
    import socket
    busy = socket.socket()  # a port something else listens on, for the module's lifetime
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    w["busy_socket"], w["busy_port"] = busy, str(busy.getsockname()[1])
    truncated = root / "truncated_run"
    shutil.copytree(w["run"], truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    w["truncated_run"] = truncated
    return w


def P(key: str, sub: str = "") -> str:
    """A placeholder for a path of the world, filled in per case."""
    return "{" + key + "}" + sub


# (id, argv); {key} is replaced by the world's path of that name, {common} by the tiny-run flags
CASES: list[tuple[str, list[str]]] = [
    # data
    ("train-missing-data", ["train", "--data", P("root", "/nowhere"), "{common}"]),
    ("train-data-is-text", ["train", "--data", P("root", "/text.txt"), "{common}"]),
    ("train-empty-folder", ["train", "--data", P("root", "/empty"), "{common}"]),
    ("train-garbage-zip", ["train", "--data", P("root", "/garbage.zip"), "{common}"]),
    ("train-all-corrupt", ["train", "--data", P("root", "/corrupt"), "{common}"]),
    ("train-one-class", ["train", "--data", P("one"), "{common}"]),
    ("train-symlink-loop", ["train", "--data", P("loop"), "{common}"]),
    ("train-zip-bomb", ["train", "--data", P("root", "/bomb.zip"), "{common}"]),
    ("train-data-dev-null", ["train", "--data", "/dev/null", "{common}"]),
    ("train-split-classes-differ", ["train", "--data", P("mixed"), "{common}"]),
    ("train-no-images", ["train", "--data", P("root", "/notes"), "{common}"]),
    ("labels-missing", ["train", "--data", P("data"), "--labels", P("root", "/nowhere.csv"), "{common}"]),
    ("labels-not-utf8", ["train", "--data", P("data"), "--labels", P("root", "/garbage.csv"), "{common}"]),
    ("labels-is-folder", ["train", "--data", P("data"), "--labels", P("root", "/empty"), "{common}"]),
    ("labels-empty-name", ["train", "--data", P("data"), "--labels", " ", "{common}"]),
    ("labels-data-is-zip", ["train", "--data", P("root", "/garbage.zip"), "--labels", P("root", "/garbage.csv"),
                            "{common}"]),
    ("labels-row-names-missing-file", ["train", "--data", P("data"), "--labels", P("root", "/missing_row.csv"),
                                       "{common}"]),
    ("label-separator-empty", ["train", "--data", P("data"), "--labels", P("root", "/missing_row.csv"),
                               "--label-separator", "", "{common}"]),
    ("evaluate-labels-missing", ["evaluate", P("run"), "--labels", P("root", "/nowhere.csv")]),
    ("evaluate-labels-multilabel-on-single-label-run", ["evaluate", P("run"), "--labels", P("root", "/missing_row.csv")]),
    ("preview-labels-missing", ["preview", "--data", P("data"), "--labels", P("root", "/nowhere.csv"),
                                "--out", P("root", "/p.png")]),
    ("label-separator-newline", ["train", "--data", P("data"), "--label-separator", "\n", "{common}"]),
    ("train-out-is-a-file", ["train", "--data", P("data"), "--backbone", TINY, "--no-pretrained",
                             "--epochs", "1", "--out", P("root", "/text.txt")]),
    ("train-cache-dir-is-a-file", ["train", "--data", P("data"), "{common}", "--cache-dir", P("root", "/text.txt")]),
    # configs and values
    ("config-binary", ["train", "--config", P("root", "/binary.yaml"), "--data", P("data"), "{common}"]),
    ("config-list", ["train", "--config", P("root", "/list.yaml"), "--data", P("data"), "{common}"]),
    ("config-python-tag", ["train", "--config", P("root", "/tag.yaml"), "--data", P("data"), "{common}"]),
    ("config-bool-dropout", ["train", "--config", P("root", "/bool.yaml"), "--data", P("data"), "{common}"]),
    ("config-missing", ["train", "--config", P("root", "/nowhere.yaml"), "--data", P("data"), "{common}"]),
    ("config-is-folder", ["train", "--config", P("root", "/empty"), "--data", P("data"), "{common}"]),
    ("set-unknown-key", ["train", "--data", P("data"), "{common}", "--set", "train.epoch=2"]),
    ("set-not-a-number", ["train", "--data", P("data"), "{common}", "--set", "train.lr=fast"]),
    ("set-without-value", ["train", "--data", P("data"), "{common}", "--set", "train.lr"]),
    ("set-lr-nan", ["train", "--data", P("data"), "{common}", "--set", "train.lr=nan"]),
    ("set-lr-inf", ["train", "--data", P("data"), "{common}", "--set", "train.lr=inf"]),
    ("set-section-to-value", ["train", "--data", P("data"), "{common}", "--set", "train=3"]),
    ("epochs-float", ["train", "--data", P("data"), "{common}", "--epochs", "1.5"]),
    ("image-size-15", ["train", "--data", P("data"), "{common}", "--image-size", "15"]),
    ("cut-too-deep", ["train", "--data", P("data"), "{common}", "--cut", "99"]),
    ("hidden-negative", ["train", "--data", P("data"), "{common}", "--hidden", "-5"]),
    ("hidden-text", ["train", "--data", P("data"), "{common}", "--hidden", "wide"]),
    ("image-size-huge", ["train", "--data", P("data"), "{common}", "--image-size", "100000"]),
    ("image-size-negative", ["train", "--data", P("data"), "{common}", "--image-size", "-1"]),
    ("max-per-class-negative", ["train", "--data", P("data"), "{common}", "--max-per-class", "-5"]),
    ("batch-size-zero", ["train", "--data", P("data"), "{common}", "--batch-size", "0"]),
    ("lr-negative", ["train", "--data", P("data"), "{common}", "--lr", "-1"]),
    ("val-fraction-2", ["train", "--data", P("data"), "{common}", "--val-fraction", "2"]),
    ("dropout-1.5", ["train", "--data", P("data"), "{common}", "--dropout", "1.5"]),
    ("unfreeze-bogus", ["finetune", "--data", P("data"), "{common}", "--unfreeze", "some"]),
    ("name-parent", ["train", "--data", P("data"), "{common}", "--name", "../../escaped"]),
    ("name-absolute", ["train", "--data", P("data"), "{common}", "--name", P("root", "/abs")]),
    ("backbone-unknown", ["train", "--data", P("data"), "{common}", "--backbone", "resnet_9000"]),
    ("weights-missing", ["train", "--data", P("data"), "{common}", "--weights", P("root", "/no.safetensors")]),
    ("weights-garbage", ["train", "--data", P("data"), "{common}", "--weights", P("root", "/garbage.safetensors")]),
    ("init-missing", ["train", "--data", P("data"), "{common}", "--init", P("root", "/nowhere")]),
    ("resume-missing", ["train", "--resume", P("root", "/nowhere")]),
    ("resume-not-a-run", ["train", "--resume", P("root", "/empty")]),
    ("lr-find-missing-data", ["lr-find", "--data", P("root", "/nowhere"), "{common}"]),
    ("preview-missing-data", ["preview", "--data", P("root", "/nowhere")]),
    ("preview-n-negative", ["preview", "--data", P("data"), "-n", "-5", "--out", P("root", "/p.png")]),
    # finished runs and what reads them
    ("evaluate-not-a-run", ["evaluate", P("root", "/empty")]),
    ("evaluate-config-only", ["evaluate", P("fake_run")]),
    ("evaluate-model-json-list", ["evaluate", P("broken_run")]),
    ("evaluate-truncated-weights", ["evaluate", P("truncated_run")]),
    ("evaluate-other-classes", ["evaluate", P("run"), "--data", P("other")]),
    ("predict-missing-target", ["predict", P("run"), P("root", "/nowhere.png")]),
    ("predict-corrupt-image", ["predict", P("run"), P("root", "/corrupt/a/0.jpg")]),
    ("predict-empty-folder", ["predict", P("run"), P("root", "/empty")]),
    ("predict-top-zero", ["predict", P("run"), P("data"), "--top", "0"]),
    ("predict-model-json-list", ["predict", P("broken_run"), P("data")]),
    ("predict-onnx-missing", ["predict", P("root", "/nowhere.onnx"), P("data")]),
    ("predict-no-images", ["predict", P("run"), P("root", "/notes")]),
    ("evaluate-data-missing", ["evaluate", P("run"), "--data", P("root", "/nowhere")]),
    ("export-not-a-run", ["export", P("root", "/empty")]),
    ("export-format-bogus", ["export", P("run"), "--format", "pdf"]),
    ("quantize-calibration-zero", ["quantize", P("run"), "--calibration", "0"]),
    ("quantize-truncated-weights", ["quantize", P("truncated_run")]),
    ("prune-amount-1.5", ["prune", P("run"), "--amount", "1.5"]),
    ("prune-amount-negative", ["prune", P("run"), "--amount", "-0.2"]),
    ("prune-steps-zero", ["prune", P("run"), "--steps", "0"]),
    ("distill-teacher-missing", ["distill", "--teacher", P("root", "/nowhere"), "--data", P("data"), "{common}"]),
    ("ensemble-missing-run", ["ensemble", P("run"), P("root", "/nowhere"), "--out", P("runs")]),
    ("ensemble-other-classes", ["ensemble", P("run"), P("owls"), "--out", P("runs")]),
    ("distill-teacher-other-classes", ["distill", "--teacher", P("owls"), "--data", P("data"), "{common}"]),
    ("prune-resume-missing", ["prune", "--resume", P("root", "/nowhere")]),
    ("compare-different-runs", ["compare", P("run"), P("owls")]),
    ("ensemble-one-run", ["ensemble", P("run"), "--out", P("runs")]),
    ("compare-missing", ["compare", P("root", "/nowhere"), P("run")]),
    ("compare-garbage-csv", ["compare", P("root", "/garbage.csv"), P("run")]),
    ("extend-no-new-class", ["extend", P("run"), "--data", P("data")]),
    ("extend-missing-data", ["extend", P("run"), "--data", P("root", "/nowhere")]),
    ("extend-name-parent", ["extend", P("run"), "--data", P("other"), "--name", "../x"]),
    ("serve-missing-run", ["serve", P("root", "/nowhere")]),
    ("serve-broken-run", ["serve", P("broken_run")]),
    ("serve-port-out-of-range", ["serve", P("run"), "--port", "99999"]),
    ("serve-port-in-use", ["serve", P("run"), "--port", "{busy_port}"]),
    ("serve-host-unknown", ["serve", P("run"), "--host", "no-such-host.invalid"]),
    ("serve-pixel-budget-zero", ["serve", P("run"), "--pixel-budget", "0"]),
    ("serve-max-bytes-negative", ["serve", P("run"), "--max-bytes", "-1"]),
    ("search-trials-negative", ["search", "--data", P("data"), "{common}", "--trials", "-1"]),
    ("search-space-binary", ["search", "--data", P("data"), "{common}", "--space", P("root", "/binary.yaml")]),
    ("search-space-list", ["search", "--data", P("data"), "{common}", "--space", P("root", "/list.yaml")]),
    ("search-space-unknown-param", ["search", "--data", P("data"), "{common}", "--space", P("root", "/space.yaml")]),
    ("search-timeout-words", ["search", "--data", P("data"), "{common}", "--timeout", "soon"]),
    ("auto-budget-words", ["auto", "--data", P("data"), "--budget", "soon"]),
    ("auto-missing-data", ["auto", "--data", P("root", "/nowhere"), "--budget", "10m", "--out", P("runs")]),
    ("auto-garbage-zip", ["auto", "--data", P("root", "/garbage.zip"), "--budget", "10m", "--out", P("runs")]),
    ("auto-budget-too-small", ["auto", "--data", P("data"), "--budget", "1s", "--out", P("runs"),
                               "--backbones", f"{TINY}:32", "--set", "backbone.pretrained=false"]),
    ("auto-resume-a-run", ["auto", "--resume", P("run")]),
    ("search-resume-not-a-search", ["search", "--resume", P("run")]),
    ("search-name-parent", ["search", "--data", P("data"), "{common}", "--name", "../x"]),
    ("continual-split-zero", ["continual", "--data", P("data"), "{common}", "--split", "0"]),
    ("continual-split-uneven", ["continual", "--data", P("data"), "{common}", "--split", "2"]),
    ("continual-methods-bogus", ["continual", "--data", P("data"), "{common}", "--split", "3",
                                 "--methods", "forget_nothing"]),
    ("continual-tasks-binary", ["continual", "--tasks", P("root", "/binary.yaml"), "{common}"]),
    ("continual-tasks-list", ["continual", "--tasks", P("root", "/list.yaml"), "{common}"]),
    ("continual-tasks-unknown-class", ["continual", "--tasks", P("root", "/tasks.yaml"), "--data", P("data"), "{common}"]),
    ("continual-resume-not-continual", ["continual", "--resume", P("run")]),
    ("continual-name-parent", ["continual", "--data", P("data"), "{common}", "--split", "3", "--name", "/x"]),
    ("weights-fetch-unknown", ["weights", "fetch", "resnet_9000"]),
    ("weights-fetch-garbage", ["weights", "fetch", "vgg16", "--from", P("root", "/garbage.zip")]),
    ("weights-import-garbage", ["weights", "import", P("root", "/garbage.h5"), "--arch", "vgg16",
                                "--out", P("root", "/w.safetensors")]),
    ("weights-import-missing", ["weights", "import", P("root", "/nowhere.h5"), "--arch", "vgg16",
                                "--out", P("root", "/w.safetensors")]),
]


def expand(argv: list[str], world: dict) -> list[str]:
    out: list[str] = []
    for a in argv:
        if a == "{common}":
            out += [str(x) for x in world["common"]]
        else:
            out.append(a.format(**{k: v for k, v in world.items() if isinstance(v, (Path, str))}))
    return out


def listing(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")} if folder.exists() else set()


@pytest.mark.parametrize("argv", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_ends_in_one_line(argv, world, capsys, monkeypatch):
    cwd = world["root"] / "cwd"
    cwd.mkdir(exist_ok=True)
    monkeypatch.chdir(cwd)  # a command writing to its default places writes here, where we look
    monkeypatch.setenv("GRAFTNET_CACHE", str(world["cache"]))
    before = {k: listing(world[k]) for k in ("runs", "run", "data")} | {"cwd": listing(cwd)}
    outside = listing(world["root"].parent)
    try:
        code = main(expand(argv, world))
    except SystemExit as e:  # argparse: a usage line and one "error:" line, exit 2
        code = e.code
    out, err = capsys.readouterr()
    text = out + err
    assert code == 2, text
    assert "Traceback" not in text and "internal error" not in text, text
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and "error:" in lines[-1], text
    assert sum("error:" in line for line in lines) == 1, text
    # nothing half-made, nothing changed in the finished run or the data, nothing written elsewhere
    assert {k: listing(world[k]) for k in ("runs", "run", "data")} | {"cwd": listing(cwd)} == before
    assert listing(world["root"].parent) == outside


def test_unexpected_exceptions_are_one_line_with_the_traceback_kept(tmp_path, capsys, monkeypatch):
    """A bug (an exception graftnet did not raise itself) says that it is one, in one line, and
    keeps the traceback in a file; the system's refusals (disk full) are said as such."""
    import errno

    import graftnet.cli as cli
    monkeypatch.setenv("GRAFTNET_CACHE", str(tmp_path / "cache"))

    def boom(args):
        raise KeyError("head.weight")
    monkeypatch.setitem(cli.EXTRA_COMMANDS, "boom", boom)
    monkeypatch.setattr(cli, "build_parser", lambda: _parser_with("boom"))
    assert main(["boom"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "internal error in `graft boom` (KeyError: 'head.weight')" in err and "bug" in err
    logs = list((tmp_path / "cache" / "crash").glob("crash-*.txt"))
    assert len(logs) == 1 and str(logs[0]) in err
    assert "Traceback" in logs[0].read_text() and "raise KeyError" in logs[0].read_text()

    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "runs/x/model.safetensors"))
    line = unexpected(full, "train")
    assert line.startswith(f"{tmp_path}/runs/x/model.safetensors: No space left on device (the disk is full")
    assert "bug" not in line

    monkeypatch.setenv("GRAFTNET_TRACEBACK", "1")  # developers get the traceback itself
    with pytest.raises(KeyError):
        main(["boom"])


def _parser_with(name: str):
    import argparse
    parser = argparse.ArgumentParser(prog="graft")
    parser.add_argument("command", choices=[name])
    return parser


def test_corpus_covers_every_command():
    """A command added later joins the corpus: every subcommand has at least one hostile case."""
    from graftnet.cli import build_parser
    parser = build_parser()
    commands = set(next(a for a in parser._actions if a.dest == "command").choices)
    covered = {argv[0] for _, argv in CASES}
    assert commands - covered <= {"backbones"}, commands - covered  # backbones takes no input
    assert json.dumps(CASES)  # plain data: bench/hostile.py counts it


@pytest.mark.parametrize("failure", ["disk-full-at-environment", "bug-in-preparation"])
def test_a_failed_start_leaves_no_half_made_run(failure, image_folder, tmp_path, capsys, monkeypatch):
    """Whatever stops a run before it holds a checkpoint or a model (graftnet's own errors, the
    disk, a bug) removes its folder: no config.yaml/environment.json/log.txt left to mislead."""
    import errno

    import graftnet.run as run_mod
    import graftnet.train.pipeline as pipeline
    monkeypatch.setenv("GRAFTNET_CACHE", str(tmp_path / "cache"))
    if failure == "disk-full-at-environment":
        def write_environment(run_dir, seed):
            (run_dir / "environment.json").write_text("{")  # half written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(run_dir / "environment.json"))
        monkeypatch.setattr(run_mod, "write_environment", write_environment)
        expected = (2, "No space left on device (the disk is full")
    else:
        def _prepare(*args, **kwargs):
            raise ZeroDivisionError("division by zero")
        monkeypatch.setattr(pipeline, "_prepare", _prepare)
        expected = (1, "internal error in `graft train` (ZeroDivisionError: division by zero)")
    runs = tmp_path / "runs"
    code = main(["train", "--data", str(image_folder), *RUN_FLAGS, "--out", str(runs), "--name", "r"])
    err = capsys.readouterr().err
    assert code == expected[0] and expected[1] in err and "Traceback" not in err
    assert listing(runs) == set()


def test_evaluate_and_preview_skip_unreadable_images_when_asked(world, tmp_path, capsys):
    """The hint that ends an unreadable image's message (pass --skip-bad) works for every command
    that gives it: evaluate scores the rest and names what it skipped."""
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    (data / "cat" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    assert main(["evaluate", str(world["run"]), "--data", str(data)]) == 2
    assert "pass --skip-bad" in capsys.readouterr().err
    assert main(["evaluate", str(world["run"]), "--data", str(data), "--skip-bad"]) == 0
    out, err = capsys.readouterr()
    assert "zz_broken.png" in err and json.loads(out)["n"] == len(list(world["data"].rglob("*.png")))
    assert main(["preview", "--data", str(data), "--out", str(tmp_path / "p.png"), "--skip-bad"]) == 0
    assert (tmp_path / "p.png").is_file()
