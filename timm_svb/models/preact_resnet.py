"""Pre-activation ResNets for CIFAR (SVB paper, section 6.2, Table 1)

A 3x3 conv with 16 filters, three stages of X pre-activation basic blocks (BN-ReLU-conv-BN-ReLU-conv,
identity shortcut) with 16 / 32 / 64 filters at 32 / 16 / 8 resolution, a projection shortcut
(1x1 conv, stride 2, on the pre-activated input) where a stage down-samples, final BN-ReLU, global average
pooling and a fully connected layer: 6X+2 weight layers not counting the projections (X=11: 68).
The same class, with a width factor and dropout between the convs, is the Wide ResNet (``wide_resnet.py``).

Papers:
* `Improving training of deep neural networks via Singular Value Bounding` - https://arxiv.org/abs/1611.06013
* `Identity Mappings in Deep Residual Networks` - https://arxiv.org/abs/1603.05027
"""

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, create_classifier, get_device_dtype
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from ._helpers import SafetensorsPretrainedMixin, build_svb_model, cifar_cfgs, he_init_
from ._pretrained import pretrained_cfgs

__all__ = ["PreActResNet", "PreActBasicBlock"]


class PreActBasicBlock(nn.Module):
    """Pre-activation basic block; the projection shortcut takes the pre-activated input."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        drop_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Args:
            in_chs: Input channels.
            out_chs: Output channels.
            stride: Stride of the first conv (and of the projection shortcut).
            drop_rate: Dropout between the two convs.
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = BatchNormAct2d(in_chs, **dd)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.norm2 = BatchNormAct2d(out_chs, **dd)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False, **dd)
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, **dd)
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = self.norm1(x)
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(x_preact)
        x = self.conv1(x_preact)
        x = self.conv2(self.drop(self.norm2(x)))
        return x + shortcut


class PreActResNet(SafetensorsPretrainedMixin, nn.Module):
    """Pre-activation (wide) ResNet for 32x32 inputs."""

    def __init__(
        self,
        layers: tuple[int, ...] = (3, 3, 3),
        channels: tuple[int, ...] = (16, 32, 64),
        width_factor: int = 1,
        stem_chs: int = 16,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        block_drop_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Args:
            layers: Number of blocks per stage, a stride 2 block starts every stage but the first.
            channels: Filters per stage, before ``width_factor``.
            width_factor: Width multiplier of the stages (k of WRN-d-k).
            stem_chs: Filters of the first conv.
            num_classes: Number of classifier outputs, 0 for none.
            in_chans: Number of input image channels.
            global_pool: Global pooling type.
            drop_rate: Dropout before the classifier.
            block_drop_rate: Dropout between the two convs of every block (WRN).
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.stem = nn.Conv2d(in_chans, stem_chs, 3, padding=1, bias=False, **dd)
        self.feature_info = [dict(num_chs=stem_chs, reduction=1, module="stem")]
        prev_chs = stem_chs
        reduction = 1
        stages = []
        for stage_idx, (depth, chs) in enumerate(zip(layers, channels, strict=True)):
            out_chs = chs * width_factor
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            stages.append(
                nn.Sequential(
                    *[
                        PreActBasicBlock(
                            prev_chs if i == 0 else out_chs,
                            out_chs,
                            stride=stride if i == 0 else 1,
                            drop_rate=block_drop_rate,
                            **dd,
                        )
                        for i in range(depth)
                    ]
                )
            )
            prev_chs = out_chs
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"stages.{stage_idx}"))
        self.stages = nn.Sequential(*stages)

        self.num_features = prev_chs
        self.norm = BatchNormAct2d(self.num_features, **dd)
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
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Enable or disable activation checkpointing per block."""
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
            norm: Apply the final norm to the last stage's intermediate.
            stop_early: Stop iterating over stages when the last desired intermediate is hit.
            output_fmt: Shape of intermediate feature outputs, only 'NCHW'.
            intermediates_only: Only return intermediate features.
        """
        assert output_fmt == "NCHW", "Output shape must be NCHW."
        intermediates = []
        last_idx = len(self.stages)
        take_indices, max_index = feature_take_indices(last_idx + 1, indices)
        x = self.stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        stages = self.stages[:max_index] if stop_early else self.stages
        feat_idx = 0
        for feat_idx, stage in enumerate(stages, start=1):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.norm(x) if norm and feat_idx == last_idx else x)
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.norm(x)
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
        if prune_norm or prune_end:
            self.norm = nn.Identity()  # sized for (and only applied to) the last stage
        self.stages = self.stages[:max_index]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, residual stages and final BN-ReLU, the unpooled feature map."""
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x, flatten=True)
        else:
            x = self.stages(x)
        x = self.norm(x)
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


def _create_preact_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """Build a PreActResNet variant (orthogonally initialised with ``svb_config`` for ``_svb`` names)."""
    return build_svb_model(
        PreActResNet,
        variant,
        pretrained,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)),
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    pretrained_cfgs(
        [f"preact_resnet{d}{s}" for d in (20, 56, 68, 110) for s in ("", "_svb")],
        cifar_cfgs(first_conv="stem", classifier="fc"),
    )
)


@register_model
def preact_resnet20(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """Pre-activation ResNet-20 (X=3), SGD baseline."""
    model_args = dict(layers=(3, 3, 3))
    return _create_preact_resnet("preact_resnet20", pretrained, **dict(model_args, **kwargs))


@register_model
def preact_resnet20_svb(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """Pre-activation ResNet-20 (X=3), orthogonal init, for SVB + BBN training."""
    model_args = dict(layers=(3, 3, 3))
    return _create_preact_resnet("preact_resnet20_svb", pretrained, **dict(model_args, **kwargs))


@register_model
def preact_resnet56(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """Pre-activation ResNet-56 (X=9), SGD baseline."""
    model_args = dict(layers=(9, 9, 9))
    return _create_preact_resnet("preact_resnet56", pretrained, **dict(model_args, **kwargs))


@register_model
def preact_resnet56_svb(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """Pre-activation ResNet-56 (X=9), orthogonal init, for SVB + BBN training."""
    model_args = dict(layers=(9, 9, 9))
    return _create_preact_resnet("preact_resnet56_svb", pretrained, **dict(model_args, **kwargs))


@register_model
def preact_resnet68(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """Pre-activation ResNet-68 (X=11, paper Table 1), SGD baseline."""
    model_args = dict(layers=(11, 11, 11))
    return _create_preact_resnet("preact_resnet68", pretrained, **dict(model_args, **kwargs))


@register_model
def preact_resnet68_svb(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """Pre-activation ResNet-68 (X=11, paper Table 1), orthogonal init, for SVB + BBN training."""
    model_args = dict(layers=(11, 11, 11))
    return _create_preact_resnet("preact_resnet68_svb", pretrained, **dict(model_args, **kwargs))


@register_model
def preact_resnet110(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """Pre-activation ResNet-110 (X=18), SGD baseline."""
    model_args = dict(layers=(18, 18, 18))
    return _create_preact_resnet("preact_resnet110", pretrained, **dict(model_args, **kwargs))


@register_model
def preact_resnet110_svb(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """Pre-activation ResNet-110 (X=18), orthogonal init, for SVB + BBN training."""
    model_args = dict(layers=(18, 18, 18))
    return _create_preact_resnet("preact_resnet110_svb", pretrained, **dict(model_args, **kwargs))
