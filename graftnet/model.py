"""Build a grafted model from a config, and save/load it as safetensors + a JSON spec.

The JSON spec holds plain values only (nanoGPT keeps its config in the checkpoint the same way), so
`load_model(run_dir)` rebuilds the exact architecture without pickles and without network.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import backbones
from .config import HeadConfig, RunConfig
from .errors import GraftError
from .heads import FeatureExtractor, GraftedModel, Pool, cut_backbone, make_mlp
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
    spec.feature_dim = pool.out_features(extractor.channels(spec.image_size))
    model = GraftedModel(extractor, pool, make_mlp(spec.feature_dim, spec.num_classes, head_cfg))
    if spec.pruned:  # channel-pruned: shrink the stock layers to the saved sizes before loading
        apply_shapes(model, spec.pruned)
        spec.feature_dim = pool.out_features(extractor.channels(spec.image_size))
    return model


def build_model(cfg: RunConfig, classes: list[str]) -> tuple[GraftedModel, ModelSpec]:
    bspec = backbones.get_spec(cfg.backbone.name)
    timm_model, weights_id = backbones.create(bspec, cfg.backbone.pretrained, cfg.backbone.weights)
    spec = ModelSpec(
        backbone=bspec.name, timm_name=bspec.timm_name, weights_id=weights_id, classes=list(classes),
        image_size=cfg.backbone.image_size or bspec.input_size, mean=list(bspec.mean),
        std=list(bspec.std), features=cfg.backbone.features, multi_taps=bspec.multi_taps,
        head=asdict(cfg.head), cut=cfg.backbone.cut)
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


def save_model(model: GraftedModel, spec: ModelSpec, run_dir: Path) -> None:
    save_tensors(run_dir / "model.safetensors", model.state_dict(), {"format": "graftnet-1"})
    atomic_write_json(run_dir / "model.json", asdict(spec))


def load_model(run_dir: str | Path) -> tuple[GraftedModel, ModelSpec]:
    run_dir = Path(run_dir)
    spec_path, weights_path = run_dir / "model.json", run_dir / "model.safetensors"
    if not spec_path.is_file() or not weights_path.is_file():
        raise GraftError(f"{run_dir}: not a finished graftnet run (model.json / model.safetensors "
                         "missing); a run interrupted before its end can be continued with --resume")
    try:
        raw = json.loads(spec_path.read_text())
        spec = ModelSpec(**{k: v for k, v in raw.items() if k != "num_classes"})
    except (json.JSONDecodeError, TypeError) as e:
        raise GraftError(f"{spec_path}: not a valid model spec ({e})") from None
    model = _assemble(backbones.get_spec(spec.backbone).architecture(), spec)
    from safetensors.torch import load_file
    model.load_state_dict(load_file(str(weights_path)))
    model.eval()
    return model, spec


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: every module with a trainable parameter, with its buffers (BatchNorm
    statistics). A frozen backbone is left out, so an epoch's checkpoint holds only the head."""
    out = {}
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            prefix = f"{name}." if name else ""
            out.update({prefix + k: v for k, v in module.state_dict().items() if "." not in k})
    return out
