"""Continual-learning metrics on small accuracy matrices whose values are worked out by hand."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from graftnet.continual.metrics import mean_sd, summarize

# R[j][i]: accuracy on task i after training through task j.
R2 = [[0.9, 0.1],
      [0.6, 0.8]]
R3 = [[0.8, 0.2, 0.1],
      [0.9, 0.7, 0.3],  # task 0 improves after task 1: forgetting_max differs from forgetting
      [0.5, 0.6, 0.9]]
INIT3 = [0.1, 0.1, 0.05]


def close(a, b):
    return a == pytest.approx(b, abs=1e-6)


def test_two_tasks():
    s = summarize(R2, initial=[0.1, 0.2])
    assert s["tasks"] == 2
    assert close(s["acc_per_step"], [0.9, 0.7])         # step 1: (0.6 + 0.8) / 2
    assert close(s["final_acc"], 0.7)
    assert close(s["avg_incremental_acc"], 0.8)         # (0.9 + 0.7) / 2
    assert close(s["forgetting"], 0.3)                  # 0.9 - 0.6
    assert close(s["forgetting_max"], 0.3)
    assert close(s["bwt"], -0.3)
    assert close(s["fwt"], -0.1)                        # R[0][1] - initial[1] = 0.1 - 0.2
    assert [p["task"] for p in s["per_task"]] == [0, 1]
    assert close([p["final_acc"] for p in s["per_task"]], [0.6, 0.8])


def test_three_tasks():
    s = summarize(R3, initial=INIT3)
    # steps: 0.8; (0.9 + 0.7) / 2 = 0.8; (0.5 + 0.6 + 0.9) / 3 = 0.666667
    assert close(s["acc_per_step"], [0.8, 0.8, 2 / 3])
    assert close(s["final_acc"], 2 / 3)
    assert close(s["avg_incremental_acc"], (0.8 + 0.8 + 2 / 3) / 3)  # 0.755556
    # task 0: 0.8 - 0.5 = 0.3, task 1: 0.7 - 0.6 = 0.1 -> 0.2
    assert close(s["forgetting"], 0.2)
    assert close(s["bwt"], -0.2)
    # Chaudhry: task 0: max(0.8, 0.9) - 0.5 = 0.4, task 1: 0.7 - 0.6 = 0.1 -> 0.25
    assert close(s["forgetting_max"], 0.25)
    # task 1: R[0][1] - 0.1 = 0.1, task 2: R[1][2] - 0.05 = 0.25 -> 0.175
    assert close(s["fwt"], 0.175)
    assert close([p["forgetting"] for p in s["per_task"][:2]], [0.3, 0.1])
    assert close([p["forgetting_max"] for p in s["per_task"][:2]], [0.4, 0.1])
    assert close([p["fwt"] for p in s["per_task"][1:]], [0.1, 0.25])


def test_accuracy_over_tasks_is_weighted_by_test_samples():
    s = summarize(R3, sizes=[100, 300, 600])
    # step 1: (0.9*100 + 0.7*300) / 400 = 0.75; step 2: (50 + 180 + 540) / 1000 = 0.77
    assert close(s["acc_per_step"], [0.8, 0.75, 0.77])
    assert close(s["final_acc"], 0.77)
    assert close(s["avg_incremental_acc"], (0.8 + 0.75 + 0.77) / 3)  # 0.773333
    # forgetting stays a plain mean over tasks, as Avalanche averages it with weight 1
    assert close(s["forgetting"], 0.2)
    # equal sizes are the same as no sizes
    assert close(summarize(R3, sizes=[5, 5, 5])["final_acc"], 2 / 3)


def test_one_task_has_no_forgetting_or_transfer():
    s = summarize([[0.7]], initial=[0.1])
    assert s["tasks"] == 1
    assert close(s["final_acc"], 0.7) and close(s["avg_incremental_acc"], 0.7)
    assert close(s["acc_per_step"], [0.7])
    # undefined, not Avalanche's 0.0 from an empty mean
    assert s["forgetting"] is None and s["forgetting_max"] is None and s["bwt"] is None
    assert s["fwt"] is None
    assert s["per_task"] == [{"task": 0, "final_acc": 0.7, "forgetting": None, "forgetting_max": None,
                              "fwt": None}]


def test_first_and_last_task():
    s = summarize(R3, initial=INIT3)
    first, last = s["per_task"][0], s["per_task"][-1]
    assert first["fwt"] is None                       # no step before task 0 to transfer from
    assert last["forgetting"] is None and last["forgetting_max"] is None  # no step after it
    assert close(last["final_acc"], 0.9)
    # after step 0 only task 0 counts, not R[0][1], R[0][2] of tasks not trained yet
    assert close(s["acc_per_step"][0], 0.8)


def test_forgetting_max_ignores_steps_before_the_task_was_trained():
    r = [[0.9, 0.9, 0.1],   # task 1 already at 0.9 before its training: transfer, not learning
         [0.9, 0.7, 0.2],
         [0.8, 0.6, 0.9]]
    s = summarize(r)
    # task 1: max(R[1][1]) - 0.6 = 0.1, not 0.9 - 0.6; task 0: max(0.9, 0.9) - 0.8 = 0.1
    assert close([p["forgetting_max"] for p in s["per_task"][:2]], [0.1, 0.1])
    assert close(s["forgetting_max"], 0.1)
    assert close(s["forgetting"], 0.1)   # (0.9 - 0.8 + 0.7 - 0.6) / 2


def test_missing_entries_are_skipped_not_zero_or_nan():
    nan = float("nan")
    r = [[0.8, None, nan],
         [0.6, 0.7, None],
         [0.4, nan, 0.9]]
    s = summarize(r, initial=[0.1, 0.1, 0.1])
    assert close(s["acc_per_step"], [0.8, 0.65, 0.65])  # step 2: (0.4 + 0.9) / 2, task 1 missing
    assert close(s["final_acc"], 0.65)
    assert s["per_task"][1]["final_acc"] is None
    assert s["per_task"][1]["forgetting"] is None       # its final accuracy is missing
    assert close(s["forgetting"], 0.4)                  # task 0 only: 0.8 - 0.4
    assert close(s["forgetting_max"], 0.4)              # max(0.8, 0.6) - 0.4
    assert close(s["bwt"], -0.4)
    assert s["fwt"] is None                             # R[0][1] and R[1][2] both missing
    json.dumps(s, allow_nan=False)                      # no NaN leaks into the JSON

    # a step with nothing evaluated drops out of the average incremental accuracy
    s = summarize([[0.8, 0.1], [None, None]])
    assert s["acc_per_step"][1] is None and s["final_acc"] is None
    assert close(s["avg_incremental_acc"], 0.8)
    assert s["forgetting"] is None and s["bwt"] is None


def test_forward_transfer_needs_initial():
    s = summarize(R3)
    assert s["fwt"] is None
    assert all(p["fwt"] is None for p in s["per_task"])
    # a missing initial accuracy leaves out only that task: task 1: 0.2 - 0.1
    s = summarize(R3, initial=[None, 0.1, float("nan")])
    assert close(s["fwt"], 0.1)
    assert s["per_task"][2]["fwt"] is None


def test_bwt_and_fwt_agree_with_gem():
    rng = np.random.default_rng(0)
    t = 5
    r, b = rng.uniform(size=(t, t)), rng.uniform(size=t)
    s = summarize(r.tolist(), initial=b.tolist())
    # Lopez-Paz & Ranzato 2017, eq. for BWT and FWT (0-based)
    gem_bwt = sum(r[t - 1, i] - r[i, i] for i in range(t - 1)) / (t - 1)
    gem_fwt = sum(r[i - 1, i] - b[i] for i in range(1, t)) / (t - 1)
    assert close(s["bwt"], gem_bwt) and close(s["forgetting"], -gem_bwt)
    assert close(s["fwt"], gem_fwt)
    assert all(p["forgetting_max"] >= p["forgetting"] - 1e-12 for p in s["per_task"][:-1])
    assert close(summarize(np.array(r))["bwt"], gem_bwt)  # numpy input works too


@pytest.mark.parametrize("kwargs, message", [
    ({"matrix": []}, "matrix is empty"),
    ({"matrix": [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]}, r"matrix row 0 has 2 entries, but there are 3 rows"),
    ({"matrix": [[0.5, 0.5], [0.5]]}, r"matrix row 1 has 1 entries"),
    ({"matrix": [[0.5, 0.5], [0.5, 85.0]]}, r"matrix\[1\]\[1\] = 85.0 is outside \[0, 1\]"),
    ({"matrix": [[-0.1, 0.5], [0.5, 0.5]]}, r"matrix\[0\]\[0\] = -0.1 is outside"),
    ({"matrix": [[0.5, "a"], [0.5, 0.5]]}, r"matrix\[0\]\[1\] is not a number"),
    ({"matrix": R2, "initial": [0.1]}, "initial has 1 entries, but the matrix has 2 tasks"),
    ({"matrix": R2, "initial": [0.1, 1.5]}, r"initial\[1\] = 1.5 is outside"),
    ({"matrix": R2, "initial": 0.1}, "initial must be a list with one entry per task"),
    ({"matrix": R2, "sizes": [1, 2, 3]}, "sizes has 3 entries, but the matrix has 2 tasks"),
    ({"matrix": R2, "sizes": [10, -1]}, r"sizes\[1\] = -1 must be a non-negative"),
    ({"matrix": R2, "sizes": [float("nan"), 1]}, r"sizes\[0\] = nan must be a non-negative"),
    ({"matrix": R2, "sizes": [None, 1]}, r"sizes\[0\] = None must be a non-negative"),
    ({"matrix": 0.5}, "matrix must be a list of rows"),
    ({"matrix": [0.5, 0.5]}, r"matrix row 0 is not a list"),
])
def test_bad_input_raises_one_clear_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        summarize(**kwargs)
    assert "\n" not in str(info.value)


def test_mean_sd():
    runs = [{"final_acc": 0.7, "forgetting": 0.3, "per_task": [], "tasks": 2},
            {"final_acc": 0.8, "forgetting": None, "per_task": [], "tasks": 2},
            {"final_acc": 0.9, "forgetting": 0.1, "per_task": [], "tasks": 2}]
    out = mean_sd(runs)
    assert set(out) == {"final_acc", "forgetting", "tasks"}    # lists are not scalars
    assert close(out["final_acc"]["mean"], 0.8) and close(out["final_acc"]["sd"], 0.1)
    assert out["final_acc"]["n"] == 3
    # the run without forgetting is left out: mean of 0.3, 0.1; sd sqrt((0.1^2 + 0.1^2) / 1)
    assert out["forgetting"] == {"mean": pytest.approx(0.2), "sd": pytest.approx(math.sqrt(0.02)), "n": 2}
    assert out["tasks"] == {"mean": 2.0, "sd": 0.0, "n": 3}

    assert mean_sd(runs[:1])["final_acc"] == {"mean": 0.7, "sd": None, "n": 1}
    assert mean_sd(runs[1:2], keys=["forgetting"]) == {"forgetting": {"mean": None, "sd": None, "n": 0}}


def test_mean_sd_of_summaries():
    runs = [summarize(R2, initial=[0.1, 0.2]), summarize(R3, initial=INIT3), summarize([[0.7]])]
    out = mean_sd(runs)
    assert close(out["forgetting"]["mean"], 0.25) and out["forgetting"]["n"] == 2  # 0.3, 0.2
    assert close(out["forgetting"]["sd"], math.sqrt(0.005))   # (0.05^2 + 0.05^2) / 1
    assert close(out["final_acc"]["mean"], (0.7 + 2 / 3 + 0.7) / 3) and out["final_acc"]["n"] == 3
    assert close(out["fwt"]["mean"], (-0.1 + 0.175) / 2) and out["fwt"]["n"] == 2
    json.dumps(out, allow_nan=False)


def test_mean_sd_bad_input():
    with pytest.raises(ValueError, match="at least one run"):
        mean_sd([])
    with pytest.raises(ValueError, match=r"runs\[1\]\['per_task'\] is not a number"):
        mean_sd([{"per_task": None}, {"per_task": []}], keys=["per_task"])


def test_within_task_matrix_from_hand_computed_logits():
    """Two tasks of two classes, one test row per class. Scored among every class seen (the accuracy
    matrix) each row loses to a class of the other task; scored among its own task's classes only
    (the within-task matrix) one row of each task is right."""
    import torch
    from graftnet.continual.data import TaskTable
    from graftnet.continual.learner import score, score_within
    logits = torch.tensor([[1.0, 0.0, 5.0, 0.0],    # class 0: among all -> 2; within task 0 -> 0 (right)
                           [2.0, 1.0, 0.0, 3.0],    # class 1: among all -> 3; within task 0 -> 0
                           [0.0, 0.0, 1.0, 4.0],    # class 2: among all -> 3; within task 1 -> 3
                           [9.0, 0.0, 1.0, 2.0]])   # class 3: among all -> 0; within task 1 -> 3 (right)
    y = torch.arange(4)
    task = torch.tensor([0, 0, 1, 1])
    empty = torch.empty(0, 4)
    table = TaskTable({"test": empty}, {"test": y}, {"test": task}, list("abcd"), ["t0", "t1"],
                      [torch.tensor([0, 1]), torch.tensor([2, 3])])
    first, both = torch.tensor([True, True, False, False]), torch.ones(4, dtype=torch.bool)
    within = score_within(table, logits, y, task)
    assert within == [0.5, 0.5]
    # after the first task only its classes are visible: the first row's first entry is the same number
    assert score(table, logits, y, task, "class", first)[0] == within[0] == 0.5
    assert score(table, logits, y, task, "class", both) == [0.0, 0.0]
    # task-incremental scoring is within-task scoring: one matrix, not two
    assert score(table, logits, y, task, "task", both) == within
    # the same logits after both tasks: everything "forgotten" among all classes, nothing within the task,
    # by the same definitions (summarize) applied to each matrix
    plain = summarize([score(table, logits, y, task, "class", first), score(table, logits, y, task, "class", both)])
    inside = summarize([within, within])
    assert close(plain["forgetting"], 0.5) and close(plain["bwt"], -0.5) and close(plain["forgetting_max"], 0.5)
    assert close(inside["forgetting"], 0.0) and close(inside["bwt"], 0.0) and close(inside["forgetting_max"], 0.0)
