"""The search space: YAML, dotted config key -> one entry; checked, then sampled per trial."""
from __future__ import annotations

from ..config import KEYS, RunConfig
from ..errors import ConfigError
from ..fields import printable, suggest

TYPES = ("float", "int", "categorical", "bool", "layers")
# what a trial does to its trained model before it is judged (trial.py); keys beside the config's:
# key -> (the types a space may give it, its value in a base config: the step not taken)
STEPS = {"export.int8": (("bool", "categorical"), False),   # categorical [true]: every trial ships int8
         # structured channel pruning (`graft prune`) of the trained run, scored on validation only
         "prune.amount": (("float", "categorical"), 0.0),
         "prune.finetune_epochs": (("int", "categorical"), 1)}   # its recovery epochs (graft prune's default)

DEFAULT_SPACE: dict[str, dict] = {
    "head.hidden": {"type": "layers", "low": 0, "high": 2, "choices": [256, 512, 1024]},
    "head.dropout": {"type": "float", "low": 0.0, "high": 0.7},
    "head.activation": {"type": "categorical", "choices": ["relu", "gelu", "silu"]},
    "train.optimizer": {"type": "categorical", "choices": ["adam", "adamw"]},
    "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "train.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-1, "log": True, "zero": True},
    "train.label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
    # larger batches: fewer steps per epoch, so cheaper trials on a CPU
    "train.batch_size": {"type": "categorical", "choices": [128, 256, 512]},
    "train.epochs": {"type": "int", "low": 5, "high": 20},
    # not train.flip_views: a second backbone pass (as long as the first) for no measured gain on
    # multi-depth features (BENCHMARKS.md); a space file can add it: {type: bool, when: {train.augment: none}}
    # one backbone pass serves all three: their average-pooled features are columns of "blocks"
    "backbone.features": {"type": "categorical", "choices": ["last", "multi", "blocks"]},
}


def check_space(space: dict) -> dict:
    """The space, checked: one ConfigError line for the first thing wrong, before any folder exists."""
    if not isinstance(space, dict) or not space:
        raise ConfigError("search space: empty; give at least one config key to search")
    for key, entry in space.items():
        if not isinstance(key, str):
            raise ConfigError(f"search space: {key!r} is not a config key (dotted text such as train.lr)")
        if key in STEPS and (not isinstance(entry, dict) or entry.get("type") not in STEPS[key][0]):
            raise ConfigError(f"search space: {key}: needs type: {' or '.join(STEPS[key][0])}")
        if key not in KEYS and key not in STEPS:
            near = suggest(key, [*KEYS, *STEPS])
            raise ConfigError(f"search space: unknown config key {printable(key)}"
                              + (f"; did you mean {near}?" if near else ""))
        if not isinstance(entry, dict) or entry.get("type") not in TYPES:
            raise ConfigError(f"search space: {key}: needs type: one of {', '.join(TYPES)}")
        kind = entry["type"]
        if kind in ("float", "int", "layers"):
            if "low" not in entry or "high" not in entry:
                raise ConfigError(f"search space: {key}: a {kind} needs low and high")
            for end in ("low", "high"):  # YAML reads 1e-4 (no dot) as a string
                entry[end] = _number(key, end, entry[end], float if kind == "float" else int)
            if not entry["low"] < entry["high"]:
                raise ConfigError(f"search space: {key}: low ({entry['low']}) must be below high ({entry['high']})")
            if entry.get("log") and entry["low"] <= 0:
                raise ConfigError(f"search space: {key}: a log range needs low > 0")
        if kind in ("categorical", "layers"):
            choices = entry.get("choices")
            if not choices:
                raise ConfigError(f"search space: {key}: empty choices")
            if not isinstance(choices, list):
                raise ConfigError(f"search space: {key}: choices must be a list, got {choices!r}")
            # Optuna stores a categorical's choices as they are: plain values only
            if not all(c is None or isinstance(c, (str, int, float, bool)) for c in choices):
                raise ConfigError(f"search space: {key}: choices must be plain values (text, numbers, "
                                  f"true/false), got {choices!r}")
            if kind == "layers" and not all(isinstance(c, int) and not isinstance(c, bool) and c > 0
                                            for c in choices):
                raise ConfigError(f"search space: {key}: layer widths must be positive integers, got {choices!r}")
        if key == "prune.amount":   # graft prune takes a fraction of the channels below 1
            ends = entry["choices"] if kind == "categorical" else [entry["low"], entry["high"]]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1 for v in ends):
                raise ConfigError(f"search space: prune.amount: fractions of the channels in [0, 1) "
                                  f"(0: not pruned), got {ends!r}")
        when = entry.get("when") or {}
        if not isinstance(when, dict):
            raise ConfigError(f"search space: {key}: `when` must map config keys to values, got {when!r}")
        for other, value in when.items():
            if other not in KEYS and other not in STEPS:
                raise ConfigError(f"search space: {key}: `when` names unknown config key {other!r}")
            if isinstance(value, (list, dict)):
                raise ConfigError(f"search space: {key}: `when` {other} must be one plain value, got {value!r}")
    return space


def sample(trial, space: dict, base: RunConfig) -> dict:
    """{config key: value} for one trial. Conditional parameters get their own Optuna names
    (head.hidden.1 exists only in trials with two layers), so TPE models each on the trials that have it."""
    chosen: dict = {}
    for key, e in space.items():
        if any((chosen[k] if k in chosen else _base_value(base, k)) != v for k, v in (e.get("when") or {}).items()):
            continue
        kind = e["type"]
        if kind == "float":
            if e.get("zero") and trial.suggest_categorical(f"{key}.zero", [False, True]):
                chosen[key] = 0.0
                continue
            chosen[key] = trial.suggest_float(key, e["low"], e["high"], log=bool(e.get("log")))
        elif kind == "int":
            chosen[key] = trial.suggest_int(key, e["low"], e["high"], log=bool(e.get("log")))
        elif kind == "categorical":
            chosen[key] = trial.suggest_categorical(key, list(e["choices"]))
        elif kind == "bool":
            chosen[key] = trial.suggest_categorical(key, [False, True])
        else:  # layers: a count, then a width per layer that exists
            n = trial.suggest_int(f"{key}.layers", e["low"], e["high"])
            chosen[key] = [trial.suggest_categorical(f"{key}.{i}", list(e["choices"])) for i in range(n)]
    return chosen


def grid(space: dict) -> dict[str, list]:
    """{Optuna parameter name: its values} for a grid search: only a space of unconditional
    categorical and bool entries has a finite grid; anything else is one ConfigError line."""
    bad = [k for k, e in space.items() if e["type"] not in ("categorical", "bool") or e.get("when")]
    if bad:
        raise ConfigError(f"search space: --sampler grid needs categorical or bool entries without `when`; "
                          f"{', '.join(map(printable, bad))} is not (use tpe or random)")
    return {k: list(e["choices"]) if e["type"] == "categorical" else [False, True] for k, e in space.items()}


def _base_value(cfg: RunConfig, key: str):
    """A config key's value in the base config; a step's value there is the step not taken."""
    return STEPS[key][1] if key in STEPS else _value(cfg, key)


def _value(cfg: RunConfig, key: str):
    """The base config's value at a dotted key (`callbacks.x.y` goes into a plain dict)."""
    node = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
    return node




def _number(key: str, end: str, value, kind):
    try:
        number = kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"search space: {key}: {end} {value!r} is not a number") from None
    if kind is int and number != float(value):
        raise ConfigError(f"search space: {key}: {end} {value!r} is not a whole number")
    return number


def base_params(space: dict, base: RunConfig) -> dict:
    """The base config's own values as the trial parameters `sample` names them, where the space
    can hold them: enqueued as a trial, the hand-made configuration is scored like any other and
    marked on the plots. None when a value lies outside the space: that trial would not be the base."""
    params: dict = {}
    for key, e in space.items():
        value = _base_value(base, key)
        if any(_base_value(base, k) != v for k, v in (e.get("when") or {}).items()):
            continue
        kind = e["type"]
        if kind in ("float", "int") and isinstance(value, (int, float)) and not isinstance(value, bool):
            if e.get("zero") and value == 0:
                params[f"{key}.zero"] = True
            elif e["low"] <= value <= e["high"]:
                params.update({f"{key}.zero": False} if e.get("zero") else {})
                params[key] = value
        elif kind == "categorical" and value in e["choices"]:
            params[key] = value
        elif kind == "bool" and isinstance(value, bool):
            params[key] = value
        elif kind == "layers" and isinstance(value, list) and e["low"] <= len(value) <= e["high"] \
                and all(w in e["choices"] for w in value):
            params[f"{key}.layers"] = len(value)
            params.update({f"{key}.{i}": w for i, w in enumerate(value)})
        else:
            return None
        if key not in params and f"{key}.zero" not in params and f"{key}.layers" not in params:
            return None
    return params
