"""Options declared once, as dataclass fields: type, default, help text, allowed values, CLI flag.

`option(...)` puts the help and the rest into the field's metadata; `config.py` declares every
setting with it, and from that one declaration come the YAML reading (`from_dict`, which converts
values to the annotated type and names what was expected in words), the check of allowed values
(`check_choices`), and the `graft train` flags with their help and defaults (options.py). Generic:
nothing here knows graftnet's settings, so this module sits at the bottom of the import layers.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import MISSING, Field
from typing import Any, Collection, Iterator

from .errors import ConfigError


def option(default: Any = MISSING, *, help: str, factory: Any = MISSING,
           choices: Collection[str] | None = None, flag: str | None = None, metavar: str | None = None,
           cli: bool = True) -> Any:
    """A config field. `choices`: allowed values (a tuple, or a Registry whose names they are);
    `flag`: the CLI flag's name when it is not the field's name with dashes (`finetune-lr` for
    finetune.lr; a bool's flag sets the opposite of its default: `no-cache`); `cli=False`: no flag
    of its own (`--set KEY=VALUE` still reaches it)."""
    meta = {"help": help, "choices": choices, "flag": flag, "metavar": metavar, "cli": cli}
    return dataclasses.field(default=default, default_factory=factory, metadata=meta)


def section(cls: type, *, help: str) -> Any:
    """A nested group of options (`train:` in YAML), titled by `help` in `--help`."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "section": True})


def walk(cls: type, prefix: str = "") -> Iterator[tuple[str, Field, Any]]:
    """(dotted key, field, annotated type) for every option under `cls`, sections included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        yield key, f, hints[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            yield from walk(hints[f.name], key + ".")


def default_of(f: Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def base_type(typ: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed): `int | None` -> (int, True)."""
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(typ))
    return typ, False


def type_words(typ: Any) -> str:
    """What a value of `typ` looks like, for a person: `train.lr: 'fast' is not a number`."""
    typ, optional = base_type(typ)
    words = {int: "an integer", float: "a number", bool: "true or false", str: "text"}.get(typ)
    if typing.get_origin(typ) is list:
        words = "a list of integers such as 512,256"
    if typing.get_origin(typ) is dict:
        words = "a mapping of names to their options"
    return (words or str(typ)) + (" or null" if optional else "")


def coerce(value: Any, typ: Any, where: str) -> Any:
    """A YAML or command-line value (flags and --set give text) as the annotated type."""
    base, optional = base_type(typ)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required ({type_words(typ)})")
    given = value
    try:
        if base is bool:
            if isinstance(value, str):
                return {"1": True, "true": True, "yes": True, "on": True,
                        "0": False, "false": False, "no": False, "off": False}[value.strip().lower()]
            return bool(value)
        if typing.get_origin(base) is dict:  # options checked by whoever reads them (a registry)
            if isinstance(value, str):  # --set callbacks='{pull: {strength: 0.5}}'
                import yaml
                try:
                    value = yaml.safe_load(value) or {}
                except yaml.YAMLError:
                    raise ValueError(value) from None
            if not isinstance(value, dict):
                raise ValueError(value)
            return {str(k): v for k, v in value.items()}
        if typing.get_origin(base) is list:
            if isinstance(value, str):  # "512,256", "[512, 256]", or "" for an empty list
                value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
            return [_integer(v) for v in value]
        if base is int:
            return _integer(value)
        if base is float:
            if isinstance(value, bool) or not math.isfinite(float(value)):  # a NaN passes every range check
                raise ValueError(value)
            return float(value)
        return str(value)
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{where}: {given!r} is not {type_words(typ)}") from None


def _integer(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(value)
    return int(value)


def printable(text: str) -> str:
    """Text as is, or quoted with escapes where it holds a newline or other control character: a
    message about a key stays one line."""
    return text if text.isprintable() else repr(text)


def suggest(key: str, known: Collection[str]) -> str | None:
    """The nearest known key or value to a mistyped one, or None. A key is matched whole
    (train.epoch -> train.epochs), then by its last part (lr -> train.lr or finetune.lr)."""
    close = difflib.get_close_matches(key, known, n=1)
    if not close:
        by_last = {k: k.rsplit(".", 1)[-1] for k in known}
        near = difflib.get_close_matches(key.rsplit(".", 1)[-1], set(by_last.values()), n=1, cutoff=0.75)
        close = [k for k, last in by_last.items() if near and last == near[0]]
    return " or ".join(close) or None


def from_dict(cls: type, data: dict | None, where: str = "", known: Collection[str] = ()) -> Any:
    """An instance of dataclass `cls` from a (nested) mapping; `known`: every dotted key of the
    whole config, to suggest one for a mistyped key."""
    known = known or [k for k, _, _ in walk(cls)]
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, typ, key = data.pop(f.name), hints[f.name], f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of its keys, got {value!r}")
            kwargs[f.name] = from_dict(typ, value, key, known)
        else:
            kwargs[f.name] = coerce(value, typ, key)
    if data:
        unknown = [(printable(k), suggest(k, known)) for k in (f"{where}.{k}" if where else str(k) for k in data)]
        if len(unknown) == 1:
            (key, near), = unknown
            raise ConfigError(f"{key}: unknown key" + (f"; did you mean {near}?" if near else ""))
        raise ConfigError("unknown keys: " + ", ".join(k + (f" (did you mean {n}?)" if n else "")
                                                       for k, n in unknown))
    return cls(**kwargs)


def check_choices(obj: Any, prefix: str = "") -> None:
    """Every option with `choices` holds one of them (a registry's choices are its names now)."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_choices(value, key + ".")
        elif f.metadata.get("choices") is not None and value is not None \
                and value not in f.metadata["choices"]:
            allowed = list(f.metadata["choices"])
            near = difflib.get_close_matches(str(value), allowed, n=1)
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}"
                              + (f"; did you mean {near[0]}?" if near else ""))


_UNITS = {"h": 3600, "m": 60, "s": 1}


def parse_duration(text, flag: str) -> float:
    """Seconds from 30m, 90s, 1h, 1h30m, 1.5h or plain seconds (units in decreasing order, each at
    most once: not 30m1h or 1m1m); one ConfigError line naming `flag` for anything else."""
    import re
    words = str(text).strip().lower() if text is not None else ""
    try:
        seconds = float(words) if words else None
    except ValueError:
        seconds = None
        if re.fullmatch(r"(\d+(?:\.\d+)?h)?(\d+(?:\.\d+)?m)?(\d+(?:\.\d+)?s)?", words):
            seconds = sum(float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([hms])", words))
    if seconds is None or not 0 < seconds < math.inf:
        raise ConfigError(f"{flag} {text}: expected a positive duration like 90s, 30m, 1h30m or seconds")
    return seconds
