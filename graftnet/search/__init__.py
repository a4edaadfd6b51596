"""Search over a grafted network's hyperparameters and architecture (Optuna); `graft search` is cli.py."""

from .cli import add_commands, parse_timeout
from .runner import run_search
from .settings import SearchSettings
from .storage import join_folder
from .space import DEFAULT_SPACE, STEPS, base_params, check_space, sample
from .trial import TrialReporter, run_trial, saved_val_acc

__all__ = ["DEFAULT_SPACE", "TrialReporter", "add_commands", "check_space", "parse_timeout",
           "run_search", "run_trial", "sample", "saved_val_acc", "SearchSettings", "STEPS", "base_params",
           "join_folder"]
