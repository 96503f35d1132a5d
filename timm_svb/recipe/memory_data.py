"""The in-memory data path: a split decoded once into a uint8 tensor, augmented a whole batch at a time.

For image sets that fit in memory (CIFAR-10/100, digits): every image of a split goes through PIL once, is
stored as ``uint8`` pixels (a file in the decode cache, keyed on the data's fingerprint, so the next run
reads it back instead of decoding again), kept on the training device, and each batch is cropped, flipped
and normalised there by tensor indexing: no per-image Python, no PIL, no loader processes in the step.

It does exactly what the timm transforms of :func:`data.build_transforms` do for the ``cifar``
augmentation (resize to the input size, zero-pad + random crop, horizontal flip, ``ToTensor``,
``Normalize``) and for testing (resize + center crop, ``ToTensor``, ``Normalize``): for the same crop
offsets and flips a batch is the same to the bit (``tests/test_memory_data.py``). :func:`plan_memory_path`
reads those transforms and says whether this path can do them; anything else (RandAugment, random erasing,
random-resized crops, colour jitter) keeps the per-image loader.

The batches come out of an ordinary ``DataLoader`` (the dataset's ``__getitems__`` makes a whole batch), so
``accelerator.prepare`` shards them over the processes and seeds the shuffle exactly as for the per-image
path; the crops and flips are drawn from torch's global generator on the images' device, which Accelerate
seeds per process (``set_seed(seed, device_specific=True)``) and restores on ``--resume``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data.transforms import MaybeToTensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from tqdm.auto import tqdm

from .data import ImageData

__all__ = [
    "MemoryPlan",
    "MemorySplit",
    "crop_flip",
    "decode_split",
    "decode_splits",
    "default_cache_dir",
    "memory_loader",
    "memory_plans",
    "plan_memory_path",
    "split_nbytes",
]

_logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the cached file's layout changes


def default_cache_dir() -> Path:
    """``$TIMM_SVB_CACHE/decoded``, else ``$XDG_CACHE_HOME/timm_svb/decoded`` (``~/.cache/...``)."""
    root = os.environ.get("TIMM_SVB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "timm_svb"
    return Path(root).expanduser() / "decoded"


# ------------------------------------------------------------------------------------- what it can do


@dataclass(frozen=True)
class MemoryPlan:
    """How a split's timm transform maps onto this path: the PIL steps applied once at decode time, the
    random crop and flip applied per batch, and the normalisation."""

    decode_steps: tuple[Any, ...]  # deterministic PIL transforms (Resize, CenterCrop)
    padding: int  # zero padding of the random crop (0: no crop)
    hflip: float  # horizontal flip probability
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def describe(self) -> str:
        """The PIL steps, for the decode cache's key."""
        return " | ".join(repr(step) for step in self.decode_steps)


def plan_memory_path(transform: Any) -> tuple[MemoryPlan | None, str]:
    """Read a transform built by :func:`data.build_transforms`: a :class:`MemoryPlan` that does the same, or
    None and the reason (the first step this path cannot do).

    Accepted: ``Compose([Resize | CenterCrop ..., [RandomCrop(padding=p, fill 0, constant)],
    [RandomHorizontalFlip(p)], ToTensor, Normalize])``; the crop must give back the decoded size.
    """
    steps = list(transform.transforms) if isinstance(transform, T.Compose) else [transform]
    decode: list[Any] = []
    padding, hflip = 0, 0.0
    i = 0
    while i < len(steps) and isinstance(steps[i], T.Resize | T.CenterCrop):
        decode.append(steps[i])
        i += 1
    if i < len(steps) and isinstance(steps[i], T.RandomCrop):
        crop = steps[i]
        if crop.fill != 0 or crop.padding_mode != "constant" or crop.pad_if_needed:
            return None, f"{crop!r} pads other than with zeros"
        if not isinstance(crop.padding, int) and len(set(crop.padding or (0,))) != 1:
            return None, f"{crop!r} pads the sides unequally"
        if not decode or _output_size(decode) != tuple(crop.size):
            return None, f"{crop!r} crops to another size than the decoded images' (resize first)"
        padding = crop.padding if isinstance(crop.padding, int) else int((crop.padding or (0,))[0])
        i += 1
    if i < len(steps) and isinstance(steps[i], T.RandomHorizontalFlip):
        hflip = float(steps[i].p)
        i += 1
    rest = steps[i:]
    if (
        len(rest) != 2
        or not isinstance(rest[0], T.ToTensor | MaybeToTensor)
        or not isinstance(rest[1], T.Normalize)
    ):
        tensor_steps = T.ToTensor | MaybeToTensor | T.Normalize
        unknown = next((s for s in rest if not isinstance(s, tensor_steps)), (rest or steps)[0])
        return None, (
            f"{type(unknown).__name__} is not a transform the in-memory path does (it does resize, center "
            "crop, zero-padded random crop, horizontal flip, normalise)"
        )
    if not decode or _output_size(decode) is None:
        return None, "no resize or center crop fixes the image size"
    normalize = rest[1]
    mean, std = (tuple(float(v) for v in values) for values in (normalize.mean, normalize.std))
    return MemoryPlan(tuple(decode), padding, hflip, mean, std), ""


def _output_size(decode_steps: list[Any]) -> tuple[int, int] | None:
    """The (height, width) the PIL steps give for any input, or None when it depends on the input."""
    size = None
    for step in decode_steps:
        s = step.size
        if isinstance(s, int) or (isinstance(s, list | tuple) and len(s) == 1):
            # Resize(int) keeps the aspect ratio; a square center crop fixes it afterwards
            size = None if isinstance(step, T.Resize) else (int(np.ravel(s)[0]),) * 2
        else:
            size = (int(s[0]), int(s[1]))
    return size


# -------------------------------------------------------------------------------------------- decoding


@dataclass
class MemorySplit:
    """A decoded split: ``images`` uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str) -> MemorySplit:
        return MemorySplit(self.images.to(device), self.labels.to(device))


def split_nbytes(num_images: int, input_size: tuple[int, int, int]) -> int:
    """The memory a decoded split of ``num_images`` images of ``input_size`` (C, H, W) takes."""
    return num_images * (int(np.prod(input_size)) + 8)


def decode_split(
    ds: Any,
    image_column: str,
    label_column: str,
    mode: str,
    plan: MemoryPlan,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    desc: str = "decode",
) -> MemorySplit:
    """Decode every image of ``ds`` (a ``datasets.Dataset``) in ``mode`` (``RGB``/``L``) through the plan's
    PIL steps into a :class:`MemorySplit` on the CPU.

    With ``cache_dir`` the result is stored as ``<cache_dir>/<key>.safetensors`` and read back by the next
    call with the same key: the data set's fingerprint (``datasets`` changes it when the data files or any
    processing change), the columns, the mode and the PIL steps. A split without a fingerprint is decoded
    every time.
    """
    fingerprint = getattr(ds, "_fingerprint", None)
    path = None
    if cache_dir is not None and fingerprint:
        key = json.dumps(
            [CACHE_FORMAT, fingerprint, len(ds), image_column, label_column, mode, plan.describe()]
        )
        path = Path(cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"
        if path.is_file():
            try:
                tensors = load_file(str(path))
                if tensors["images"].shape[0] == len(ds):
                    return MemorySplit(tensors["images"], tensors["labels"])
            except Exception as e:  # noqa: BLE001  (a damaged cache file is decoded again)
                _logger.warning("decode cache %s unreadable (%s): decoding again", path, e)
    split = _decode(ds, image_column, label_column, mode, plan, progress, desc)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({"images": split.images, "labels": split.labels}, str(tmp))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    return split


def _decode(
    ds: Any, image_column: str, label_column: str, mode: str, plan: MemoryPlan, progress: bool, desc: str
) -> MemorySplit:
    steps = T.Compose(list(plan.decode_steps))
    n = len(ds)
    images: np.ndarray | None = None
    labels = np.empty(n, dtype=np.int64)
    done = 0
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for batch in ds.select_columns([image_column, label_column]).iter(batch_size=1000):
            for image, label in zip(batch[image_column], batch[label_column], strict=True):
                if not isinstance(image, Image.Image):
                    image = Image.fromarray(np.asarray(image))
                pixels = np.asarray(steps(image if image.mode == mode else image.convert(mode)))
                pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
                if images is None:
                    images = np.empty((n, pixels.shape[2], *pixels.shape[:2]), dtype=np.uint8)
                images[done] = pixels.transpose(2, 0, 1)
                labels[done] = int(label)
                done += 1
            bar.update(len(batch[label_column]))
    assert images is not None and done == n
    return MemorySplit(torch.from_numpy(images), torch.from_numpy(labels))


# ------------------------------------------------------------------------------------------ batches


def crop_flip(
    images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, padding: int
) -> torch.Tensor:
    """Zero-pad ``images`` (``(B, C, H, W)``) by ``padding`` on every side, crop ``H x W`` at ``(top[i],
    left[i])`` of the padded image ``i`` (``0 <= top, left <= 2 * padding``) and mirror it left-right where
    ``flip[i]``: torchvision's ``RandomCrop(padding=padding)`` then ``hflip``, one gather for the batch."""
    b, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    rows = top[:, None] + torch.arange(h, device=device)  # (B, H)
    columns = torch.arange(w, device=device).expand(b, w)
    columns = left[:, None] + torch.where(flip[:, None], columns.flip(1), columns)  # (B, W)
    flat = rows[:, :, None] * padded.shape[3] + columns[:, None, :]  # (B, H, W) index into each channel
    return padded.flatten(2).gather(2, flat.flatten(1)[:, None, :].expand(b, c, h * w)).view(b, c, h, w)


class _BatchedImages(Dataset):
    """A decoded split whose ``__getitems__`` makes a whole normalised batch (augmented for training)."""

    def __init__(self, split: MemorySplit, plan: MemoryPlan, train: bool) -> None:
        self.split, self.plan, self.train = split, plan, train
        device = split.images.device
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(plan.mean, dtype=torch.float32, device=device).view(shape)
        self.std = torch.tensor(plan.std, dtype=torch.float32, device=device).view(shape)

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([index])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.split.images.device
        index = torch.as_tensor(indices, device=device)
        x = self.split.images[index]
        if self.train and (self.plan.padding or self.plan.hflip):
            n = len(indices)
            span = 2 * self.plan.padding + 1
            top = torch.randint(0, span, (n,), device=device)
            left = torch.randint(0, span, (n,), device=device)
            flip = torch.rand(n, device=device) < self.plan.hflip
            x = crop_flip(x, top, left, flip, self.plan.padding)
        # ToTensor + Normalize, the same operations in the same order (bit-identical)
        return x.float().div(255).sub(self.mean).div(self.std), self.split.labels[index]


def _as_is(batch: Any) -> Any:
    """The DataLoader's collate: ``__getitems__`` already made the batch."""
    return batch


def memory_loader(split: MemorySplit, plan: MemoryPlan, *, train: bool, batch_size: int) -> DataLoader:
    """A ``DataLoader`` of whole batches of ``split`` (augmented by ``plan`` when ``train``: shuffled, full
    batches only); no loader processes (the work is a few tensor operations on the images' device)."""
    return DataLoader(
        _BatchedImages(split, plan, train),
        batch_size=batch_size,
        shuffle=train,
        drop_last=train,
        collate_fn=_as_is,
        num_workers=0,
    )


def memory_plans(
    args: argparse.Namespace, data: ImageData, train_tf: Any, test_tf: Any, input_size: tuple[int, int, int]
) -> tuple[MemoryPlan, MemoryPlan] | None:
    """The in-memory path's plans for the training and test transforms (``--in-memory``), or None for the
    per-image loaders; the log says which path and why."""
    if args.in_memory == "off":
        _logger.info("data path: per-image loader (--in-memory off)")
        return None
    train_plan, why = plan_memory_path(train_tf)
    test_plan, test_why = plan_memory_path(test_tf)
    need = split_nbytes(data.num_train + len(data.test), input_size)
    if data.streamed:
        why = "--streaming reads the training split as it goes"
    elif train_plan is None:
        why = f"training augmentation: {why}"
    elif test_plan is None:
        why = f"test transform: {test_why}"
    elif need > args.in_memory_cap * 2**30:
        why = f"the decoded splits take {need / 2**30:.2f} GiB, over --in-memory-cap {args.in_memory_cap:g}"
    else:
        _logger.info(
            "data path: in memory (%d + %d images decoded once, %.2f GiB of uint8 on the training device; "
            "crops, flips and normalisation a batch at a time)",
            data.num_train,
            len(data.test),
            need / 2**30,
        )
        return train_plan, test_plan
    if args.in_memory == "on":
        raise SystemExit(f"--in-memory on: {why}; drop it (or --in-memory auto) to use the per-image loader")
    _logger.info("data path: per-image loader (%s)", why)
    return None


def decode_splits(
    args: argparse.Namespace,
    accelerator: Accelerator,
    data: ImageData,
    mode: str,
    plans: tuple[MemoryPlan, MemoryPlan],
) -> tuple[MemorySplit, MemorySplit]:
    """Both splits decoded (or read from the decode cache: the node's first process writes it) and moved to
    the training device."""
    cache = None if args.data_cache == "none" else (args.data_cache or default_cache_dir())
    splits = []
    with accelerator.local_main_process_first():
        for name, ds, plan in zip(
            (data.train_split, data.test_split), (data.train, data.test), plans, strict=True
        ):
            split = decode_split(
                ds,
                data.image_column,
                data.label_column,
                mode,
                plan,
                cache_dir=cache,
                progress=args.progress and accelerator.is_local_main_process,
                desc=f"decode {name}",
            )
            splits.append(split.to(accelerator.device))
    return splits[0], splits[1]
