"""Each setting is declared once (config.py); the `graft` flags, their --help with defaults, the
overrides, the allowed values and the messages for mistakes all come from that declaration."""
from __future__ import annotations

import argparse

import pytest
import torch

from graftnet import config
from graftnet.cli import build_parser, main, train_overrides
from graftnet.errors import ConfigError

# The flags `graft train` had before they were generated, and the keys they set: they must keep
# setting the same keys (scripts, recipes' headers and BENCHMARKS.md commands use them).
OLD_FLAGS = {
    "data": "data.path", "backbone": "backbone.name", "weights": "backbone.weights",
    "image-size": "backbone.image_size", "features": "backbone.features", "cut": "backbone.cut",
    "precision": "backbone.precision", "epochs": "train.epochs", "batch-size": "train.batch_size",
    "lr": "train.lr", "optimizer": "train.optimizer", "weight-decay": "train.weight_decay",
    "seed": "train.seed", "out": "out", "name": "name", "cache-dir": "cache_dir",
    "pool": "head.pool", "hidden": "head.hidden", "dropout": "head.dropout",
    "max-per-class": "data.max_per_class", "val-fraction": "data.val_fraction",
    "label-smoothing": "train.label_smoothing", "schedule": "train.schedule",
    "warmup-epochs": "train.warmup_epochs", "early-stopping": "train.early_stopping",
    "augment": "train.augment", "cache-views": "train.cache_views", "mixup": "train.mixup",
    "cutmix": "train.cutmix", "finetune-epochs": "finetune.epochs", "unfreeze": "finetune.unfreeze",
    "finetune-lr": "finetune.lr", "lr-decay": "finetune.lr_decay", "bn": "finetune.bn",
    "finetune-augment": "finetune.augment", "ema": "finetune.ema", "init": "train.init",
    "checkpoint-minutes": "train.checkpoint_minutes", "micro-batch": "train.micro_batch",
    "log-to": "track.log_to", "mlflow-uri": "track.mlflow_uri",
    "labels": "data.labels", "label-separator": "data.label_separator",
}
OLD_SWITCHES = {"no-pretrained": ("backbone.pretrained", False), "no-cache": ("train.cache_features", False),
                "flip-views": ("train.flip_views", True), "skip-bad": ("data.skip_bad", True),
                "compile": ("train.compile", True)}
VALUES = {"features": "multi", "precision": "fp32", "optimizer": "sgd", "pool": "flatten",
          "hidden": "512,256",
          "schedule": "cosine", "augment": "paper", "finetune-augment": "rrc", "bn": "train",
          "unfreeze": "top:2", "data": "some/folder", "backbone": "vgg16", "weights": "w.safetensors",
          "out": "elsewhere", "name": "run1", "cache-dir": "c", "init": "runs/a",
          "log-to": "tensorboard", "mlflow-uri": "http://127.0.0.1:5000",
          **{f: "0.5" for f in ("dropout", "lr", "weight-decay", "val-fraction", "label-smoothing",
                                "mixup", "warmup-epochs", "cutmix", "finetune-lr", "lr-decay", "ema",
                                "checkpoint-minutes")}}
TRAIN_COMMANDS = ["train", "finetune", "distill", "lr-find"]


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def help_entries(command: str, capsys, monkeypatch) -> dict[str, str]:
    """{flag: its help, unwrapped} from `graft COMMAND --help`."""
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as e:
        parse(command, "--help")
    assert e.value.code == 0
    entries, current = {}, None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            entries[current] = line.strip()
        elif current and line.startswith(" " * 10):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def test_help_shows_the_declared_defaults(capsys, monkeypatch):
    train = help_entries("train", capsys, monkeypatch)
    for flag, default in [("--epochs", "10"), ("--lr", "0.001"), ("--optimizer", "adam"), ("--hidden", "256"),
                          ("--finetune-epochs", "0"), ("--finetune-lr", "0.0003"), ("--bn", "eval"),
                          ("--checkpoint-minutes", "10.0"), ("--data", "cifar10")]:
        assert f"(default: {default})" in train[flag], train[flag]
    assert "{adam,adamw,sgd}" in train["--optimizer"]
    # `graft finetune` runs stage 2 for 3 epochs unless told otherwise, and says so
    assert "(default: 3)" in help_entries("finetune", capsys, monkeypatch)["--finetune-epochs"]


@pytest.mark.parametrize("argv, prog, typed, suggestion", [
    (["train", "--epoch", "3"], "train", "--epoch", "--epochs"),  # a prefix argparse took as --epochs
    (["finetune", "--finetune-epoch", "3"], "finetune", "--finetune-epoch", "--finetune-epochs"),
    (["train", "--lrr", "0.1"], "train", "--lrr", "--lr"),
    (["distill", "--teachr", "runs/a"], "distill", "--teachr", "--teacher"),
    (["lr-find", "--max-per-clas", "5"], "lr-find", "--max-per-clas", "--max-per-class"),
    (["prune", "runs/a", "--amoun", "0.5"], "prune", "--amoun", "--amount"),
    (["weights", "fetch", "vgg16", "--forc"], "weights fetch", "--forc", "--force"),
])
def test_mistyped_flag_is_one_line_with_a_suggestion(argv, prog, typed, suggestion, capsys):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"graft {prog}: error: unrecognized argument {typed}; did you mean {suggestion}?"]


def test_no_parser_matches_prefixes():
    def parsers(p):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)
    found = list(parsers(build_parser()))
    assert len(found) > 15 and not [p.prog for p in found if p.allow_abbrev]


def test_mistyped_key_suggests_the_nearest(tmp_path, capsys):
    assert main(["train", "--set", "train.epoch=3"]) == 2
    assert "train.epoch: unknown key; did you mean train.epochs?" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "train.epochz: unknown key; did you mean train.epochs?" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"^lr: unknown key; did you mean train.lr or finetune.lr\?$"):
        config.resolve(None, {"lr": "0.1"})
    with pytest.raises(ConfigError, match=r"did you mean sgd\?"):
        config.resolve(None, {"train.optimizer": "sgdm"})


@pytest.mark.parametrize("key, value, message", [
    ("train.lr", "fast", "train.lr: 'fast' is not a number"),
    ("train.epochs", "3.5", "train.epochs: '3.5' is not an integer"),
    ("train.compile", "maybe", "train.compile: 'maybe' is not true or false"),
    ("head.hidden", "512,wide", "head.hidden: '512,wide' is not a list of integers such as 512,256"),
    ("data.max_per_class", "many", "data.max_per_class: 'many' is not an integer or null"),
])
def test_bad_value_says_the_expected_type_in_words(key, value, message):
    with pytest.raises(ConfigError) as e:
        config.resolve(None, {key: value})
    assert str(e.value) == message


def test_bad_flag_value_is_the_same_one_line_error(capsys):
    assert main(["train", "--lr", "fast"]) == 2
    assert "error: train.lr: 'fast' is not a number" in capsys.readouterr().err


@pytest.mark.parametrize("command", TRAIN_COMMANDS)
def test_generated_flags_set_the_same_keys_as_before(command):
    for flag, key in OLD_FLAGS.items():
        if command == "lr-find" and flag in ("out", "name"):  # lr-find: --out is the plot
            continue
        value = VALUES.get(flag, "7")
        assert str(train_overrides(parse(command, f"--{flag}", value))[key]) == value, flag
    for flag, (key, value) in OLD_SWITCHES.items():
        overrides = train_overrides(parse(command, f"--{flag}"))
        assert overrides[key] is value and sum(v is not None for v in overrides.values()) == 1


def test_flags_not_given_leave_the_config_file_alone(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  epochs: 7\n  cache_features: false\nhead:\n  hidden: [32]\n")
    args = parse("train", "--config", str(cfg_file), "--lr", "0.01", "--set", "finetune.ema=0.9")
    cfg = config.resolve(args.config, train_overrides(args))
    assert (cfg.train.epochs, cfg.train.cache_features, cfg.head.hidden) == (7, False, [32])
    assert (cfg.train.lr, cfg.finetune.ema) == (0.01, 0.9)


def test_every_setting_is_reachable_by_a_flag_or_set():
    from graftnet.fields import walk
    from graftnet.options import FLAG_KEYS
    flags = dict((key, dest) for dest, key in FLAG_KEYS.items())
    settings = [(key, f) for key, f, _ in walk(config.RunConfig) if not f.metadata.get("section")]
    assert len(settings) == len(config.KEYS) - 7 and len(flags) == len(OLD_FLAGS) + len(OLD_SWITCHES)
    for key, f in settings:
        assert f.metadata["help"], key
        assert (key in flags) == f.metadata["cli"], key
        default = config.to_dict(config.RunConfig())
        for part in key.split("."):
            default = default[part]
        if default is None:
            continue
        text = ",".join(map(str, default)) if isinstance(default, list) else str(default)
        cfg = config.resolve(None, train_overrides(parse("train", "--set", f"{key}={text}")))
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        assert value == default, key


def test_registry_refuses_a_taken_name_and_names_the_choices():
    from graftnet.registry import Registry
    from graftnet.train.optim import OPTIMIZERS
    things: Registry[int] = Registry("thing")
    things.add("a", 1)
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        things.add("a", 2)
    with pytest.raises(ConfigError, match="unknown thing 'b'; choose from a"):
        things.get("b")
    with pytest.raises(ValueError, match="already registered"):
        OPTIMIZERS.add("sgd", OPTIMIZERS.get("adam"))


def test_config_choices_are_the_registries_names():
    from graftnet.data.augment import AUGMENTATIONS, PRESETS
    from graftnet.fields import walk
    from graftnet.train.optim import OPTIMIZERS, SCHEDULES
    fields = {key: f for key, f, _ in walk(config.RunConfig)}
    assert fields["train.optimizer"].metadata["choices"] is OPTIMIZERS
    assert fields["finetune.optimizer"].metadata["choices"] is OPTIMIZERS
    assert fields["train.schedule"].metadata["choices"] is SCHEDULES
    assert fields["finetune.augment"].metadata["choices"] is AUGMENTATIONS
    assert list(AUGMENTATIONS) == list(PRESETS) == ["none", "flip", "paper", "rrc", "randaugment",
                                                    "trivialaugment"]


def test_optimizers_carry_their_settings_and_schedules_their_shapes():
    from graftnet.train.optim import lr_factor, make_optimizer
    params = [torch.nn.Parameter(torch.ones(2))]
    sgd = make_optimizer(params, "sgd", 0.1, 0.01)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9 and sgd.defaults["nesterov"]
    assert type(make_optimizer(params, "adamw", 0.1, 0.01)) is torch.optim.AdamW
    adam = make_optimizer(params, "adam", 0.1, 0.01)
    assert type(adam) is torch.optim.Adam and adam.defaults["weight_decay"] == 0.01
    assert [lr_factor("constant", s, 100, 10) for s in (0, 9, 50)] == [0.1, 1.0, 1.0]
    assert lr_factor("cosine", 55, 100, 10) == pytest.approx(0.5)
    assert lr_factor("onecycle", 25, 100, 0) == pytest.approx(1.0)
    assert lr_factor("cosine", 20, 10, 10) == 1.0        # nothing left after warmup: the base rate
    with pytest.raises(ConfigError, match="unknown schedule 'linear'"):
        lr_factor("linear", 0, 10, 0)
