"""`run_auto`: look, probe, plan, then the stages in order, each recorded in AUTO/decisions.json as it
starts and ends (with the numbers its decision was made on), so that `--resume AUTO` goes on from
the first stage that did not finish and Ctrl-C still ships the best model trained so far.

The folder is made only once the plan says the budget suffices: a budget too small, bad data or a
dry run leave nothing behind.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig, resolve, save_yaml
from ..data.images import config_splits
from ..data.labels import open_data
from ..errors import ConfigError, GraftError
from ..io import atomic_write_json
from ..progress import log, make_console
from . import plan as plan_mod
from . import stages
from .budget import Budget, shown
from .probe import probe

DECISIONS = "decisions.json"
CONFIG = "auto.yaml"
FORMAT = "graftnet-auto-1"
STAGES = ("look", "probe", "search", "finetune", "resolution", "ensemble", "export", "distill", "prune", "deploy")
PROBE_S = 5.0             # a candidate's probe on a small set: model build, sample features, fit
# the budget must hold every candidate's probe, one head fit and the export
MIN_FIXED_S = plan_mod.FIXED["search"] + plan_mod.FIXED["export"] + plan_mod.FIXED["deploy"]
OVERRUN = 1.10            # the promise: done within the budget plus 10%


@dataclass
class Request:
    """What the user asked for: the base config (data, seeds, cache) and the auto settings."""
    cfg: RunConfig
    budget_s: float
    candidates: list
    max_latency_ms: float | None = None
    target: str = "cpu"
    command: str = "graft auto"


def minimum_budget(candidates: list) -> float:
    return PROBE_S * len(candidates) + MIN_FIXED_S


class Record:
    """decisions.json: the request, the look, the probe, the plan and one entry per stage."""

    def __init__(self, folder: Path, data: dict | None = None):
        self.folder, self.data = folder, data or {"format": FORMAT, "stages": {}}

    @classmethod
    def load(cls, folder: Path) -> "Record":
        path = folder / DECISIONS
        if not path.is_file() or not (folder / CONFIG).is_file():
            raise GraftError(f"{folder}: not a `graft auto` folder (no {DECISIONS} and {CONFIG}); nothing to resume")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise GraftError(f"{path}: not valid JSON ({e}); nothing to resume") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise GraftError(f"{path}: not a `graft auto` record (format {FORMAT}); nothing to resume")
        return cls(folder, data)

    def save(self, budget: Budget) -> None:
        self.data["spent_s"] = round(budget.spent(), 2)
        atomic_write_json(self.folder / DECISIONS, self.data)

    def stage(self, name: str) -> dict:
        return self.data["stages"].get(name) or {}

    def done(self, name: str) -> bool:
        return self.stage(name).get("status") in ("done", "skipped")

    def begin(self, name: str, budget: Budget, expected: float | None) -> None:
        runs = self.stage(name).get("attempts", 0) + 1
        self.data["stages"][name] = {"status": "running", "started": _now(), "attempts": runs,
                                     "expected_s": None if expected is None else round(expected, 1)}
        self.save(budget)
        i = STAGES.index(name) + 1
        log(f"[bold]auto: stage {i}/{len(STAGES)} {name}[/]"
            + (f", expected {shown(expected)}" if expected is not None else "")
            + f"; budget left {shown(budget.left())}, ends by {time.strftime('%H:%M:%S', time.localtime(time.time() + budget.left()))}")

    def end(self, name: str, budget: Budget, status: str, decision: str, numbers: dict, began: float) -> None:
        entry = self.data["stages"][name]
        entry.update(status=status, ended=_now(), seconds=round(time.monotonic() - began, 2),
                     decision=decision, numbers=numbers)
        self.save(budget)
        log(f"auto: {name}: {decision} ({shown(entry['seconds'])})")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def prepare(req: Request, budget: Budget) -> tuple[dict, dict, dict]:
    """The look, the probe and the plan: nothing written. Raises when the budget cannot hold them."""
    need = minimum_budget(req.candidates)
    if budget.left() < need:
        raise ConfigError(f"--budget {shown(budget.left())}: too small; probing {len(req.candidates)} candidate(s) "
                          f"and exporting need at least {shown(need)} (give --budget {int(need) + 1}s or more)")
    source = open_data(req.cfg.data, req.cfg.cache_dir)
    if source.multilabel:
        raise ConfigError(f"{req.cfg.data.labels}: multi-label data; `graft auto` chooses models by "
                          "single-label accuracy (use `graft train` for multi-label sets)")
    began = time.monotonic()
    data = plan_mod.look(req.cfg)
    data["seconds"] = round(time.monotonic() - began, 2)
    splits = config_splits(source, req.cfg.data)
    found = probe(req.cfg, source, splits, req.candidates, feature_share_s=0.4 * budget.left())
    made = plan_mod.make_plan(data, found, budget.left(), prune=req.max_latency_ms is not None)
    if made["search_s"] < _first(made):
        cap = plan_mod.slice_to_fit(data, made)
        if cap is None:
            need = budget.spent() + _first(made) + made["reserve_s"]
            raise ConfigError(f"--budget {shown(budget.total)}: too small for this data; the backbone pass over "
                              f"{sum(data['counts'].values())} images and the export take about {shown(need)} here "
                              f"(give --budget {int(need * 1.2) + 1}s or more, or fewer images: --set data.max_per_class=N)")
        # the whole set's backbone pass would not leave time for anything else: train on a slice
        whole = data["counts"]
        req.cfg = dataclasses.replace(req.cfg, data=dataclasses.replace(req.cfg.data, max_per_class=cap))
        data = {**plan_mod.look(req.cfg), "seconds": data["seconds"]}
        data["notes"].append(f"the whole set's backbone pass ({shown(made['estimates']['features'])}) does not fit "
                             f"the budget: at most {cap} images per class and split (data.max_per_class); all "
                             f"would be {whole}")
        made = plan_mod.make_plan(data, found, budget.left(), prune=req.max_latency_ms is not None)
    return data, found, made


def _first(made: dict) -> float:
    """The search's first trial: decoding and the backbone pass that fills the feature cache."""
    return made["estimates"]["decode"] + made["estimates"]["features"] + plan_mod.FIXED["search"]


def run_auto(req: Request, folder: Path, dry_run: bool = False, resume: bool = False) -> dict:
    """Run (or continue) `graft auto` in `folder`; returns decisions.json's content."""
    folder = Path(folder)
    console = make_console()
    if resume:
        record = Record.load(folder)
        req.cfg = resolve(folder / CONFIG)
        req.max_latency_ms, req.target, req.command = (record.data.get(k) for k in ("max_latency_ms", "target", "command"))
        budget = Budget(record.data["budget_s"], record.data.get("spent_s", 0.0))
        data, found, made = record.data["look"], record.data["probe"], record.data["plan"]
        log(f"auto: resuming {folder}; {shown(budget.left())} of the budget left")
    else:
        if folder.exists() and any(folder.iterdir()):
            raise GraftError(f"{folder}: exists and is not empty; continue it with --resume or pick --name")
        budget = Budget(req.budget_s)
        data, found, made = prepare(req, budget)
        plan_mod.print_plan(data, found, made, req.budget_s, console)
        if dry_run:
            return {"look": data, "probe": found, "plan": made, "dry_run": True}
        folder.mkdir(parents=True, exist_ok=True)
        save_yaml(req.cfg, folder / CONFIG, "the base config of this `graft auto` folder (data, seeds, cache)")
        record = Record(folder)
        record.data.update(command=req.command, budget_s=req.budget_s, max_latency_ms=req.max_latency_ms,
                           target=req.target, candidates=[f"{n}:{p or ''}".rstrip(":") for n, p in req.candidates],
                           look=data, probe=found, plan=made)
        for name, numbers, decision in (
                ("look", {"counts": data["counts"], "imbalance": data["imbalance"]}, "; ".join(data["notes"]) or "no problems found"),
                ("probe", {"candidates": found["candidates"]}, f"{found['chosen']['backbone']} at "
                 f"{found['chosen']['image_size']} px: {found['why']}")):
            record.data["stages"][name] = {"status": "done", "started": _now(), "ended": _now(), "attempts": 1,
                                           "seconds": (found if name == "probe" else data)["seconds"], "decision": decision,
                                           "numbers": numbers}
        record.save(budget)
    if req.target == "gpu":
        log("auto: --target gpu: latency is measured with ONNX Runtime's CPU provider on this machine")
    return _stages(req, folder, record, budget, data, found, made)


def _stages(req: Request, folder: Path, record: Record, budget: Budget, data: dict, found: dict, made: dict) -> dict:
    from .deploy import write_deployment
    base = stages.base_config(req.cfg, found["chosen"], data, made.get("image_size"))
    if made.get("size_reason"):
        log(f"auto: {made['size_reason']}")
    # a stage runs again when it or any stage before it did not finish (its inputs may have changed)
    rerun = next((s for s in STAGES if not record.done(s)), None)
    todo = STAGES[STAGES.index(rerun):] if rerun else ()
    interrupted = None

    def run(name: str, expected: float | None, work):
        nonlocal interrupted
        if name not in todo:
            return record.stage(name).get("numbers")
        began = time.monotonic()
        record.begin(name, budget, expected)
        try:
            status, decision, numbers = work()
        except KeyboardInterrupt:
            if name in ("export", "deploy"):
                raise
            interrupted = name
            record.end(name, budget, "interrupted", "interrupted (Ctrl-C); the best model so far ships",
                       record.stage(name).get("numbers") or {}, began)
            return None
        record.end(name, budget, status, decision, numbers, began)
        return numbers

    # what fine-tuning leaves to the stages after it (a folder of an older version has none of them)
    after_s = made.get("resolution_s", 0.0) + made.get("ensemble_s", 0.0) + made.get("distill_s", 0.0)
    search_end = time.monotonic() + max(0.0, budget.left() - made["reserve_s"] - made["finetune_s"] - after_s)

    def do_search():
        nonlocal interrupted
        # no trial starts later than a trial's length before the share ends
        stop_at = time.monotonic() + max(1.0, search_end - time.monotonic() - plan_mod.FIXED["search"])
        r = stages.search(base, folder / "search", stop_at - time.monotonic(), data["counts"]["train"],
                          req.command, resume=record.stage("search").get("attempts", 0) > 1)
        if r.pop("stopped"):
            interrupted = "search"
        return "done", (f"best trial {r['best_trial']} of {r['trials']}: validation accuracy {r['val_acc']:.4f}"), r
    best = run("search", search_end - time.monotonic(), do_search)
    if best is None:
        raise GraftError(f"{folder}: stopped before any head was trained; nothing to ship "
                         f"(`graft auto --resume {folder}` goes on)")

    def do_finetune():
        left = budget.left() - made["reserve_s"] - after_s
        epochs = plan_mod.epochs_that_fit(made, left)
        if interrupted:
            return "skipped", "skipped: stopped by Ctrl-C", {"planned_epochs": made["finetune_epochs"]}
        if epochs < 1:
            reason = made["finetune_reason"] if not made["finetune_epochs"] else \
                f"{shown(left)} left, one epoch takes about {shown(made['estimates']['finetune_epoch'])}"
            return "skipped", f"skipped: {reason}", {"planned_epochs": made["finetune_epochs"], "left_s": round(left, 1)}
        r = stages.finetune(best["run"], folder, epochs, budget.deadline - made["reserve_s"] - after_s,
                            resume=record.stage("finetune").get("attempts", 0) > 1)
        r["kept"], margin = stages.finetune_kept(r["val_acc"], best["val_acc"], data["counts"]["val"])
        verdict = (f"kept (from {100 * margin:.2f} points below: the head's score is the best of the search's "
                   "trials on the same images)" if r["kept"] else "not kept (the head alone is better)")
        return "done", (f"{r['epochs_run']} epoch(s): validation accuracy {r['val_acc']:.4f} against the head's "
                        f"{best['val_acc']:.4f}; {verdict}"), r
    tuned = run("finetune", made["finetune_s"] or None, do_finetune)
    source_run = tuned["run"] if tuned and tuned.get("kept") else best["run"]

    def do_resolution():
        size = made.get("resolution_size")
        if not size:
            return "skipped", f"skipped: {made.get('resolution_reason') or 'no resolution step without fine-tuning'}", {}
        if interrupted:
            return "skipped", "skipped: stopped by Ctrl-C", {}
        if not (tuned and tuned.get("kept")):
            return "skipped", "skipped: no fine-tuned model to go on from", {}
        # the larger model's export is in the reserve; the stages after this one have no share
        deadline = budget.deadline - made["reserve_s"] - made.get("ensemble_s", 0.0) - made.get("distill_s", 0.0)
        epoch = plan_mod.estimates(data, found, size)["finetune_epoch"]
        epochs = min(plan_mod.RESOLUTION_EPOCHS, int((deadline - time.monotonic() - plan_mod.FIXED["finetune"]) // epoch))
        if epochs < 1:
            return "skipped", f"skipped: one epoch at {size} px takes about {shown(epoch)}; the time is spent", {}
        r = stages.resolution_step(tuned["run"], folder, size, epochs, deadline,
                                   resume=record.stage("resolution").get("attempts", 0) > 1)
        if "skipped" in r:
            return "skipped", f"skipped: {r['skipped']}", r
        r["kept"] = r["val_acc"] >= tuned["val_acc"] + stages.MIN_STEP_GAIN
        verdict = "kept" if r["kept"] else f"not kept (the larger input must gain {100 * stages.MIN_STEP_GAIN:.1f} points)"
        return "done", (f"{r['epochs_run']} epoch(s) at {size} px: validation accuracy {r['val_acc']:.4f} against "
                        f"{tuned['val_acc']:.4f} at {base.backbone.image_size} px; {verdict}"), r
    stepped = run("resolution", made.get("resolution_s") or None, do_resolution)
    if stepped and stepped.get("kept"):
        source_run = stepped["run"]

    def do_ensemble():
        members = made.get("members", 1)
        if members < 2:
            return "skipped", f"skipped: {made.get('ensemble_reason') or 'one model'}", {}
        if interrupted:
            return "skipped", "skipped: stopped by Ctrl-C", {}
        if not (tuned and tuned.get("kept")):
            return "skipped", "skipped: no fine-tuned model to add members to", {}
        r = stages.ensemble_members(tuned["run"], folder, members - 1,
                                    budget.deadline - made["reserve_s"] - made.get("distill_s", 0.0),
                                    resume=record.stage("ensemble").get("attempts", 0) > 1)
        accs = ", ".join(f"{a:.4f}" for a in r["val_accs"])
        if not r["runs"]:
            return "skipped", f"skipped: {r['why']}", r
        why = r.pop("why")
        return "done", (f"{len(r['runs'])} more model(s) fine-tuned from other seeds (validation accuracy {accs}; "
                        f"the first {tuned['val_acc']:.4f})" + (f"; {why}" if why else "")), r
    grown = run("ensemble", made.get("ensemble_s") or None, do_ensemble)
    members = [source_run, *grown["runs"]] if grown and grown.get("runs") and source_run == tuned["run"] else [source_run]

    gap = stages.round_gap(req.budget_s)   # between the rounds of every timing in turns

    def do_export():
        models = stages.measure(source_run)
        if len(members) > 1:
            models.update(stages.measure_ensemble(members, models, folder / "ensemble"))
        models, = stages.timed_together(models, gap=gap)
        choice = stages.choose(models, req.max_latency_ms)
        if not choice["meets"]:
            log(f"[yellow]auto: {choice['why']}[/]")
        choice["tta"] = stages.tta(models[choice["model"]], source_run, budget.left() - made["estimates"]["test"],
                                   made["estimates"]["tta"], req.max_latency_ms)
        why = choice["why"] + (f"; {choice['tta']['why']}" if choice["tta"].get("why") else "")
        choice["distill_why"] = stages.distillation_needed(models, choice, req.max_latency_ms)
        if choice["distill_why"]:
            why += f"; {choice['distill_why']}: one model learns from it next"
        return "done", why, {"run": source_run, "members": members, "models": models, **choice}

    exported = run("export", made["estimates"]["export"], do_export)

    def do_distill():
        if interrupted:
            return "skipped", "skipped: stopped by Ctrl-C", {}
        if not exported.get("distill_why"):
            return "skipped", ("skipped: no ensemble" if len(exported.get("members", [])) < 2 else
                               "skipped: no latency bound rules the ensemble out"), {}
        epochs = plan_mod.epochs_that_fit(made, budget.left() - made["estimates"]["test"] - made["estimates"]["export"],
                                          teachers=len(exported["members"]))
        if epochs < 1:
            return "skipped", "skipped: no time left for one epoch taught by the ensemble", {}
        r = stages.distill_ensemble(exported["members"], folder, epochs,
                                    budget.deadline - made["estimates"]["test"] - made["estimates"]["export"],
                                    resume=record.stage("distill").get("attempts", 0) > 1)
        singles = {k: m for k, m in exported["models"].items() if not k.startswith("ensemble")}
        singles, r["models"] = stages.timed_together(singles, stages.measure(r["run"], r["val_acc"]), gap=gap)
        choice = stages.choose({**singles, **{f"distilled-{k}": m for k, m in r["models"].items()}}, req.max_latency_ms)
        r["ships"] = choice["model"].startswith("distilled-")
        if r["ships"]:
            r.update(model=choice["model"].removeprefix("distilled-"), meets=choice["meets"],
                     tta={"used": False, "why": "test-time flips not tried: the latency bound is what distillation is for"})
        return "done", (f"{r['epochs_run']} epoch(s) taught by the {len(exported['members'])}-model ensemble: validation "
                        f"accuracy {r['val_acc']:.4f}; {choice['why']}; "
                        + ("the distilled model ships" if r["ships"] else "the single model it was to beat ships")), r
    distilled = run("distill", made.get("distill_s") or None, do_distill)
    if distilled and distilled.get("ships"):
        exported = {**distilled, "members": [distilled["run"]]}

    def do_prune():
        if interrupted:
            return "skipped", "skipped: stopped by Ctrl-C", {}
        if req.max_latency_ms is None or exported["meets"]:
            return "skipped", ("skipped: no --max-latency-ms" if req.max_latency_ms is None else
                               f"skipped: {exported['model']} meets --max-latency-ms"), {}
        def left():
            return budget.left() - made["estimates"]["test"] - made["estimates"]["export"]
        resume, epoch_s = record.stage("prune").get("attempts", 0) > 1, made["estimates"]["finetune_epoch"]
        no_tta = {"used": False, "why": "test-time flips not tried: the latency bound is what this stage is for"}
        # fewer pixels first: they keep every channel (stages.MIN_LATENCY_SCALE's evidence)
        small = stages.smaller_input(exported, req.max_latency_ms, folder, left(), epoch_s, resume, gap=gap)
        if small["resized"]:
            first = stages.choose(small["models"], req.max_latency_ms)
            small.update(first, ships=first["meets"], tta=no_tta)
            said = f"input {small['image_size']} px, {small['epochs_run']} epoch(s): {first['why']}"
            if first["meets"]:
                return "done", f"{said}; it meets the bound and ships", small
            log(f"auto: prune: {said}; over the bound, so pruning is tried")
        else:
            said = small["why"]
        r = stages.prune_for_latency(exported, req.max_latency_ms, folder, left(), epoch_s, req.cfg.train.seed,
                                     resume, gap=gap)
        if not r["pruned"]:
            if small["resized"] and small["models"][small["model"]]["latency_ms"] < small["baseline_ms"]:
                small["ships"] = True
                return "done", f"{said}; it ships, being faster; {r['why']}", small
            return "skipped", f"{said}; {r['why']}", {**r, "smaller": small}
        choice = stages.choose(r["models"], req.max_latency_ms)
        r.update(choice, ships=choice["meets"] or r["models"][choice["model"]]["latency_ms"] < r["baseline_ms"],
                 tta=no_tta, smaller=small)
        verdict = ("it meets the bound and ships" if choice["meets"] else "it does not meet the bound either; "
                   + ("it ships, being faster" if r["ships"] else "the unpruned model ships"))
        return "done", (f"{said}; {r['amount']:.0%} of the channels inside blocks removed, {r['recovery_epochs']} "
                        f"recovery epoch(s), MACs x{r['macs_ratio']:.2f}: {choice['why']}; {verdict}"), r
    pruned = run("prune", made.get("prune_s") or None, do_prune)
    shipping = pruned if pruned and pruned.get("ships") else exported

    def do_deploy():
        result = write_deployment(folder, record.data, shipping, req.command)
        return "done", f"shipped {result['model']}: test accuracy {result['test_accuracy_text']}", result
    run("deploy", made["estimates"]["test"], do_deploy)
    write_deployment(folder, record.data, shipping, req.command, report_only=True)  # with the deploy stage in it
    spent = budget.spent()
    record.data["result"] = {**record.stage("deploy").get("numbers", {}), "spent_s": round(spent, 1),
                             "within_budget": spent <= OVERRUN * record.data["budget_s"],
                             "interrupted": interrupted}
    record.save(budget)
    if interrupted:
        log(f"[yellow]auto: interrupted in {interrupted}; shipped the best model so far. `graft auto --resume "
            f"{folder}` goes on[/]")
    return record.data
