"""Command-line flags generated from the config's declarations, and the parser every `graft`
command uses.

`add_train_flags` gives a parser every setting that config.py marks as a flag, with its help, its
allowed values and its default, for `graft train`, `finetune`, `distill` and `lr-find` alike; the
flag's value stays text until `config.resolve` converts and checks it, so a flag, `--set` and a
YAML file give the same messages. A flag that is not given is None and leaves the config file's
value alone. Below cli.py and compress/cli.py, which both build on it.
"""
from __future__ import annotations

import argparse
import difflib
from typing import Any, Collection

from .config import RunConfig
from .errors import GraftError
from .fields import base_type, default_of, walk


class Parser(argparse.ArgumentParser):
    """argparse without prefix matching (`--epoch` would silently mean `--epochs`) and with one-line
    errors; a mistyped flag gets the nearest flag of its own command. Subcommands inherit this
    class (add_subparsers uses the parent's class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:  # argparse reports them at the top level; say it for the command they were given to
            command = _chosen(self, namespace)
            message, near = _unrecognized(extras, command)
            if near:
                command.exit(2, f"{command.prog}: error: {message}; did you mean {near}?\n")
            command.error(message)
        return namespace


def number(kind: type = int, low: float | None = None, high: float | None = None, low_open: bool = False):
    """An argparse `type` that converts and range-checks a flag's value, so `--top 0` or
    `--port 99999` is a one-line usage error instead of a failure deep inside the command."""
    words = "an integer" if kind is int else "a number"
    if low is not None and high is not None:
        words += f" in {'(' if low_open else '['}{low:g}, {high:g}]"
    elif low is not None:
        words += f" {'>' if low_open else '>='} {low:g}"

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {words}") from None
        if value != value or (low is not None and (value < low or (low_open and value == low))) \
                or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is not {words}")
        return value
    convert.__name__ = words  # argparse names the type in some messages
    return convert


def _chosen(parser: argparse.ArgumentParser, namespace) -> argparse.ArgumentParser:
    """The (sub)command parser that `namespace` was parsed by: `graft weights fetch` -> fetch's."""
    for action in parser._actions:  # argparse keeps no public list of a parser's arguments
        if isinstance(action, argparse._SubParsersAction):
            name = getattr(namespace, action.dest, None)
            if name in action.choices:
                return _chosen(action.choices[name], namespace)
    return parser


def _unrecognized(extras: list[str], parser: argparse.ArgumentParser) -> tuple[str, str | None]:
    """The message for arguments no option took, and the flag(s) a mistyped one probably meant."""
    flag = next((e.split("=", 1)[0] for e in extras if e.startswith("--")), None)
    if flag is None:
        return f"unrecognized arguments: {' '.join(extras)}", None
    flags = [s for action in parser._actions for s in action.option_strings if s.startswith("--")
             and s != "--help"]
    # a prefix was an abbreviation before allow_abbrev=False: name the flags it could mean
    near = [f for f in flags if f.startswith(flag)][:2] or \
        difflib.get_close_matches(flag, flags, n=1, cutoff=0.7)
    return f"unrecognized argument {flag}", " or ".join(near) or None


def _flags() -> dict[str, tuple[str, str, Any]]:
    """{dest: (flag, dotted key, field)} for every setting declared as a flag."""
    out: dict[str, tuple[str, str, Any]] = {}
    for key, f, _ in walk(RunConfig):
        if f.metadata.get("section") or not f.metadata.get("cli"):
            continue
        flag = f.metadata["flag"] or f.name.replace("_", "-")
        dest = flag.replace("-", "_")
        if dest in out:  # a programming error in config.py: fail at import, not on a user's command
            raise ValueError(f"--{flag} is declared twice: {out[dest][1]} and {key}")
        out[dest] = (flag, key, f)
    return out


FLAGS = _flags()
FLAG_KEYS = {dest: key for dest, (_, key, _) in FLAGS.items()}   # argparse dest -> config key


def _help(f, key: str, shown_defaults: dict) -> str:
    text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
    default = shown_defaults.get(key, default_of(f))
    if default is None or isinstance(default, bool):  # None: the help says what unset means
        return text
    if isinstance(default, list):
        default = ",".join(map(str, default)) or "''"
    return f"{text} (default: {default})"


def add_config_flags(parser: argparse.ArgumentParser, shown_defaults: dict | None = None,
                     exclude: Collection[str] = ()) -> None:
    """One flag per setting declared as a flag, grouped by config section in `--help`.
    `shown_defaults`: {key: value} where the command supplies its own default (`graft finetune`:
    finetune.epochs 3); `exclude`: flag names this command gives another meaning or none."""
    shown_defaults = shown_defaults or {}
    hints = dict((key, typ) for key, _, typ in walk(RunConfig))
    titles = {key: f.metadata["help"] for key, f, _ in walk(RunConfig) if f.metadata.get("section")}
    groups: dict[str, Any] = {}
    for dest, (flag, key, f) in FLAGS.items():
        if flag in exclude:
            continue
        section = key.rpartition(".")[0]
        if section not in groups:
            groups[section] = parser.add_argument_group(titles.get(section, "run"))
        group = groups[section]
        if base_type(hints[key])[0] is bool:  # the flag sets the opposite of the default
            group.add_argument(f"--{flag}", dest=dest, action="store_const", const=not default_of(f),
                               help=_help(f, key, shown_defaults))
            continue
        choices = f.metadata["choices"]
        metavar = f.metadata["metavar"] or ("{" + ",".join(choices) + "}" if choices else None)
        group.add_argument(f"--{flag}", dest=dest, metavar=metavar, help=_help(f, key, shown_defaults))


def add_train_flags(parser: argparse.ArgumentParser, shown_defaults: dict | None = None,
                    exclude: Collection[str] = (), resume: bool = True) -> None:
    """`--config`, every config flag, `--resume` (with `resume`) and `--set KEY=VALUE`."""
    parser.add_argument("--config", metavar="YAML",
                        help="config file (a recipe, or a run folder's config.yaml); flags override it")
    if resume:
        parser.add_argument("--resume", metavar="RUN", help="continue a killed run from its last checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any config key, e.g. --set train.lr=3e-4 (repeatable)")
    add_config_flags(parser, shown_defaults, exclude)
    others = [key for key, f, _ in walk(RunConfig)
              if not f.metadata.get("section") and not f.metadata.get("cli")]
    parser.epilog = "Keys without a flag of their own (--set KEY=VALUE, or in the YAML): " + ", ".join(others)


def train_overrides(args: argparse.Namespace) -> dict:
    """{config key: value} from the flags given (None for the others) and every --set KEY=VALUE."""
    overrides = {key: getattr(args, dest, None) for dest, key in FLAG_KEYS.items()}
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            raise GraftError(f"--set {item}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value
    return overrides
