"""Helpers shared by the model families: data set cfgs, ``svb_config`` handling and the model builder."""

from collections.abc import Callable
from typing import Any, TypeVar

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, resolve_pretrained_cfg
from torch import nn

from ..functional import orthogonal_init_
from ._pretrained import PretrainedWeightsNotPublishedError, with_verified_weights

ModelT = TypeVar("ModelT", bound=nn.Module)

SVB_PAPER_ID = "arXiv:1611.06013"
SVB_PAPER_NAME = "Improving training of deep neural networks via Singular Value Bounding"
SVB_DEFAULTS: dict[str, float] = {"epsilon": 0.5, "bbn_epsilon": 1.0}

# per-channel statistics of the training images
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

# create_model kwarg -> svb_config key
_SVB_KWARGS = {"svb_epsilon": "epsilon", "bbn_epsilon": "bbn_epsilon"}


def _cfg(**kwargs: Any) -> dict[str, Any]:
    """Pretrained cfg defaults (ImageNet, 224x224), overridden by ``kwargs``."""
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "license": "apache-2.0",
        "paper_ids": SVB_PAPER_ID,
        "paper_name": SVB_PAPER_NAME,
        **kwargs,
    }


def cifar_cfgs(**kwargs: Any) -> dict[str, dict[str, Any]]:
    """Cfgs per CIFAR pretrained tag: 32x32 input, no resize or crop at test time, data set mean/std."""
    cifar = dict(input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0, **kwargs)
    return {
        "cifar10": _cfg(**cifar, num_classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD),
        "cifar100": _cfg(**cifar, num_classes=100, mean=CIFAR100_MEAN, std=CIFAR100_STD),
    }


def in1k_cfgs(**kwargs: Any) -> dict[str, dict[str, Any]]:
    """Cfgs per ImageNet-1k pretrained tag."""
    return {"in1k": _cfg(**kwargs)}


def he_init_(module: nn.Module) -> None:
    """Baseline init, as timm's ResNet: He (fan-out) normal conv weights, other layers at PyTorch defaults."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def _svb_config(variant: str, kwargs: dict[str, Any]) -> dict[str, float] | None:
    """Pop ``svb_epsilon`` / ``bbn_epsilon`` from ``kwargs``; the config of an ``_svb`` variant, else None."""
    overrides = {key: float(kwargs.pop(arg)) for arg, key in _SVB_KWARGS.items() if arg in kwargs}
    if not variant.endswith("_svb"):
        if overrides:
            raise TypeError(
                f"{variant} is not an SVB variant, svb_epsilon / bbn_epsilon only apply to '{variant}_svb'"
            )
        return None
    config = {**SVB_DEFAULTS, **overrides}
    for key, value in config.items():
        if value <= 0:
            raise ValueError(f"{key} must be > 0, got {value}")
    return config


def _check_pretrained(variant: str, kwargs: dict[str, Any]) -> None:
    """Raise a clear error for ``pretrained=True`` when no weight source exists (unpublished weights)."""
    try:
        cfg = resolve_pretrained_cfg(
            variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay")
        ).to_dict()
    except RuntimeError as e:  # unknown pretrained tag
        tag = kwargs.get("pretrained_cfg")
        name = f"{variant}.{tag}" if isinstance(tag, str) else variant
        raise PretrainedWeightsNotPublishedError(name) from e
    if not any(cfg.get(k) for k in ("state_dict", "file", "url", "hf_hub_id")):
        raise PretrainedWeightsNotPublishedError(f"{variant}.{cfg['tag']}" if cfg.get("tag") else variant)


def _orthogonal(model_cls: Callable[..., ModelT]) -> Callable[..., ModelT]:
    """Wrap a model class so the instance is orthogonally initialised (before any weight loading)."""

    def _build(**kwargs: Any) -> ModelT:
        return orthogonal_init_(model_cls(**kwargs))

    return _build


def build_svb_model(
    model_cls: Callable[..., ModelT],
    variant: str,
    pretrained: bool = False,
    **kwargs: Any,
) -> ModelT:
    """``build_model_with_cfg`` for baselines and ``_svb`` variants.

    An ``_svb`` variant is orthogonally initialised and gets ``model.svb_config`` (``epsilon`` /
    ``bbn_epsilon``, overridable with the ``svb_epsilon`` / ``bbn_epsilon`` kwargs); baselines keep the
    class's own init and get ``svb_config = None``. ``pretrained=True`` needs published weights or a
    weight source given by the caller (``pretrained_cfg_overlay=dict(file=...)``, ``local-dir:``).
    """
    svb_config = _svb_config(variant, kwargs)
    if pretrained:
        _check_pretrained(variant, kwargs)
        kwargs = with_verified_weights(variant, kwargs)  # record weights: sha256-checked safetensors file
    model = build_model_with_cfg(
        model_cls if svb_config is None else _orthogonal(model_cls), variant, pretrained, **kwargs
    )
    model.svb_config = svb_config
    return model
