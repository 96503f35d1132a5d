"""Wide ResNets WRN-d-k for CIFAR (SVB paper, section 6.3, Tables 2 and 3)

Pre-activation ResNets (``preact_resnet.PreActResNet``) of depth d = 6N+4 with N blocks per stage,
widths 16, 16k, 32k, 64k, 1x1 projection shortcuts where the width or resolution changes, and optional
dropout between the two convs of a block (``block_drop_rate``, default 0). WRN-28-10 has 36.5M
parameters and WRN-28-16 ("Wider ResNet") 94M.

Papers:
* `Improving training of deep neural networks via Singular Value Bounding` - https://arxiv.org/abs/1611.06013
* `Wide Residual Networks` - https://arxiv.org/abs/1605.07146
"""

from typing import Any

from timm.models import generate_default_cfgs, register_model

from ._helpers import cifar_cfgs
from ._pretrained import pretrained_cfgs
from .preact_resnet import PreActResNet, _create_preact_resnet

__all__: list[str] = []


def _wrn_args(depth: int, width: int) -> dict[str, Any]:
    """PreActResNet arguments of WRN-depth-width."""
    assert (depth - 4) % 6 == 0, "WRN depth must be 6N+4"
    n = (depth - 4) // 6
    return dict(layers=(n, n, n), width_factor=width)


default_cfgs = generate_default_cfgs(
    pretrained_cfgs(
        [f"wrn{d}{s}" for d in ("16_8", "28_10", "28_16", "40_4") for s in ("", "_svb")],
        cifar_cfgs(first_conv="stem", classifier="fc"),
    )
)


@register_model
def wrn16_8(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """WRN-16-8, SGD baseline."""
    return _create_preact_resnet("wrn16_8", pretrained, **dict(_wrn_args(16, 8), **kwargs))


@register_model
def wrn16_8_svb(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """WRN-16-8, orthogonal init, for SVB + BBN training."""
    return _create_preact_resnet("wrn16_8_svb", pretrained, **dict(_wrn_args(16, 8), **kwargs))


@register_model
def wrn28_10(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """WRN-28-10 (36.5M parameters), SGD baseline."""
    return _create_preact_resnet("wrn28_10", pretrained, **dict(_wrn_args(28, 10), **kwargs))


@register_model
def wrn28_10_svb(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """WRN-28-10 (36.5M parameters), orthogonal init, for SVB + BBN training."""
    return _create_preact_resnet("wrn28_10_svb", pretrained, **dict(_wrn_args(28, 10), **kwargs))


@register_model
def wrn28_16(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """WRN-28-16 (94M parameters), SGD baseline."""
    return _create_preact_resnet("wrn28_16", pretrained, **dict(_wrn_args(28, 16), **kwargs))


@register_model
def wrn28_16_svb(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """WRN-28-16 (94M parameters), orthogonal init, for SVB + BBN training."""
    return _create_preact_resnet("wrn28_16_svb", pretrained, **dict(_wrn_args(28, 16), **kwargs))


@register_model
def wrn40_4(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """WRN-40-4, SGD baseline."""
    return _create_preact_resnet("wrn40_4", pretrained, **dict(_wrn_args(40, 4), **kwargs))


@register_model
def wrn40_4_svb(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """WRN-40-4, orthogonal init, for SVB + BBN training."""
    return _create_preact_resnet("wrn40_4_svb", pretrained, **dict(_wrn_args(40, 4), **kwargs))
