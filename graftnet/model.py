"""Build a grafted model from a config, and save/load it as safetensors + a JSON spec.

The JSON spec holds plain values only (nanoGPT keeps its config in the checkpoint the same way), so
`load_model(run_dir)` rebuilds the exact architecture without pickles and without network.
"""
from __future__ import annotations

import json
import math
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from . import backbones
from .config import MAX_IMAGE_SIZE, BackboneConfig, HeadConfig, RunConfig
from .errors import GraftError
from .fields import check_choices, from_dict
from .heads import FeatureExtractor, GraftedModel, Pool, cut_backbone, make_head
from .io import atomic_write_json, save_tensors
from .shapes import apply_shapes


@dataclass
class ModelSpec:
    backbone: str
    timm_name: str
    weights_id: str
    classes: list[str]
    image_size: int
    mean: list[float]
    std: list[float]
    features: str
    multi_taps: int
    head: dict = field(default_factory=dict)
    feature_dim: int = 0
    pruned: dict = field(default_factory=dict)  # structured pruning: module -> changed sizes (shapes.py)
    cut: int = 0                                 # backbone stages dropped from the end (heads.cut_backbone)
    # several labels per image: a sigmoid per class, each decided at its own threshold (a
    # probability chosen on the validation split); absent in older model.json files: single-label
    multilabel: bool = False
    thresholds: list[float] = field(default_factory=list)
    # `graft extend` keeping the run's head (heads.GatedHead): {"old_classes": k, "hidden": widths of
    # the prototype head}; `head` then describes the kept MLP of the first k classes. Empty: an MLP.
    gate: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _assemble(timm_model, spec: ModelSpec) -> GraftedModel:
    if spec.cut:
        try:
            cut_backbone(timm_model, spec.cut)
        except ValueError as e:
            raise GraftError(f"{spec.backbone}: {e}") from None
    extractor = FeatureExtractor(timm_model, spec.features, spec.multi_taps)
    head_cfg = HeadConfig(**spec.head)
    pool = Pool(head_cfg.pool)
    spec.feature_dim = _pooled_width(extractor, pool, spec)
    model = GraftedModel(extractor, pool, make_head(spec.feature_dim, spec.num_classes, head_cfg, spec.gate))
    if spec.pruned:  # channel-pruned: shrink the stock layers to the saved sizes before loading
        apply_shapes(model, spec.pruned)
        spec.feature_dim = _pooled_width(extractor, pool, spec)
    return model


def _pooled_width(extractor: FeatureExtractor, pool: Pool, spec: ModelSpec) -> int:
    try:
        return pool.out_features(extractor.channels(spec.image_size))
    except (RuntimeError, AssertionError, ValueError) as e:  # timm asserts a ViT's fixed size
        what = "the pruned sizes do not fit together, or " if spec.pruned else ""
        raise GraftError(f"image_size {spec.image_size}: {what}{spec.backbone} cannot take it "
                         f"({_first_line(e)})") from None


def build_model(cfg: RunConfig, classes: list[str], multilabel: bool = False) -> tuple[GraftedModel, ModelSpec]:
    bspec = backbones.get_spec(cfg.backbone.name)
    timm_model, weights_id = backbones.create(bspec, cfg.backbone.pretrained, cfg.backbone.weights)
    spec = ModelSpec(
        backbone=bspec.name, timm_name=bspec.timm_name, weights_id=weights_id, classes=list(classes),
        image_size=cfg.backbone.image_size or bspec.input_size, mean=list(bspec.mean),
        std=list(bspec.std), features=cfg.backbone.features, multi_taps=bspec.multi_taps,
        head=asdict(cfg.head), cut=cfg.backbone.cut, multilabel=multilabel)
    model = _assemble(timm_model, spec)
    for p in model.extractor.parameters():  # the backbone starts frozen
        p.requires_grad_(False)
    return model, spec


def init_from_run(model: GraftedModel, spec: ModelSpec, run_dir: str | Path) -> str:
    """Load a finished run's weights into a freshly built model of the same architecture (the image
    size may differ: pooled features do not depend on it). With other classes only the backbone is
    taken and the head starts afresh. Marks spec.weights_id, so features cached from the stock
    weights are not reused. Returns a line for the log."""
    source, src_spec = load_model(run_dir)
    state = source.state_dict()
    same_classes = src_spec.classes == spec.classes
    if not same_classes:
        state = {k: v for k, v in state.items() if k.startswith("extractor.")}
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} there, {tuple(own[k].shape)} here" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    missing = [f"{k} missing there" for k in own if k not in state
               and (same_classes or k.startswith("extractor."))]
    missing += [f"{k} missing here" for k in state if k not in own]
    if src_spec.backbone != spec.backbone or wrong or missing:
        raise GraftError(
            f"{run_dir}: its model cannot start this run: {src_spec.backbone} "
            f"({src_spec.features} features, head {src_spec.head.get('hidden')}, pool "
            f"{src_spec.head.get('pool')}{', channel-pruned' if src_spec.pruned else ''}) against "
            f"{spec.backbone} ({spec.features} features, head {spec.head.get('hidden')}, pool "
            f"{spec.head.get('pool')}); " + "; ".join((wrong + missing or ["another backbone"])[:3])
            + _same_model_hint(src_spec, spec))
    model.load_state_dict(state, strict=same_classes)
    from .backbones.registry import file_digest
    spec.weights_id = f"{spec.weights_id}+init:{file_digest(Path(run_dir) / 'model.safetensors')}"
    return (f"weights from {run_dir}" + ("" if same_classes else
            " (the backbone only: its classes differ from this data's, the head starts afresh)"))


def _same_model_hint(src: ModelSpec, own: ModelSpec) -> str:
    """The command-line flags that would build the source run's model, for those that differ: the
    usual cause is a recipe naming one backbone and --init a run of another."""
    def widths(spec: ModelSpec) -> str:  # --hidden's syntax: comma-separated, '' for none
        return "'" + ",".join(map(str, spec.head.get("hidden") or [])) + "'"
    pairs = [("--backbone", src.backbone, own.backbone), ("--features", src.features, own.features),
             ("--pool", src.head.get("pool"), own.head.get("pool")), ("--hidden", widths(src), widths(own))]
    flags = [f"{flag} {there}" for flag, there, here in pairs if there != here]
    return f"\nto build that run's model here, add: {' '.join(flags)}" if flags else ""


def single_label_only(spec: ModelSpec, where, what: str) -> None:
    """Commands built on one class per image (softmax, top-1 accuracy, class-incremental heads)
    refuse a multi-label run in one line that says why, rather than fail somewhere inside."""
    if spec.multilabel:
        raise GraftError(f"{where}: a multi-label run; {what}")


def save_model(model: GraftedModel, spec: ModelSpec, run_dir: Path) -> None:
    save_tensors(run_dir / "model.safetensors", model.state_dict(), {"format": "graftnet-1"})
    atomic_write_json(run_dir / "model.json", asdict(spec))


def load_model(run_dir: str | Path) -> tuple[GraftedModel, ModelSpec]:
    """The run's model. model.json is plain JSON a person may edit and the weights a file that may be
    cut short, so both are checked, and the model is first built on the meta device (shapes, no
    memory: a width of 10**9 in model.json costs nothing there) and compared with the weights' shapes
    read from the file's header: a mismatch is one line naming the first tensor, not a traceback."""
    run_dir = Path(run_dir)
    spec_path, weights_path = run_dir / "model.json", run_dir / "model.safetensors"
    if not spec_path.is_file() or not weights_path.is_file():
        raise GraftError(f"{run_dir}: not a finished graftnet run (model.json / model.safetensors "
                         "missing); a run interrupted before its end can be continued with --resume")
    spec = read_spec(spec_path)
    found = _weight_shapes(weights_path)
    try:
        arch = backbones.get_spec(spec.backbone)
        with torch.device("meta"):
            planned = _assemble(arch.architecture(), replace(spec)).state_dict()
    except GraftError as e:
        raise GraftError(f"{spec_path}: {e}") from None
    _check_fit(planned, found, spec, spec_path, weights_path)
    model = _assemble(arch.architecture(), spec)
    try:
        from safetensors.torch import load_file
        model.load_state_dict(load_file(str(weights_path)))
    except Exception as e:  # noqa: BLE001 - the header was sound, the data is not: one line
        raise GraftError(f"{weights_path}: damaged ({_first_line(e)}){_retrain(weights_path)}") from None
    model.eval()
    return model, spec


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"


def _retrain(weights: Path) -> str:
    return f"; train the run again: `graft train --config {weights.parent / 'config.yaml'}`"


def _weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header, without reading the data."""
    from safetensors import safe_open
    try:  # safetensors checks that the header's offsets cover the file exactly: a cut file fails here
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: the file is the problem
        raise GraftError(f"{path}: damaged, not a readable safetensors file ({_first_line(e)})"
                         f"{_retrain(path)}") from None


def _check_fit(planned: dict, found: dict, spec: ModelSpec, spec_path: Path, weights_path: Path) -> None:
    said = (f"{len(spec.classes)} classes, {spec.features} features, head {spec.head.get('hidden')}, "
            f"pool {spec.head.get('pool')}" + (f", gate {spec.gate}" if spec.gate else ""))
    for name, tensor in planned.items():
        want = tuple(tensor.shape)
        if found.get(name) != want:
            there = f"{weights_path.name} holds {found[name]}" if name in found else \
                f"{weights_path.name} lacks it"
            raise GraftError(f"{spec_path}: does not match {weights_path.name} ({said}): tensor {name} "
                             f"is {want} in the model {spec_path.name} describes, {there}")
    extra = next((k for k in found if k not in planned), None)
    if extra:
        raise GraftError(f"{spec_path}: does not match {weights_path.name} ({said}): it holds tensor "
                         f"{extra} {found[extra]}, which {spec_path.name}'s model has not")


_FEATURES = {f.name: f for f in fields(BackboneConfig)}["features"].metadata["choices"]


def read_spec(path: Path) -> ModelSpec:
    """model.json as a ModelSpec, each value checked: one GraftError names the key and what is wrong."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise GraftError(f"{path}: not valid JSON ({_first_line(e)})") from None
    if not isinstance(raw, dict):
        raise GraftError(f"{path}: expected a JSON object describing the model, found a {type(raw).__name__}")
    raw.pop("num_classes", None)  # older files stored it beside the classes
    hints = typing.get_type_hints(ModelSpec)
    for key in raw:
        if key not in hints:
            raise GraftError(f"{path}: unknown key {_show(key)} (a model.json holds {', '.join(hints)})")
    for f in fields(ModelSpec):
        if f.name not in raw and f.default is MISSING and f.default_factory is MISSING:
            raise GraftError(f"{path}: the key {f.name!r} is missing")
    for key, value in raw.items():
        kind = typing.get_origin(hints[key]) or hints[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            words = {int: "an integer", str: "text", list: "a list", dict: "a JSON object",
                     bool: "true or false"}[kind]
            raise GraftError(f"{path}: {key}: expected {words}, found {_show(value)}")
    try:
        raw["head"] = asdict(_head(raw.get("head", {})))
    except GraftError as e:
        raise GraftError(f"{path}: {e}") from None
    problem = _spec_problem(raw)
    if problem:
        raise GraftError(f"{path}: {problem}")
    return ModelSpec(**raw)


def _head(values: dict) -> HeadConfig:
    """The head's settings, by the same declarations and checks as a config's `head:` section."""
    head = from_dict(HeadConfig, values, "head")
    check_choices(head, "head.")
    if not all(0 < w < 2**31 for w in head.hidden):
        raise GraftError(f"head.hidden: widths must be positive, found {_show(head.hidden)}")
    if not 0 <= head.dropout < 1:
        raise GraftError(f"head.dropout: must be in [0, 1), found {_show(head.dropout)}")
    return head


def _spec_problem(raw: dict) -> str | None:
    classes = raw["classes"]
    if not classes or not all(isinstance(c, str) for c in classes) or len(set(classes)) < len(classes):
        return f"classes: expected a list of distinct names, found {_show(classes)}"
    if not 16 <= raw["image_size"] <= MAX_IMAGE_SIZE:
        return f"image_size: {raw['image_size']} is out of range (16 to {MAX_IMAGE_SIZE} pixels)"
    for key in ("mean", "std"):
        v = raw[key]
        if len(v) != 3 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                                  and (key == "mean" or x > 0) for x in v):
            return f"{key}: expected 3 finite numbers{' above 0' if key == 'std' else ''}, found {_show(v)}"
    if raw["features"] not in _FEATURES:
        return f"features: {_show(raw['features'])} is not one of {', '.join(_FEATURES)}"
    t = raw.get("thresholds", [])
    if t and (len(t) != len(classes) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                and 0 <= x <= 1 for x in t)):
        return f"thresholds: expected {len(classes)} probabilities in [0, 1], one per class, found {_show(t)}"
    if raw["multi_taps"] < 1 or raw.get("cut", 0) < 0 or raw.get("feature_dim", 0) < 0:
        return "multi_taps must be at least 1, cut and feature_dim at least 0"
    return _gate_problem(raw.get("gate", {}), len(classes))


def _gate_problem(gate: dict, num_classes: int) -> str | None:
    if not gate:
        return None
    k, hidden = gate.get("old_classes"), gate.get("hidden")
    if set(gate) != {"old_classes", "hidden"} or not isinstance(k, int) or isinstance(k, bool) \
            or not isinstance(hidden, list) or not all(isinstance(w, int) and not isinstance(w, bool)
                                                       and 0 < w < 2**31 for w in hidden):
        return f"gate: expected {{\"old_classes\": N, \"hidden\": [widths]}}, found {_show(gate)}"
    if not 0 < k < num_classes:
        return f"gate: old_classes {k} must be between 1 and {num_classes - 1} (the model has {num_classes} classes)"
    return None


def _show(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: every module with a trainable parameter, with its buffers (BatchNorm
    statistics). A frozen backbone is left out, so an epoch's checkpoint holds only the head."""
    out = {}
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            prefix = f"{name}." if name else ""
            out.update({prefix + k: v for k, v in module.state_dict().items() if "." not in k})
    return out
