"""Helpers shared by the model families: data set cfgs, ``svb_config`` handling and the model builder."""

import inspect
import math
from collections.abc import Callable
from typing import Any, TypeVar

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, load_pretrained, resolve_pretrained_cfg
from torch import nn

from ..functional import orthogonal_init_
from ._pretrained import PretrainedWeightsNotPublishedError, load_weights, route_weights

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
    """Cfgs per CIFAR pretrained tag: 32x32 input, no resize or crop at test time, data set mean/std.
    ``c10jpeg`` is the JPEG (quality 75) copy of CIFAR-10 the project trains on where the Hub cannot be
    reached: CIFAR-10's images, classes and statistics, other pixels (hub/publish.py's DATA_TAGS)."""
    cifar = dict(input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0, **kwargs)
    return {
        "cifar10": _cfg(**cifar, num_classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD),
        "c10jpeg": _cfg(**cifar, num_classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD),
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
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{key} must be a finite number > 0, got {value}")
    return config


def _check_config_args(model_cls: Callable[..., nn.Module], variant: str, kwargs: dict[str, Any]) -> None:
    """Refuse ``model_args`` of a ``config.json`` (``hf-hub:`` / ``local-dir:``) that are not arguments of the
    architecture, such as ``pretrained_strict`` (loading is not the file's to control), and SVB bands
    that are not finite numbers > 0 (what training accepts)."""
    config_args = kwargs.get("pretrained_model_args") or {}
    params = inspect.signature(model_cls).parameters
    allowed = {n for n, p in params.items() if p.kind is not p.VAR_KEYWORD} | set(_SVB_KWARGS)
    foreign = sorted(set(config_args) - allowed)
    if foreign:
        raise ValueError(
            f"config.json of {variant} sets {foreign} in model_args: not arguments of the architecture "
            "(a config file may not control how weights are loaded); remove them from the file"
        )
    for arg in set(_SVB_KWARGS) & set(config_args):
        value = config_args[arg]
        if isinstance(value, bool) or not (isinstance(value, int | float) and 0 < value < math.inf):
            raise ValueError(
                f"config.json of {variant} sets {arg}={value!r}: an SVB band must be a finite number > 0; "
                f"fix the file, or pass {arg}= to create_model to override it"
            )


def _check_config_classes(variant: str, cfg: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """Refuse a ``config.json`` whose top-level ``num_classes`` (the weights' classes, for timm) disagrees
    with its ``model_args``: one of the two is wrong, and timm would drop the trained classifier."""
    config_classes = (kwargs.get("pretrained_model_args") or {}).get("num_classes")
    if config_classes is not None and config_classes != cfg.get("num_classes"):
        raise ValueError(
            f"config.json of {variant} says num_classes={cfg.get('num_classes')!r} but its model_args say "
            f"num_classes={config_classes!r}: fix the file so that both give the classes of its weights"
        )


class SafetensorsPretrainedMixin:
    """``load_pretrained(checkpoint_path)``: timm's ``custom_load`` hook, so that every pretrained load of
    the model (``create_model``, ``hf-hub:``, ``local-dir:``, ``timm.models.load_pretrained(model)``) reads
    its file with :func:`load_weights` (safetensors only, recorded files checked against their sha256) and
    then adapts it as timm does (new classifier for other ``num_classes``, input conv for ``in_chans``)."""

    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load the weights file ``checkpoint_path`` (called by timm for ``custom_load`` cfgs), strictly: only
        the classifier may be left out, and only when the file's has another number of outputs than the
        model's (timm turns strictness off whenever it adapts the head; this checks the rest first)."""
        state = load_weights(checkpoint_path)
        classifiers = self.pretrained_cfg.get("classifier") or ()
        classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
        head = [f"{c}.{p}" for c in classifiers for p in ("weight", "bias")]
        # the file's own classifier says how many classes it has, not the cfg (which a config.json may get
        # wrong): timm adapts the head exactly when this differs from the model's
        rows = next((state[k].shape[0] for k in head if k in state), 0)
        adapted = set(head) if rows != self.num_classes else set()
        own = set(self.state_dict())
        missing, unexpected = sorted(own - set(state) - adapted), sorted(set(state) - own - adapted)
        if missing or unexpected:
            raise RuntimeError(
                f"pretrained weights {checkpoint_path} do not fit {type(self).__name__}: missing "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{' ...' if len(unexpected) > 5 else ''} (only the classifier is adapted, for another "
                "num_classes). Nothing was loaded: use the weights saved for this architecture and kwargs"
            )
        cfg = {**self.pretrained_cfg, "state_dict": state, "source": None, "num_classes": rows}
        load_pretrained(self, cfg, num_classes=self.num_classes, in_chans=self.in_chans)


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
    class's own init and get ``svb_config = None``. ``model_cls`` loads pretrained weights with
    :class:`SafetensorsPretrainedMixin`, and the cfg is routed through it (:func:`route_weights`).
    ``pretrained=True`` needs published weights or a weight source given by the caller
    (``pretrained_cfg_overlay=dict(file=...)``, ``local-dir:``); a mistyped tag raises timm's
    ``Invalid pretrained tag``.
    """
    _check_config_args(model_cls, variant, kwargs)
    svb_config = _svb_config(variant, kwargs)
    cfg = resolve_pretrained_cfg(
        variant, kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None)
    )
    cfg = route_weights(cfg.to_dict())
    _check_config_classes(variant, cfg, kwargs)
    if pretrained and not any(cfg.get(k) for k in ("state_dict", "file", "url", "hf_hub_id")):
        raise PretrainedWeightsNotPublishedError(f"{variant}.{cfg['tag']}" if cfg.get("tag") else variant)
    model = build_model_with_cfg(
        model_cls if svb_config is None else _orthogonal(model_cls),
        variant,
        pretrained,
        pretrained_cfg=cfg,
        **kwargs,
    )
    model.svb_config = svb_config
    return model
