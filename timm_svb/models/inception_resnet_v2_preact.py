"""Pre-activation Inception-ResNet-v2 for ImageNet, 299x299 input (SVB paper, section 6.4, Table 4)

The layout of timm's ``inception_resnet_v2`` (stem, Mixed_5b, 10 x Block35, Mixed_6a, 20 x Block17,
Mixed_7a, 9 + 1 x Block8, conv2d_7b) with pre-activation ordering as in pre-activation ResNets: every conv
but the first is preceded by BN-ReLU instead of followed by it, the branches of a block share the
pre-activation of the block input, residual sums are not activated (``x + scale * f(x)``), and a final
BN-ReLU precedes the pooling. Convs have no bias (every conv output is normalised downstream); max pools
act on the trunk itself.

Papers:
* `Improving training of deep neural networks via Singular Value Bounding` - https://arxiv.org/abs/1611.06013
* `Inception-v4, Inception-ResNet and the Impact of Residual Connections on Learning`
  - https://arxiv.org/abs/1602.07261
* `Identity Mappings in Deep Residual Networks` - https://arxiv.org/abs/1603.05027
"""

from collections.abc import Callable
from typing import Any

import torch
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import BatchNormAct2d, create_classifier, get_device_dtype
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import flatten_modules
from torch import nn

from ._helpers import SafetensorsPretrainedMixin, build_svb_model, he_init_, in1k_cfgs
from ._pretrained import pretrained_cfgs

__all__ = ["InceptionResnetV2PreAct"]

_KernelSize = int | tuple[int, int]


def conv2d(
    in_chs: int,
    out_chs: int,
    kernel_size: _KernelSize,
    stride: int = 1,
    padding: _KernelSize = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Conv2d:
    """Conv without bias."""
    return nn.Conv2d(
        in_chs, out_chs, kernel_size, stride=stride, padding=padding, bias=False, device=device, dtype=dtype
    )


class PreActConv(nn.Module):
    """BN-ReLU, then conv."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: _KernelSize,
        stride: int = 1,
        padding: _KernelSize = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm = BatchNormAct2d(in_chs, **dd)
        self.conv = conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=padding, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x))


class Mixed5b(nn.Module):
    """35x35 stem output block, 192 -> 320 channels."""

    def __init__(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm = BatchNormAct2d(192, **dd)
        self.branch0 = conv2d(192, 96, 1, **dd)
        self.branch1 = nn.Sequential(
            conv2d(192, 48, 1, **dd),
            PreActConv(48, 64, 5, padding=2, **dd),
        )
        self.branch2 = nn.Sequential(
            conv2d(192, 64, 1, **dd),
            PreActConv(64, 96, 3, padding=1, **dd),
            PreActConv(96, 96, 3, padding=1, **dd),
        )
        self.branch3 = nn.Sequential(
            nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
            conv2d(192, 64, 1, **dd),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)), 1)


class Block35(nn.Module):
    """35x35 residual block (Inception-ResNet-A), 320 channels."""

    def __init__(
        self,
        scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.scale = scale
        self.norm = BatchNormAct2d(320, **dd)
        self.branch0 = conv2d(320, 32, 1, **dd)
        self.branch1 = nn.Sequential(
            conv2d(320, 32, 1, **dd),
            PreActConv(32, 32, 3, padding=1, **dd),
        )
        self.branch2 = nn.Sequential(
            conv2d(320, 32, 1, **dd),
            PreActConv(32, 48, 3, padding=1, **dd),
            PreActConv(48, 64, 3, padding=1, **dd),
        )
        self.conv2d = PreActConv(128, 320, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = self.norm(x)
        out = torch.cat((self.branch0(x_preact), self.branch1(x_preact), self.branch2(x_preact)), 1)
        return x + self.conv2d(out) * self.scale


class Mixed6a(nn.Module):
    """35x35 -> 17x17 reduction block (Reduction-A), 320 -> 1088 channels."""

    def __init__(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm = BatchNormAct2d(320, **dd)
        self.branch0 = conv2d(320, 384, 3, stride=2, **dd)
        self.branch1 = nn.Sequential(
            conv2d(320, 256, 1, **dd),
            PreActConv(256, 256, 3, padding=1, **dd),
            PreActConv(256, 384, 3, stride=2, **dd),
        )
        self.branch2 = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = self.norm(x)
        return torch.cat((self.branch0(x_preact), self.branch1(x_preact), self.branch2(x)), 1)


class Block17(nn.Module):
    """17x17 residual block (Inception-ResNet-B), 1088 channels."""

    def __init__(
        self,
        scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.scale = scale
        self.norm = BatchNormAct2d(1088, **dd)
        self.branch0 = conv2d(1088, 192, 1, **dd)
        self.branch1 = nn.Sequential(
            conv2d(1088, 128, 1, **dd),
            PreActConv(128, 160, (1, 7), padding=(0, 3), **dd),
            PreActConv(160, 192, (7, 1), padding=(3, 0), **dd),
        )
        self.conv2d = PreActConv(384, 1088, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = self.norm(x)
        out = torch.cat((self.branch0(x_preact), self.branch1(x_preact)), 1)
        return x + self.conv2d(out) * self.scale


class Mixed7a(nn.Module):
    """17x17 -> 8x8 reduction block (Reduction-B), 1088 -> 2080 channels."""

    def __init__(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm = BatchNormAct2d(1088, **dd)
        self.branch0 = nn.Sequential(
            conv2d(1088, 256, 1, **dd),
            PreActConv(256, 384, 3, stride=2, **dd),
        )
        self.branch1 = nn.Sequential(
            conv2d(1088, 256, 1, **dd),
            PreActConv(256, 288, 3, stride=2, **dd),
        )
        self.branch2 = nn.Sequential(
            conv2d(1088, 256, 1, **dd),
            PreActConv(256, 288, 3, padding=1, **dd),
            PreActConv(288, 320, 3, stride=2, **dd),
        )
        self.branch3 = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = self.norm(x)
        return torch.cat(
            (self.branch0(x_preact), self.branch1(x_preact), self.branch2(x_preact), self.branch3(x)), 1
        )


class Block8(nn.Module):
    """8x8 residual block (Inception-ResNet-C), 2080 channels."""

    def __init__(
        self,
        scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.scale = scale
        self.norm = BatchNormAct2d(2080, **dd)
        self.branch0 = conv2d(2080, 192, 1, **dd)
        self.branch1 = nn.Sequential(
            conv2d(2080, 192, 1, **dd),
            PreActConv(192, 224, (1, 3), padding=(0, 1), **dd),
            PreActConv(224, 256, (3, 1), padding=(1, 0), **dd),
        )
        self.conv2d = PreActConv(448, 2080, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = self.norm(x)
        out = torch.cat((self.branch0(x_preact), self.branch1(x_preact)), 1)
        return x + self.conv2d(out) * self.scale


class InceptionResnetV2PreAct(SafetensorsPretrainedMixin, nn.Module):
    """Pre-activation Inception-ResNet-v2."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Args:
            num_classes: Number of classifier outputs, 0 for none.
            in_chans: Number of input image channels.
            drop_rate: Dropout before the classifier.
            global_pool: Global pooling type.
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = 1536
        self.grad_checkpointing = False

        self.conv2d_1a = conv2d(in_chans, 32, 3, stride=2, **dd)
        self.conv2d_2a = PreActConv(32, 32, 3, **dd)
        self.conv2d_2b = PreActConv(32, 64, 3, padding=1, **dd)
        self.feature_info = [dict(num_chs=64, reduction=2, module="conv2d_2b")]

        self.maxpool_3a = nn.MaxPool2d(3, stride=2)
        self.conv2d_3b = PreActConv(64, 80, 1, **dd)
        self.conv2d_4a = PreActConv(80, 192, 3, **dd)
        self.feature_info += [dict(num_chs=192, reduction=4, module="conv2d_4a")]

        self.maxpool_5a = nn.MaxPool2d(3, stride=2)
        self.mixed_5b = Mixed5b(**dd)
        self.repeat = nn.Sequential(*[Block35(scale=0.17, **dd) for _ in range(10)])
        self.feature_info += [dict(num_chs=320, reduction=8, module="repeat")]

        self.mixed_6a = Mixed6a(**dd)
        self.repeat_1 = nn.Sequential(*[Block17(scale=0.10, **dd) for _ in range(20)])
        self.feature_info += [dict(num_chs=1088, reduction=16, module="repeat_1")]

        self.mixed_7a = Mixed7a(**dd)
        self.repeat_2 = nn.Sequential(*[Block8(scale=0.20, **dd) for _ in range(9)])
        self.block8 = Block8(**dd)
        self.conv2d_7b = PreActConv(2080, self.num_features, 1, **dd)
        self.feature_info += [dict(num_chs=self.num_features, reduction=32, module="conv2d_7b")]
        # feature layers in forward order, and the layer index of each feature_info tap
        self.layer_names = [
            "conv2d_1a",
            "conv2d_2a",
            "conv2d_2b",
            "maxpool_3a",
            "conv2d_3b",
            "conv2d_4a",
            "maxpool_5a",
            "mixed_5b",
            "repeat",
            "mixed_6a",
            "repeat_1",
            "mixed_7a",
            "repeat_2",
            "block8",
            "conv2d_7b",
        ]
        self.feature_ends = [self.layer_names.index(info["module"]) for info in self.feature_info]

        self.norm = BatchNormAct2d(self.num_features, **dd)
        self.global_pool, self.head_drop, self.classif = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd
        )
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

        self.init_weights()

    @torch.jit.ignore
    def init_weights(self) -> None:
        """Baseline init: He (fan-out) normal conv weights."""
        he_init_(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable[[str], int | float]:
        """Parameter name -> layer index, for layer-wise optimiser settings."""
        module_map = {k: i for i, (k, _) in enumerate(flatten_modules(self.named_children(), prefix=()))}
        module_map.pop(("classif",))

        def _matcher(name: str) -> int | float:
            if name.startswith(("conv2d_1", "conv2d_2")):
                return 0
            if name.startswith(("conv2d_3", "conv2d_4")):
                return 1
            if name.startswith(("block8", "conv2d_7", "norm")):
                return len(module_map) + 1
            for k, i in module_map.items():
                if k == tuple(name.split(".")[: len(k)]):
                    return i
            return float("inf")

        return _matcher

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Enable or disable activation checkpointing per feature layer."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier layer."""
        return self.classif

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (and optionally the pooling) for ``num_classes`` outputs."""
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.classif = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, **dd
        )
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.classif.train(self.training)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward features and return intermediates (the ``feature_info`` taps).

        Args:
            x: Input image tensor.
            indices: Take last n features if int, all if None, select matching indices if sequence.
            norm: Apply the final norm to the last (conv2d_7b) intermediate.
            stop_early: Stop iterating over layers when the last desired intermediate is hit.
            output_fmt: Shape of intermediate feature outputs, only 'NCHW'.
            intermediates_only: Only return intermediate features.
        """
        assert output_fmt == "NCHW", "Output shape must be NCHW."
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.feature_ends), indices)
        take_ends = [self.feature_ends[i] for i in take_indices]
        last_end = self.feature_ends[-1]

        layer_names = self.layer_names
        if stop_early:
            layer_names = layer_names[: self.feature_ends[max_index] + 1]
        for i, n in enumerate(layer_names):
            x = getattr(self, n)(x)
            if i in take_ends:
                intermediates.append(self.norm(x) if norm and i == last_end else x)
        if intermediates_only:
            return intermediates
        if len(layer_names) == last_end + 1:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Remove the layers after the last of ``indices`` (and the head if ``prune_head``)."""
        take_indices, max_index = feature_take_indices(len(self.feature_ends), indices)
        prune_end = max_index < len(self.feature_ends) - 1
        for n in self.layer_names[self.feature_ends[max_index] + 1 :]:
            setattr(self, n, nn.Identity())
        if prune_norm or prune_end:
            self.norm = nn.Identity()  # sized for (and only applied to) the last layer
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, inception blocks and final BN-ReLU, the unpooled feature map."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq([getattr(self, n) for n in self.layer_names], x)
        else:
            x = self.conv2d_1a(x)
            x = self.conv2d_2a(x)
            x = self.conv2d_2b(x)
            x = self.maxpool_3a(x)
            x = self.conv2d_3b(x)
            x = self.conv2d_4a(x)
            x = self.maxpool_5a(x)
            x = self.mixed_5b(x)
            x = self.repeat(x)
            x = self.mixed_6a(x)
            x = self.repeat_1(x)
            x = self.mixed_7a(x)
            x = self.repeat_2(x)
            x = self.block8(x)
            x = self.conv2d_7b(x)
        x = self.norm(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global pooling, dropout and classifier (pooled features if ``pre_logits``)."""
        x = self.global_pool(x)
        x = self.head_drop(x)
        return x if pre_logits else self.classif(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def _create_inception_resnet_v2_preact(
    variant: str, pretrained: bool = False, **kwargs: Any
) -> InceptionResnetV2PreAct:
    """Build the model (orthogonally initialised with ``svb_config`` for the ``_svb`` name)."""
    return build_svb_model(InceptionResnetV2PreAct, variant, pretrained, **kwargs)


default_cfgs = generate_default_cfgs(
    pretrained_cfgs(
        ("inception_resnet_v2_preact", "inception_resnet_v2_preact_svb"),
        in1k_cfgs(
            input_size=(3, 299, 299),
            pool_size=(8, 8),
            crop_pct=0.8975,
            interpolation="bicubic",
            mean=IMAGENET_INCEPTION_MEAN,
            std=IMAGENET_INCEPTION_STD,
            first_conv="conv2d_1a",
            classifier="classif",
        ),
    )
)


@register_model
def inception_resnet_v2_preact(pretrained: bool = False, **kwargs: Any) -> InceptionResnetV2PreAct:
    """Pre-activation Inception-ResNet-v2, SGD baseline."""
    return _create_inception_resnet_v2_preact("inception_resnet_v2_preact", pretrained, **kwargs)


@register_model
def inception_resnet_v2_preact_svb(pretrained: bool = False, **kwargs: Any) -> InceptionResnetV2PreAct:
    """Pre-activation Inception-ResNet-v2, orthogonal init, for SVB + BBN training."""
    return _create_inception_resnet_v2_preact("inception_resnet_v2_preact_svb", pretrained, **kwargs)
