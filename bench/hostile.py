"""How many hostile inputs end in a clean one-line error: the corpus of bad command lines
(tests/test_hostile_cli.py, one case each) and the property tests over data, model files, configs
and the server (tests/test_hostile_*.py, tests/test_serve_hostile.py), run and counted.

    python bench/hostile.py

A case is clean when its test passes: exit code 2 and one "error:" line, no traceback, nothing
half-made (the CLI corpus); a normal result or one GraftError line for every generated example (the
property tests, whose example counts come from Hypothesis' statistics). Writes
bench/results/hostile.json.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from record import commit, machine  # noqa: E402
FILES = ["tests/test_hostile_cli.py", "tests/test_hostile_config.py", "tests/test_hostile_data.py",
         "tests/test_hostile_models.py", "tests/test_serve_hostile.py"]


def main() -> None:
    files = [f for f in FILES if (ROOT / f).is_file()]
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "--hypothesis-show-statistics", f"--junitxml={xml}", *files],
                              cwd=ROOT, capture_output=True, text=True, env={**os.environ, "GRAFTNET_QUIET": "1"})
        wall = time.perf_counter() - t0
        cases = ET.parse(xml).getroot().iter("testcase")
        outcome: dict[str, Counter] = {}
        corpus: Counter = Counter()  # the bad command lines, one parametrized case each
        failed = []
        for case in cases:
            name = case.get("classname", "").rsplit(".", 1)[-1]
            state = ("failed" if case.find("failure") is not None or case.find("error") is not None
                     else "skipped" if case.find("skipped") is not None else "clean")
            outcome.setdefault(name, Counter())[state] += 1
            if case.get("name", "").startswith("test_bad_input_ends_in_one_line["):
                corpus[state] += 1
            if state == "failed":
                failed.append(f"{name}::{case.get('name')}")
    # Hypothesis: "- during generate phase (...): N passing, M failing, and K invalid test cases"
    examples = sum(int(n) for n in re.findall(r"(\d+) passing(?: examples)?,", proc.stdout))
    failing = sum(int(n) for n in re.findall(r"(\d+) failing(?: examples)?,", proc.stdout))
    out = {"command": "python bench/hostile.py", "date": time.strftime("%Y-%m-%d %H:%M"),
           "machine": machine(), "commit": commit(), "wall_s": round(wall, 1),
           "pytest_exit_code": proc.returncode,
           "tests_by_file": {k: dict(v) for k, v in outcome.items()},
           "generated_examples": {"passing": examples, "failing": failing}, "failed": failed,
           "summary": {"tests": sum(sum(v.values()) for v in outcome.values()),
                       "clean": sum(v["clean"] for v in outcome.values()),
                       "cli_corpus_cases": sum(corpus.values()), "cli_corpus_clean": corpus["clean"]}}
    dest = ROOT / "bench" / "results" / "hostile.json"
    tmp_dest = dest.with_suffix(".json.tmp")
    tmp_dest.write_text(json.dumps(out, indent=2) + "\n")
    tmp_dest.replace(dest)
    print(json.dumps(out["summary"] | {"generated_examples": out["generated_examples"]}, indent=2))
    print(dest)


if __name__ == "__main__":
    main()
