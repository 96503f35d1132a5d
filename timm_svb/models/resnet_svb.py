"""ImageNet ResNets on timm's own ``ResNet`` class, orthogonally initialised for SVB + BBN training

``resnet18_svb`` / ``resnet50_svb`` have exactly the layout (and state dict) of timm's ``resnet18`` /
``resnet50``; they differ in the initialisation (all singular values 1, BN gamma 1) and carry ``svb_config``.
Their class ``ResNetSVB`` adds only the checked loading of pretrained weights.

Papers:
* `Improving training of deep neural networks via Singular Value Bounding` - https://arxiv.org/abs/1611.06013
* `Deep Residual Learning for Image Recognition` - https://arxiv.org/abs/1512.03385
"""

from typing import Any

from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ._helpers import SafetensorsPretrainedMixin, build_svb_model, in1k_cfgs
from ._pretrained import pretrained_cfgs

__all__ = ["ResNetSVB"]


class ResNetSVB(SafetensorsPretrainedMixin, ResNet):
    """timm's ``ResNet``, loading pretrained weights through timm-svb's checked safetensors loader."""


def _create_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> ResNetSVB:
    """Build a timm ResNet variant (orthogonally initialised with ``svb_config``)."""
    return build_svb_model(ResNetSVB, variant, pretrained, **kwargs)


default_cfgs = generate_default_cfgs(
    pretrained_cfgs(
        ("resnet18_svb", "resnet50_svb"),
        in1k_cfgs(first_conv="conv1", classifier="fc"),
    )
)


@register_model
def resnet18_svb(pretrained: bool = False, **kwargs: Any) -> ResNetSVB:
    """ResNet-18 (timm ``resnet18`` layout), orthogonal init, for SVB + BBN training."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2))
    return _create_resnet("resnet18_svb", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_svb(pretrained: bool = False, **kwargs: Any) -> ResNetSVB:
    """ResNet-50 (timm ``resnet50`` layout), orthogonal init, for SVB + BBN training."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3))
    return _create_resnet("resnet50_svb", pretrained, **dict(model_args, **kwargs))
