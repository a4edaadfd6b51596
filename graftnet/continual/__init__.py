"""Continual learning: sequences of tasks, methods against forgetting, their metrics; `graft continual`
and `graft extend` are cli.py and extend.py."""

from .cli import add_commands

__all__ = ["add_commands"]
