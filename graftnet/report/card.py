"""MODEL_CARD.md: what a model handed to someone else was trained on, how well it does, and where
it should not be used, in the Hugging Face model-card layout (a YAML metadata block with
`model-index` results, then the sections of Mitchell et al.'s "Model Cards for Model Reporting").

Written from what a run folder already records (config, model.json, test metrics, history,
environment), so a card never states a number the run did not measure. No library renders this
layout from a run (huggingface_hub's ModelCard needs a Hub repository's metadata and a Jinja
template; the content is ours either way), so it is a plain template here.
"""
from __future__ import annotations

from pathlib import Path

import yaml

CARD_FILE = "MODEL_CARD.md"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _metadata(name: str, spec: dict, metrics: dict, data_name: str) -> str:
    results = [{"type": "accuracy", "name": "test accuracy", "value": round(metrics["accuracy"], 4)}]
    if metrics.get("macro"):
        results.append({"type": "f1", "name": "macro F1 (test)", "value": round(metrics["macro"]["f1"], 4)})
    auc = (metrics.get("binary") or {}).get("auc")
    if auc is not None:
        results.append({"type": "roc_auc", "name": "ROC-AUC (test)", "value": round(auc, 4)})
    meta = {"library_name": "graftnet", "pipeline_tag": "image-classification",
            "tags": ["image-classification", "transfer-learning", "graftnet", spec["backbone"]],
            "metrics": [r["type"] for r in results],
            "model-index": [{"name": name, "results": [{
                "task": {"type": "image-classification", "name": "image classification"},
                "dataset": {"name": data_name, "type": "imagefolder", "split": "test"},
                "metrics": results}]}]}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def render_card(name: str, spec: dict, cfg: dict, metrics: dict, history: list[dict], env: dict,
                counts: dict[str, int], latency: dict | None = None, exported: dict | None = None,
                path: str | None = None) -> str:
    """The card as Markdown; `path`: the run folder as the commands in it should name it. `spec`: model.json; `cfg`: config.yaml as a dict; `metrics`:
    test_metrics.json; `counts`: images per split; `latency`: label -> measured milliseconds;
    `exported`: what an export folder holds (format, file, size, checks)."""
    classes = spec["classes"]
    data_name = Path(str(cfg["data"]["path"])).name or str(cfg["data"]["path"])
    if metrics.get("task") == "multilabel":
        return _multilabel_card(name, spec, cfg, metrics, counts, data_name, path)
    binary = metrics.get("binary")
    lo, hi = metrics["accuracy_ci95"]
    head = spec.get("head", {})
    hidden = " → ".join(f"Dense {w} {head.get('activation', 'relu')}" for w in head.get("hidden", []))
    gate = spec.get("gate") or {}   # graft extend kept the run's head (heads.GatedHead): it has k outputs
    arch = (f"{spec['backbone']} (timm `{spec['timm_name']}`, weights `{spec['weights_id']}`), "
            f"{spec['features']} features, {head.get('pool', 'avg')} pooling → "
            + (f"{hidden} → " if hidden else "")
            + (f"Dropout {head['dropout']:g} → " if hidden and head.get("dropout") else "")
            + f"Dense {gate.get('old_classes', len(classes))}")
    if gate:
        arch += (f" for the first {gate['old_classes']} classes, beside a prototype head (`graft extend`) that "
                 f"adds the other {len(classes) - gate['old_classes']} and chooses between the two groups")
    train, ft = cfg["train"], cfg["finetune"]
    epochs = [r for r in history if "epoch" in r]
    stage2 = (f"; then {ft['epochs']} epochs fine-tuning backbone groups ({ft['unfreeze']}) at "
              f"{ft['lr']:g} with {ft['optimizer']}" if ft.get("epochs") else "")
    pretrained = (f"a randomly initialised {spec['backbone']} (no pretrained weights)"
                  if spec["weights_id"] == "random" else f"a pretrained {spec['backbone']}")
    command = "finetune" if ft.get("epochs") else "train"
    lines = [_metadata(name, spec, metrics, data_name), f"# Model card: {name}", "",
             f"An image classifier for {len(classes)} classes ({', '.join(classes[:12])}"
             + (", ..." if len(classes) > 12 else "") + f"), made with graftnet by grafting a new head "
             f"onto {pretrained}. Test accuracy {_pct(metrics['accuracy'])} "
             f"(95% interval {_pct(lo)}–{_pct(hi)}) on {metrics['n']:,} held-out images of {data_name}.", "",
             "## Model details", "",
             f"- Architecture: {arch}",
             f"- Input: RGB{' (luminance copied to R, G and B)' if cfg['data'].get('grayscale') else ''}, "
             f"{spec['image_size']}x{spec['image_size']} px, normalised with mean {spec['mean']} and std {spec['std']}",
             f"- Made with graftnet {env.get('packages', {}).get('graftnet', '?')} (commit "
             f"{(env.get('graftnet_commit') or 'unknown')[:12]}), PyTorch {env.get('packages', {}).get('torch', '?')}, "
             f"on {env.get('time', 'an unrecorded date')}",
             "- Files: `model.safetensors` (weights), `model.json` (architecture and classes), "
             "`config.yaml` (every setting of the run)", ""]
    if spec.get("pruned"):
        lines.insert(-1, f"- Pruned: {spec['pruned']}")
    lines += ["## Intended use", "",
              f"Classifying images like those of {data_name} into its {len(classes)} classes, on the "
              "same kind of images (camera, resolution, subjects) it was trained and tested on. Every "
              "image gets one of these classes: it cannot say \"none of these\".", "",
              "## Training data", "",
              f"- Source: `{cfg['data']['path']}`" + (f", at most {cfg['data']['max_per_class']} images per "
                                                       "class and split" if cfg["data"].get("max_per_class") else ""),
              "- Images: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v is not None),
              f"- Classes ({len(classes)}): {', '.join(classes)}", "",
              "## Evaluation", "",
              f"On the test split ({metrics['n']:,} images), never used for training or for choosing "
              "settings:", "",
              "| metric | value |", "|---|---:|",
              f"| accuracy | {_pct(metrics['accuracy'])} (95% Wilson interval {_pct(lo)}–{_pct(hi)}) |"]
    lines += [f"| {k.replace('top', 'top-')} accuracy | {_pct(v)} |" for k, v in metrics.get("top_k", {}).items()
              if k != "top1"]
    if metrics.get("macro"):
        lines.append(f"| macro F1 | {metrics['macro']['f1']:.4f} |")
    if binary:
        lines.append(f"| ROC-AUC (positive class {binary['positive_class']}) | "
                     + ("undefined (one class in the test split)" if binary.get("auc") is None
                        else f"{binary['auc']:.4f}") + " |")
        for key, label in (("argmax", "at the highest probability"), ("threshold", "at the chosen threshold")):
            if key in binary:
                b = binary[key]
                where = f" {b['value']:.3f}, chosen on {b['chosen_on']}" if key == "threshold" else ""
                lines.append(f"| sensitivity / specificity {label}{where} | "
                             f"{_pct(b['sensitivity'])} / {_pct(b['specificity'])} |")
    q = metrics.get("int8")
    if q and q.get("accepted") and q.get("test_int8") is not None:
        lines.append(f"| int8 ONNX model (`export/model.int8.onnx`) | {_pct(q['test_int8'])} against "
                     f"{_pct(q['test_fp32'])} for fp32 ONNX"
                     + (f", {q['speedup_b1']:.2f}x its speed at batch 1" if q.get("speedup_b1") else "") + " |")
    if metrics.get("per_class"):
        lines += ["", "| class | precision | recall | F1 | test images |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {c['class']} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |"
                  for c in metrics["per_class"]]
    if latency:
        lines += ["", "## Latency", "", "| measured | milliseconds |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in latency.items()]
    if exported:
        lines += ["", "## This export", ""] + [f"- {k}: {v}" for k, v in exported.items()]
    lines += ["", "## Training procedure", "",
              f"- Stage 1: the head on the frozen backbone, {train['epochs']} epochs, {train['optimizer']} at "
              f"lr {train['lr']:g}, batch {train['batch_size']}, weight decay {train['weight_decay']:g}, label "
              f"smoothing {train['label_smoothing']:g}, augmentation {train['augment']}{stage2}",
              f"- Epochs run: {len(epochs)}" + (f"; best validation accuracy {_pct(max(r['val_acc'] for r in epochs if r.get('val_acc') == r.get('val_acc')))}"
                                               if any(r.get("val_acc") == r.get("val_acc") and "val_acc" in r for r in epochs) else ""),
              f"- Seed {train['seed']}; the split is fixed by data.split_seed {cfg['data']['split_seed']}",
              f"- Remake it: `graft {command} --config config.yaml` (this run's own config file)", "",
              "## Limitations and risks", "",
              f"- The test accuracy holds for images like the test split's; its 95% interval is "
              f"{_pct(hi - lo)} wide at {metrics['n']:,} test images. Images from another source (another "
              "camera, hospital, season or population) can score much lower: test on them before use.",
              "- Classes absent from training are forced into one of the known classes; probabilities "
              "are not calibrated to be read as certainties.",
              f"- The backbone's pretraining data ({spec['weights_id']}) carries its own biases into the features."
              if spec["weights_id"] != "random" else "- The backbone was not pretrained: its features are random."]
    if binary:
        lines.append(f"- Two-class screening ({' vs '.join(classes)}): this model is not a medical device and "
                     "has not been validated clinically. Do not use it to diagnose or to rule out a "
                     "condition; at most as an aid under a qualified professional's review, after "
                     "validation on the population and equipment where it would be used. Sensitivity "
                     "and specificity trade off through the decision threshold: choose it for the cost "
                     "of a missed case against a false alarm, on validation data, not on the test split.")
    lines += ["", "## How to use", "", "```bash",
              f"graft predict {path or name} image.jpg   # or a folder of images",
              f"graft serve {path or name}               # HTTP: POST /predict",
              f"graft export {path or name}              # ONNX + preprocess.json", "```", ""]
    return "\n".join(lines)


def _multilabel_card(name: str, spec: dict, cfg: dict, m: dict, counts: dict, data_name: str,
                     path: str | None) -> str:
    """A shorter card for a multi-label model: what it tags, how well per label, how to use it."""
    f = lambda v: "—" if v is None else f"{v:.4f}"  # noqa: E731
    meta = {"library_name": "graftnet", "pipeline_tag": "image-classification",
            "tags": ["image-classification", "multi-label", "transfer-learning", "graftnet", spec["backbone"]],
            "model-index": [{"name": name, "results": [{
                "task": {"type": "image-classification", "name": "multi-label image classification"},
                "dataset": {"name": data_name, "type": "imagefolder", "split": "test"},
                "metrics": [{"type": "map", "name": "mAP (test)", "value": round(m["map"] or 0, 4)},
                            {"type": "f1", "name": "macro F1 (test)", "value": round(m["macro"]["f1"], 4)}]}]}]}
    classes = spec["classes"]
    lines = ["---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n", f"# Model card: {name}", "",
             f"A multi-label image classifier: each image gets every one of its {len(classes)} labels "
             f"({', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''}) whose probability reaches "
             f"the label's threshold, none or several. Made with graftnet on a pretrained {spec['backbone']} "
             f"({spec['image_size']} px). Test mAP {f(m['map'])}, macro F1 {f(m['macro']['f1'])}, micro F1 "
             f"{f(m['micro']['f1'])} on {m['n']:,} held-out images of {data_name}.", "",
             "## Training data", "", f"- Source: `{cfg['data']['path']}`, labels `{cfg['data'].get('labels')}`",
             "- Images: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v is not None), "",
             "## Evaluation", "", "Thresholds were chosen per label on the validation split (highest F1).", "",
             "| label | ROC-AUC | AP | F1 | threshold | test images with it |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['class']} | {f(r['auc'])} | {f(r['ap'])} | {r['f1']:.4f} | {r['threshold']:.3f} | "
              f"{r['support']} |" for r in m["per_label"]]
    lines += ["", "## How to use", "", "```bash", f"graft predict {path or name} IMAGES   # labels above threshold",
              "```", ""]
    return "\n".join(lines)


def write_card(run_dir: Path, dest: Path | None = None, latency: dict | None = None,
               exported: dict | None = None) -> Path | None:
    """MODEL_CARD.md for a finished run folder, from its own files (None where it holds no single
    model: an ensemble's members have their own cards). `dest`: another folder (an export)."""
    import json

    from ..io import atomic_write_text
    files = {f: run_dir / f for f in ("model.json", "config.yaml", "test_metrics.json")}
    if not all(p.is_file() for p in files.values()):
        return None
    from ..run import read_history
    env_path = run_dir / "environment.json"
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    history = read_history(run_dir)
    metrics = json.loads(files["test_metrics.json"].read_text())
    counts = metrics.get("split_sizes") or {"test": metrics["n"]}
    text = render_card(run_dir.name, json.loads(files["model.json"].read_text()),
                       yaml.safe_load(files["config.yaml"].read_text()), metrics, history, env, counts,
                       latency, exported, path=str(run_dir))
    return atomic_write_text((dest or run_dir) / CARD_FILE, text)
