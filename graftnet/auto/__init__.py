"""`graft auto`: look at the data, probe backbones, search the head, fine-tune, quantize and export
within a wall-clock budget, and leave a deployment folder with every decision and its numbers.

    budget.py   --budget text -> seconds; the deadline every stage reads
    plan.py     the data look (counts, imbalance, sizes, unreadable files, duplicates) and the plan
    probe.py    backbone x input size on a small sample: accuracy of a linear fit, measured speed
    stages.py   search, fine-tuning, export and the choice of the model that ships, test scoring
    deploy.py   the deployment folder: ONNX models, preprocess.json, MODEL_CARD.md, report.html
    runner.py   the stages in order, recorded in decisions.json: resume and Ctrl-C
    cli.py      the `graft auto` command
"""

from .budget import parse_budget
from .cli import add_commands
from .runner import Request, run_auto

__all__ = ["Request", "add_commands", "parse_budget", "run_auto"]
