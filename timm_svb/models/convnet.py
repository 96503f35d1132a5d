"""Plain ConvNets for CIFAR with 6X+2 weight layers (SVB paper, section 6.1)

A 3x3 conv with 16 filters, then three stages of 2X 3x3 convs with 16 / 32 / 64 filters at 32 / 16 / 8
resolution (down-sampling by the first, stride 2, conv of a stage), each conv followed by BN + ReLU, then
global average pooling and a fully connected layer: 1 + 6X + 1 weight layers (X=3: 20, X=6: 38).

Paper: `Improving training of deep neural networks via Singular Value Bounding` - https://arxiv.org/abs/1611.06013
"""

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct, create_classifier, get_device_dtype
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from ._helpers import SafetensorsPretrainedMixin, build_svb_model, cifar_cfgs, he_init_
from ._pretrained import pretrained_cfgs

__all__ = ["ConvNet"]


class ConvNet(SafetensorsPretrainedMixin, nn.Module):
    """Plain (VGG-like, residual-free) ConvNet for 32x32 inputs."""

    def __init__(
        self,
        depth_x: int = 3,
        channels: tuple[int, ...] = (16, 32, 64),
        stem_chs: int = 16,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Args:
            depth_x: X, each stage has 2X conv layers (6X+2 weight layers in all).
            channels: Filters per stage, a stride 2 conv starts every stage but the first.
            stem_chs: Filters of the first conv.
            num_classes: Number of classifier outputs, 0 for none.
            in_chans: Number of input image channels.
            global_pool: Global pooling type.
            drop_rate: Dropout before the classifier.
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.stem = ConvNormAct(in_chans, stem_chs, 3, **dd)
        self.feature_info = [dict(num_chs=stem_chs, reduction=1, module="stem")]
        prev_chs = stem_chs
        reduction = 1
        stages = []
        for stage_idx, chs in enumerate(channels):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            stages.append(
                nn.Sequential(
                    *[
                        ConvNormAct(prev_chs if i == 0 else chs, chs, 3, stride=stride if i == 0 else 1, **dd)
                        for i in range(2 * depth_x)
                    ]
                )
            )
            prev_chs = chs
            self.feature_info.append(dict(num_chs=chs, reduction=reduction, module=f"stages.{stage_idx}"))
        self.stages = nn.Sequential(*stages)

        self.num_features = prev_chs
        self.global_pool, self.fc = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, **dd
        )
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

        self.init_weights()

    @torch.jit.ignore
    def init_weights(self) -> None:
        """Baseline init: He (fan-out) normal conv weights."""
        he_init_(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Regexes grouping parameters (stem, blocks) for layer-wise optimiser settings."""
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Enable or disable activation checkpointing per conv layer."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier layer."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (and optionally the pooling) for ``num_classes`` outputs."""
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, **dd
        )
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward features and return intermediates (stem output, then each stage output).

        Args:
            x: Input image tensor.
            indices: Take last n features if int, all if None, select matching indices if sequence.
            norm: Unused, no final norm.
            stop_early: Stop iterating over stages when the last desired intermediate is hit.
            output_fmt: Shape of intermediate feature outputs, only 'NCHW'.
            intermediates_only: Only return intermediate features.
        """
        assert output_fmt == "NCHW", "Output shape must be NCHW."
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        x = self.stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        stages = self.stages[:max_index] if stop_early else self.stages
        for feat_idx, stage in enumerate(stages, start=1):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Remove the layers after the last of ``indices`` (and the head if ``prune_head``)."""
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        prune_end = max_index < len(self.stages)
        self.stages = self.stages[:max_index]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and conv stages, the unpooled feature map."""
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x, flatten=True)
        else:
            x = self.stages(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global pooling, dropout and classifier (pooled features if ``pre_logits``)."""
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def _create_convnet(variant: str, pretrained: bool = False, **kwargs: Any) -> ConvNet:
    """Build a ConvNet variant (orthogonally initialised with ``svb_config`` for ``_svb`` names)."""
    return build_svb_model(
        ConvNet,
        variant,
        pretrained,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)),
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    pretrained_cfgs(
        ("convnet20", "convnet20_svb", "convnet38", "convnet38_svb"),
        cifar_cfgs(first_conv="stem.conv", classifier="fc"),
    )
)


@register_model
def convnet20(pretrained: bool = False, **kwargs: Any) -> ConvNet:
    """ConvNet with 20 weight layers (X=3), SGD baseline."""
    model_args = dict(depth_x=3)
    return _create_convnet("convnet20", pretrained, **dict(model_args, **kwargs))


@register_model
def convnet20_svb(pretrained: bool = False, **kwargs: Any) -> ConvNet:
    """ConvNet with 20 weight layers (X=3), orthogonal init, for SVB + BBN training."""
    model_args = dict(depth_x=3)
    return _create_convnet("convnet20_svb", pretrained, **dict(model_args, **kwargs))


@register_model
def convnet38(pretrained: bool = False, **kwargs: Any) -> ConvNet:
    """ConvNet with 38 weight layers (X=6), SGD baseline."""
    model_args = dict(depth_x=6)
    return _create_convnet("convnet38", pretrained, **dict(model_args, **kwargs))


@register_model
def convnet38_svb(pretrained: bool = False, **kwargs: Any) -> ConvNet:
    """ConvNet with 38 weight layers (X=6), orthogonal init, for SVB + BBN training."""
    model_args = dict(depth_x=6)
    return _create_convnet("convnet38_svb", pretrained, **dict(model_args, **kwargs))
