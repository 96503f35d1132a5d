"""Data for the recipe: image-classification sets through ``datasets``, timm transforms, loaders.

Sources (:func:`load_image_dataset`):

* ``sklearn-digits``: scikit-learn's handwritten digits, upsampled to 32x32 RGB, with a fixed train/test split
  (:func:`digits_dataset`); nothing to download.
* a Hugging Face Hub id (``uoft-cs/cifar10``, ``uoft-cs/cifar100``, ``ILSVRC/imagenet-1k``, any image
  classification set): ``datasets.load_dataset``; the image and label columns are detected.
* a local folder (``--data-dir``, or the name itself when it is a path): a ``save_to_disk`` folder, an
  ``imagefolder`` tree (``train/<class>/*.png``, ``test/<class>/*.png``) or a local copy of a Hub dataset
  repository (parquet files).

Transforms come from timm with the model's data config: ``cifar`` (pad + random crop + flip, for inputs up
to 64 pixels) or ``inception`` (timm's random-resized-crop ImageNet pipeline) for training, followed by timm's
auto-augment and random erasing when asked for; timm's eval transform (resize by ``crop_pct`` + center crop)
for testing.

:func:`build_test_loader` rebuilds the test loader of a finished run from its ``run.json``
(``recipes/validate.py`` evaluates runs with it, and through it ``hub/publish.py``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch.utils.data import DataLoader
from torchvision import transforms as T

__all__ = [
    "DIGITS",
    "DataError",
    "FixedLengthLoader",
    "ImageData",
    "StreamingImages",
    "TorchImageDataset",
    "build_test_loader",
    "build_transforms",
    "check_hub_reachable",
    "data_config_from_cfg",
    "digits_dataset",
    "load_image_dataset",
    "make_synthetic_dataset",
    "make_train_loader",
    "model_data_config",
]

_logger = logging.getLogger(__name__)

DIGITS = "sklearn-digits"
DIGITS_TEST_SIZE = 360  # of 1797 images (20%)
DIGITS_SPLIT_SEED = 0
TEST_SPLIT_NAMES = ("test", "validation", "valid", "val")
_LABEL_NAMES = ("label", "labels", "fine_label", "target", "class")
_IMAGE_NAMES = ("image", "img", "images", "jpg", "png", "pixel_values")
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


class DataError(RuntimeError):
    """The data set cannot be loaded or used; the message says what to do."""


@dataclass
class ImageData:
    """An image-classification data set: its splits and how to read them."""

    name: str
    train: Any  # datasets.Dataset, datasets.IterableDataset (--streaming) or None (test-only load)
    test: Any  # datasets.Dataset
    image_column: str
    label_column: str
    label_names: list[str]
    train_split: str | None
    test_split: str
    data_dir: str | None = None
    num_train: int | None = None  # the training split's size (also when streamed)
    streamed: bool = False  # train is a datasets.IterableDataset
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def describe(self) -> dict[str, Any]:
        """The ``dataset`` entry of ``run.json``."""
        return {
            "name": self.name,
            "data_dir": self.data_dir,
            "train_split": self.train_split,
            "test_split": self.test_split,
            "image_column": self.image_column,
            "label_column": self.label_column,
            "label_names": list(self.label_names),
            "num_train_images": self.num_train,
            "streamed": self.streamed,
            "num_test_images": len(self.test),
        }


# ----------------------------------------------------------------------------------------- data sets


@functools.lru_cache(maxsize=1)
def digits_dataset() -> Any:
    """scikit-learn's 1797 handwritten digits as a ``DatasetDict`` with ``train`` (1437) and ``test`` (360).

    Each 8x8 image (values 0..16) is scaled to 0..255, upsampled to 32x32 (bilinear) and stored as a 3-channel
    uint8 image; ``label`` is a ``ClassLabel`` with names ``"0"``..``"9"``. The split is fixed: a
    ``numpy.random.RandomState(0)`` permutation, its first 360 indices are the test set. Built in memory, the
    same on every machine.
    """
    import datasets  # noqa: PLC0415  (slow import, only when needed)

    try:
        from sklearn.datasets import load_digits  # noqa: PLC0415
    except ImportError as e:
        raise DataError(
            "the sklearn-digits data set comes with scikit-learn: pip install scikit-learn "
            "(or choose another --dataset)"
        ) from e

    digits = load_digits()
    pixels = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = [Image.fromarray(p, mode="L").resize((32, 32), Image.BILINEAR).convert("RGB") for p in pixels]
    labels = digits.target.astype(np.int64)
    order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(images))
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )

    def subset(indices: np.ndarray) -> Any:
        return datasets.Dataset.from_dict(
            {"image": [images[i] for i in indices], "label": [int(labels[i]) for i in indices]},
            features=features,
        )

    return datasets.DatasetDict(
        {"train": subset(order[DIGITS_TEST_SIZE:]), "test": subset(order[:DIGITS_TEST_SIZE])}
    )


def make_synthetic_dataset(
    path: str | os.PathLike | None = None,
    num_train: int = 32,
    num_test: int = 16,
    num_classes: int = 4,
    image_size: tuple[int, int] = (32, 32),
    seed: int = 0,
) -> Any:
    """A generated, learnable image-classification ``DatasetDict`` (``train``/``test``), saved to ``path``.

    Class ``c`` images are noise around a class-specific colour, so a model can fit them. Used by the tests
    and for smoke runs (``--data-dir PATH``); ``image_size`` is (height, width).
    """
    import datasets  # noqa: PLC0415

    rng = np.random.RandomState(seed)
    colours = rng.randint(0, 256, size=(num_classes, 3))
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=[f"class{i}" for i in range(num_classes)]),
        }
    )

    def split(n: int) -> Any:
        labels = np.arange(n) % num_classes
        noise = rng.randint(-60, 61, size=(n, *image_size, 3))
        pixels = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
        return datasets.Dataset.from_dict(
            {"image": [Image.fromarray(p) for p in pixels], "label": labels.tolist()}, features=features
        )

    dsd = datasets.DatasetDict({"train": split(num_train), "test": split(num_test)})
    if path is not None:
        dsd.save_to_disk(str(path))
    return dsd


def _split_files(source: str) -> tuple[dict[str, Any], str]:
    """The data files of every split of a Hub data set or a local folder (imagefolder, parquet, ...), without
    reading them: ``{split: files}``, and the name of the ``datasets`` builder that reads them."""
    import datasets  # noqa: PLC0415

    builder = datasets.load_dataset_builder(source)
    files = builder.config.data_files or {}
    if not files:
        raise DataError(f"{source}: no data files found (an empty folder or repository?)")
    return dict(files), builder.name


def _load_split_files(
    source: str, files: dict[str, Any], splits: list[str], streaming: bool = False, features: Any = None
) -> Any:
    """``load_dataset`` of ``splits`` only: the other splits are never downloaded nor prepared."""
    import datasets  # noqa: PLC0415

    data_files = {s: files[s] for s in splits}
    return datasets.load_dataset(source, data_files=data_files, streaming=streaming, features=features)


def _folder_classes(files: list[str]) -> list[str]:
    """The class names of an imagefolder split: the folders its images are in (``SPLIT/<class>/<image>``)."""
    return sorted({os.path.basename(os.path.dirname(str(f))) for f in files})


class _LazySplits(dict):
    """The splits of a Hub set or a local folder by name; a split is loaded when first asked for, alone.

    An imagefolder tree names its classes by folder, and ``datasets`` would number them per split (with
    ``train/{a,b,c}`` and ``test/{a,c}``, test's ``c`` would get ``b``'s label): here every split is read with
    the classes of ``class_split`` (the training split), and a split with a class that one lacks is refused.
    """

    def __init__(self, source: str, class_split: str | None = None) -> None:
        super().__init__()
        self.source = source
        self.files, builder = _split_files(source)
        self.class_split, self.classes = class_split, None
        has_metadata = any(
            os.path.basename(str(f)).startswith("metadata.") for v in self.files.values() for f in v
        )
        if builder == "imagefolder" and class_split in self.files and not has_metadata:
            self.classes = _folder_classes(self.files[class_split])

    def features(self, split: str) -> Any:
        """The features to read ``split`` with: the training split's classes for an imagefolder tree (None:
        as ``datasets`` infers them)."""
        if self.classes is None:
            return None
        import datasets  # noqa: PLC0415

        extra = sorted(set(_folder_classes(self.files[split])) - set(self.classes))
        if extra:
            raise DataError(
                f"split {split!r} of {self.source} has class folder(s) {extra} that the training split "
                f"{self.class_split!r} lacks (its classes: {self.classes}); labels must mean the same class "
                f"in every split: add those classes to {self.class_split}/ or remove them from {split}/"
            )
        return datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=self.classes)}
        )

    def keys(self) -> Any:
        return self.files.keys()

    def __contains__(self, split: object) -> bool:
        return split in self.files

    def __missing__(self, split: str) -> Any:
        if split not in self.files:
            raise KeyError(split)
        features = self.features(split)
        try:
            self[split] = _load_split_files(self.source, self.files, [split], features=features)[split]
        except Exception as e:  # noqa: BLE001
            raise DataError(f"cannot load split {split!r} of {self.source} ({type(e).__name__}: {e})") from e
        return super().__getitem__(split)

    def peek(self, split: str, rows: int = 64) -> Any:
        """The first ``rows`` examples of ``split``, streamed (enough to check that it is labelled)."""
        import datasets  # noqa: PLC0415

        stream = _load_split_files(
            self.source, self.files, [split], streaming=True, features=self.features(split)
        )[split]
        return datasets.Dataset.from_list(list(stream.take(rows)), features=stream.features)


def _open(source: str, class_split: str | None = None) -> Any:
    """A Hub data set or a local folder by split, each split loaded when used (see :class:`_LazySplits`)."""
    try:
        return _LazySplits(source, class_split)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001  (datasets and huggingface_hub raise many types)
        if Path(source).expanduser().exists():
            raise DataError(
                f"cannot read {source} as a data set ({type(e).__name__}: {e}); --data-dir takes a "
                "save_to_disk folder, an imagefolder tree (train/<class>/<image>, test/<class>/<image>) or a "
                "local copy of a Hub dataset"
            ) from e
        raise DataError(
            f"could not load data set {source!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            f"Offline or behind a firewall? {_local_copy_hint(source)}. Gated sets (ImageNet) also need "
            "`hf auth login` and accepted terms."
        ) from e


def _local_copy_hint(name: str) -> str:
    return (
        "Pass --data-dir DIR with a local copy: on a machine with network run "
        f"`datasets.load_dataset({name!r}).save_to_disk(DIR)` (or `hf download --repo-type dataset {name} "
        "--local-dir DIR`) and copy DIR here"
    )


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub cannot be reached, from one TCP connection with a short timeout and no retry; ``None`` when
    it connects, or when a proxy is configured (which this cannot check: ``datasets`` goes through it)."""
    import socket  # noqa: PLC0415
    import urllib.parse  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    from huggingface_hub import constants  # noqa: PLC0415

    url = urllib.parse.urlsplit(constants.ENDPOINT)
    if urllib.request.getproxies().get(url.scheme):
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        return f"{url.hostname}:{port}: {e}"
    return None


def check_hub_reachable(name: str, data_dir: str | os.PathLike | None = None) -> None:
    """Refuse at once a Hub data set that cannot be had here, before anything is written or downloaded.

    ``datasets`` retries an unreachable Hub for half a minute and then chains its errors; this looks first:
    offline (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``), the set must be in the Hugging Face cache;
    online, the Hub must accept a connection. ``sklearn-digits``, ``data_dir`` and local paths pass.

    Raises:
        DataError: the message says what to do (``--data-dir`` with a local copy).
    """
    if data_dir or name == DIGITS or Path(name).expanduser().exists():
        return
    import datasets.config  # noqa: PLC0415

    if datasets.config.HF_HUB_OFFLINE:
        try:
            _split_files(name)  # offline, datasets reads only its cache: no request, no retry
        except Exception:  # noqa: BLE001  (not cached: datasets raises several types)
            raise DataError(
                f"data set {name!r} is not in the Hugging Face cache and offline mode is on "
                f"(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE). {_local_copy_hint(name)}"
            ) from None
        return
    reason = _hub_unreachable()
    if reason is not None:
        raise DataError(
            f"data set {name!r} is on the Hugging Face Hub, which is unreachable from here ({reason}). "
            f"{_local_copy_hint(name)}; or, for a copy in the Hugging Face cache, set HF_HUB_OFFLINE=1"
        )


def _load_local(path: Path, class_split: str | None = None) -> Any:
    import datasets  # noqa: PLC0415

    if (path / "dataset_dict.json").is_file():
        try:
            return datasets.load_from_disk(str(path))  # memory-mapped: nothing to prepare
        except Exception as e:  # noqa: BLE001  (a damaged folder raises IndexError, OSError, ...)
            raise DataError(
                f"{path} is a damaged save_to_disk folder ({type(e).__name__}: {e}): a split without data "
                "(an empty split saves no shard) or a truncated or missing .arrow file. Save it again with "
                "DatasetDict({'train': ..., 'test': ...}).save_to_disk(DIR), each split non-empty"
            ) from e
    if (path / "state.json").is_file():
        raise DataError(
            f"{path} is a save_to_disk folder of a single split; save a DatasetDict with train and test "
            "splits "
            "(DatasetDict({'train': ..., 'test': ...}).save_to_disk(DIR))"
        )
    return _open(str(path), class_split)  # imagefolder tree or a local copy of a Hub dataset repository


def _peek(dsd: Any, split: str) -> Any:
    return dsd.peek(split) if isinstance(dsd, _LazySplits) else dsd[split]


def _pick_test_split(dsd: Any, label_column: str | None, requested: str | None) -> str:
    names = list(dsd.keys())
    if requested:
        if requested not in dsd:
            raise DataError(f"split {requested!r} not found; the data set has splits {names}")
        return requested
    for candidate in TEST_SPLIT_NAMES:
        if candidate not in dsd:
            continue
        split = _peek(dsd, candidate)
        column = label_column or _detect_label_column(split, None, strict=False)
        if column is None or column not in split.column_names or len(split) == 0:
            return candidate  # the column checks that follow say what is wrong
        if min(split.unique(column)) >= 0:  # e.g. ImageNet's unlabelled test split has -1
            return candidate
    raise DataError(
        f"no labelled test split among {names} (looked for {list(TEST_SPLIT_NAMES)}); name one with "
        "--val-split, "
        "or for an imagefolder tree put the test images under DIR/test/<class>/"
    )


def _detect_image_column(ds: Any, requested: str | None) -> str:
    import datasets  # noqa: PLC0415

    features = ds.features
    if requested:
        if requested not in features:
            raise DataError(f"image column {requested!r} not found; columns: {list(features)}")
        return requested
    images = [k for k, v in features.items() if isinstance(v, datasets.Image)]
    if images:
        return next((k for k in _IMAGE_NAMES if k in images), images[0])
    raise DataError(
        f"no image column (a datasets.Image feature) among {dict(features)}; name it with --image-column "
        "(it must hold images: cast it with dataset.cast_column(NAME, datasets.Image()))"
    )


def _detect_label_column(ds: Any, requested: str | None, strict: bool = True) -> str | None:
    import datasets  # noqa: PLC0415

    features = ds.features
    if requested:
        if requested not in features:
            raise DataError(f"label column {requested!r} not found; columns: {list(features)}")
        return requested
    class_labels = [k for k, v in features.items() if isinstance(v, datasets.ClassLabel)]
    if class_labels:
        return next((k for k in _LABEL_NAMES if k in class_labels), class_labels[0])
    for k in _LABEL_NAMES:
        feature = features.get(k)
        if isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
            return k
    if not strict:
        return None
    raise DataError(
        f"no label column (a ClassLabel or an integer column named one of {list(_LABEL_NAMES)}) among "
        f"{dict(features)}; name it with --label-column"
    )


def load_image_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    train_split: str | None = "train",
    val_split: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    need_train: bool = True,
    streaming: bool = False,
) -> ImageData:
    """Load an image-classification data set and detect its splits and columns.

    Args:
        name: ``sklearn-digits``, a Hub id, or a local path.
        data_dir: local copy to read instead of the Hub (save_to_disk folder, imagefolder tree, repo clone).
        train_split: training split name.
        val_split: test split name; ``None`` picks the first labelled of ``test``, ``validation``, ``valid``,
            ``val``.
        image_column / label_column: column names; ``None`` detects them (``datasets.Image`` feature;
            ``ClassLabel`` feature, preferring ``label`` and ``fine_label``).
        need_train: ``False`` loads only what testing needs.
        streaming: the training split as a ``datasets.IterableDataset`` (read as it is used; its size is in
            ``ImageData.num_train``).

    A Hub set or a local folder of data files loads only the splits used (ImageNet's 100k unlabelled test
    images are never downloaded when it tests on ``validation``); a test split chosen automatically is first
    checked for labels on its first rows, streamed.

    Raises:
        DataError: unreachable, malformed or incomplete data set; the message says what to do.
    """
    local = Path(data_dir).expanduser() if data_dir else None
    if local is None and name != DIGITS and Path(name).expanduser().exists():
        local = Path(name).expanduser()
    if local is not None and name == DIGITS:
        name = str(local)  # a local data set under the default name: name it by its folder
    if local is not None and not local.exists():
        raise DataError(f"--data-dir {local} does not exist")
    if local is not None and not local.is_dir():
        raise DataError(f"--data-dir {local} is not a folder")

    if local is not None:
        dsd = _load_local(local, train_split)
    elif name == DIGITS:
        dsd = digits_dataset()
    else:
        check_hub_reachable(name)
        dsd = _open(name, train_split)

    test_split = _pick_test_split(dsd, label_column, val_split)
    test = dsd[test_split]
    train = None
    num_train = None
    if need_train:
        if not train_split or train_split not in dsd:
            raise DataError(
                f"training split {train_split!r} not found; the data set has splits {list(dsd.keys())} "
                "(choose one with --train-split)"
            )
        if train_split == test_split:
            raise DataError(f"the training and test splits are both {test_split!r}; pick another --val-split")
        if streaming:
            train, num_train = _stream(dsd, train_split)
        else:
            train = dsd[train_split]
            num_train = len(train)
    image_column = _detect_image_column(test, image_column)
    label_column = _detect_label_column(test, label_column)
    label_names = _label_names(train if train is not None and not streaming else test, label_column)
    for split_name, split in ((train_split, train), (test_split, test)):
        if split is None:
            continue
        missing = {image_column, label_column} - set(split.column_names or ())
        if missing:
            raise DataError(f"split {split_name!r} lacks column(s) {sorted(missing)}")
    for split_name, size in ((train_split, num_train), (test_split, len(test))):
        if size == 0:
            raise DataError(f"split {split_name!r} is empty")
    _check_labels(name, {train_split: train, test_split: test}, label_column, label_names)
    return ImageData(
        name=name,
        train=train,
        test=test,
        image_column=image_column,
        label_column=label_column,
        label_names=label_names,
        train_split=train_split if need_train else None,
        test_split=test_split,
        data_dir=str(local) if local is not None else None,
        num_train=num_train,
        streamed=streaming and train is not None,
    )


def _stream(dsd: Any, split: str) -> tuple[Any, int]:
    """``split`` as a ``datasets.IterableDataset`` and its number of examples."""
    if not isinstance(dsd, _LazySplits):  # in memory or memory-mapped: stream it in shards all the same
        ds = dsd[split]
        return ds.to_iterable_dataset(num_shards=max(1, min(len(ds), 64))), len(ds)
    import datasets  # noqa: PLC0415

    stream = _load_split_files(dsd.source, dsd.files, [split], streaming=True, features=dsd.features(split))[
        split
    ]
    splits = datasets.load_dataset_builder(dsd.source).info.splits or {}
    if split in splits and splits[split].num_examples:
        return stream, int(splits[split].num_examples)
    _logger.info(
        "counting the examples of the streamed split %r (its size is not in the data set's card)", split
    )
    first = next(iter(stream.features or {"": None}))
    return stream, sum(1 for _ in stream.select_columns([first]))


def _check_labels(name: str, splits: dict[str, Any], column: str, label_names: list[str]) -> None:
    """Refuse, before any training, splits whose labels would index past the classifier or mean other
    classes: labels outside ``[0, len(label_names))`` (a ``ClassLabel``'s -1, an integer 5 of 3 classes; they
    would fail mid-epoch with an ``IndexError``, or a device-side assert on a GPU) and class names that
    differ from the training split's. A streamed split is not read ahead for this."""
    import datasets  # noqa: PLC0415

    count = len(label_names)
    for split_name, split in splits.items():
        if split is None:
            continue
        feature = (split.features or {}).get(column)
        if isinstance(feature, datasets.ClassLabel) and list(feature.names) != list(label_names):
            raise DataError(
                f"split {split_name!r} of {name} names its classes {list(feature.names)[:10]}, the training "
                f"split {list(label_names)[:10]}: a label would mean another class in each; make the splits' "
                "ClassLabel names equal (dataset.cast_column or align_labels_with_mapping)"
            )
        if isinstance(split, datasets.IterableDataset):
            continue
        bad = sorted({v for v in split.unique(column) if v is None or not 0 <= v < count}, key=str)
        if bad:
            raise DataError(
                f"split {split_name!r} of {name} holds label(s) {bad[:5]} in column {column!r}, outside "
                f"[0, {count}) for its {count} classes (-1 marks unlabelled examples): fix those labels or "
                f"drop those rows (dataset.filter(lambda row: 0 <= row[{column!r}] < {count})), or name "
                "another split (--train-split / --val-split)"
            )


def _label_names(ds: Any, column: str) -> list[str]:
    import datasets  # noqa: PLC0415

    feature = ds.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values = ds.unique(column)
    if min(values) < 0:
        raise DataError(f"label column {column!r} holds negative labels (unlabelled data?)")
    return [str(i) for i in range(int(max(values)) + 1)]


# ------------------------------------------------------------------------------------------ transforms


def data_config_from_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """The timm data config (input_size, interpolation, mean, std, crop_pct, crop_mode) of a pretrained
    cfg."""
    config = {k: cfg[k] for k in DATA_CONFIG_KEYS if cfg.get(k) is not None}
    config["input_size"] = tuple(config["input_size"])
    config.setdefault("crop_pct", 0.875)
    config.setdefault("interpolation", "bilinear")
    config.setdefault("crop_mode", "center")
    return config


def model_data_config(model: Any, options: Any) -> dict[str, Any]:
    """The model's own preprocessing (timm's ``resolve_data_config`` of its pretrained cfg), each entry
    overridden where ``options`` (the parsed arguments of ``recipes/train.py`` or ``recipes/validate.py``)
    sets it: ``input_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation``."""
    overrides = {
        "input_size": tuple(options.input_size) if options.input_size else None,
        "mean": tuple(options.mean) if options.mean else None,
        "std": tuple(options.std) if options.std else None,
        "crop_pct": options.crop_pct,
        "interpolation": options.interpolation,
    }
    return resolve_data_config(overrides, model=model)


def resolve_aug(aug: str, data_config: dict[str, Any]) -> str:
    """``auto`` -> ``cifar`` for inputs up to 64 pixels, else ``inception``."""
    if aug != "auto":
        return aug
    return "cifar" if max(data_config["input_size"][1:]) <= 64 else "inception"


def build_transforms(
    data_config: dict[str, Any],
    is_training: bool,
    *,
    aug: str = "auto",
    hflip: float = 0.5,
    crop_padding: int = 4,
    scale: tuple[float, float] | None = None,
    ratio: tuple[float, float] | None = None,
    color_jitter: float | None = 0.4,
    auto_augment: str | None = None,
    re_prob: float = 0.0,
    re_mode: str = "pixel",
    re_count: int = 1,
) -> Any:
    """timm transforms for the model's data config.

    Training: ``cifar`` = resize to the input size (a no-op for CIFAR), zero-pad ``crop_padding``
    pixels, random crop back, horizontal flip with probability ``hflip``; ``inception`` = timm's
    random-resized crop with ``scale``/``ratio``, flip and colour jitter (off under ``auto_augment``, as
    timm does); ``none`` = the eval transform. Both then apply timm's ``auto_augment`` policy
    (``rand-m9-mstd0.5-inc1`` = RandAugment, ``original`` / ``v0`` = AutoAugment, ``augmix-...``),
    normalise, and erase random rectangles with probability ``re_prob`` (timm's ``RandomErasing``,
    ``re_mode`` fill, up to ``re_count`` of them): timm's ``create_transform`` builds these, the cifar crop
    taking the place of its random-resized crop. Testing: ``create_transform(is_training=False)`` (resize
    to ``input / crop_pct``, center crop).
    """
    common = {
        "input_size": data_config["input_size"],
        "interpolation": data_config["interpolation"],
        "mean": data_config["mean"],
        "std": data_config["std"],
    }
    if not is_training or resolve_aug(aug, data_config) == "none":
        if is_training and (auto_augment or re_prob):
            raise ValueError("--aa / --reprob augment training images: not with --aug none")
        return create_transform(
            **common,
            is_training=False,
            crop_pct=data_config["crop_pct"],
            crop_mode=data_config.get("crop_mode", "center"),
        )
    aug = resolve_aug(aug, data_config)
    if aug not in ("cifar", "inception"):
        raise ValueError(f"unknown augmentation {aug!r} (auto, cifar, inception, none)")
    primary, secondary, final = create_transform(
        **common,
        is_training=True,
        scale=scale,
        ratio=ratio,
        hflip=hflip,
        color_jitter=color_jitter if aug == "inception" else None,
        auto_augment=auto_augment,
        re_prob=re_prob,
        re_mode=re_mode,
        re_count=re_count,
        separate=True,
    )
    if aug == "cifar":
        size = tuple(data_config["input_size"][1:])
        steps: list[Any] = [T.Resize(size, interpolation=_interp(data_config["interpolation"]))]
        if crop_padding:
            steps.append(T.RandomCrop(size, padding=crop_padding, fill=0, padding_mode="constant"))
        if hflip > 0:
            steps.append(T.RandomHorizontalFlip(hflip))
        primary = T.Compose(steps)
    return T.Compose([*primary.transforms, *secondary.transforms, *final.transforms])


def _interp(name: str) -> T.InterpolationMode:
    return {
        "bilinear": T.InterpolationMode.BILINEAR,
        "bicubic": T.InterpolationMode.BICUBIC,
        "nearest": T.InterpolationMode.NEAREST,
        "lanczos": T.InterpolationMode.LANCZOS,
    }.get(name, T.InterpolationMode.BILINEAR)


def _pil(image: Any, mode: str) -> Image.Image:
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    return image if image.mode == mode else image.convert(mode)


class TorchImageDataset(torch.utils.data.Dataset):
    """A ``datasets.Dataset`` split as ``(image tensor, label)`` pairs through a transform."""

    def __init__(self, ds: Any, image_column: str, label_column: str, transform: Any, mode: str = "RGB"):
        self.ds = ds.select_columns([image_column, label_column])
        self.image_column = image_column
        self.label_column = label_column
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.ds[int(index)]
        return self.transform(_pil(row[self.image_column], self.mode)), int(row[self.label_column])


class StreamingImages(torch.utils.data.IterableDataset):
    """This process's share of a streamed split (``datasets.IterableDataset``) as ``(image tensor, label)``.

    The stream is shuffled (shard order, then a buffer of ``buffer_size`` examples) with the same ``seed`` on
    every process and then split by ``datasets.distributed.split_dataset_by_node``: whole shards per process
    when their number divides ``world_size``, else every ``world_size``-th example, so the processes read
    disjoint parts that together cover the split. :meth:`set_epoch` reshuffles. In DataLoader workers,
    ``datasets`` splits this process's shards over the workers.
    """

    def __init__(
        self,
        stream: Any,
        image_column: str,
        label_column: str,
        transform: Any,
        mode: str = "RGB",
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        buffer_size: int = 10_000,
    ) -> None:
        from datasets.distributed import split_dataset_by_node  # noqa: PLC0415

        stream = stream.select_columns([image_column, label_column]).shuffle(
            seed=seed, buffer_size=buffer_size
        )
        self.stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
        self.image_column, self.label_column = image_column, label_column
        self.transform, self.mode = transform, mode

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def __iter__(self) -> Any:
        for row in self.stream:
            yield self.transform(_pil(row[self.image_column], self.mode)), int(row[self.label_column])


class FixedLengthLoader:
    """``steps`` batches per epoch from ``loader`` (over a :class:`StreamingImages`), on every process.

    The processes of a distributed run must take the same number of optimizer steps, whatever their shards
    hold: a stream that runs short is read again from its start (a few examples twice), one that holds more
    is cut. ``set_epoch`` reshuffles, as a prepared loader's does.
    """

    def __init__(self, loader: DataLoader, steps: int) -> None:
        self.loader, self.steps = loader, steps

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.loader.dataset.set_epoch(epoch)

    def __iter__(self) -> Any:
        done = 0
        while True:
            before = done
            for batch in self.loader:
                yield batch
                done += 1
                if done == self.steps:
                    return
            if done == before:
                raise DataError("the streamed training split gave this process no batch")


def make_train_loader(
    data: ImageData,
    transform: Any,
    mode: str,
    *,
    batch_size: int,
    steps: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle_buffer: int = 10_000,
    **kwargs: Any,
) -> DataLoader | FixedLengthLoader:
    """The training loader: ``batch_size`` is the global batch.

    A split in memory gives a shuffled ``DataLoader`` of global batches (``accelerator.prepare`` shares each
    out over the processes); a streamed split gives this process's :class:`StreamingImages` in batches of
    ``batch_size / world_size``, ``steps`` of them an epoch (:class:`FixedLengthLoader`). ``kwargs`` go to the
    ``DataLoader`` (:func:`loader_kwargs`).
    """
    if not data.streamed:
        dataset = TorchImageDataset(data.train, data.image_column, data.label_column, transform, mode)
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, **kwargs)
    # each process reads its own shards (no Accelerate dispatch) and takes exactly `steps` batches
    stream = StreamingImages(
        data.train,
        data.image_column,
        data.label_column,
        transform,
        mode,
        rank=rank,
        world_size=world_size,
        seed=seed,
        buffer_size=shuffle_buffer,
    )
    kwargs["persistent_workers"] = False  # workers see set_epoch
    return FixedLengthLoader(
        DataLoader(stream, batch_size=batch_size // world_size, drop_last=True, **kwargs), steps
    )


def loader_kwargs(workers: int, pin_memory: bool) -> dict[str, Any]:
    """DataLoader options that keep accelerators fed: workers, pinned memory, persistent workers."""
    kwargs: dict[str, Any] = {"num_workers": workers, "pin_memory": pin_memory}
    if workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=4)
    return kwargs


# ------------------------------------------------------------------------------------------- for hub/


def build_test_loader(
    run: dict[str, Any] | str | os.PathLike,
    batch_size: int = 128,
    workers: int = 0,
    data_dir: str | os.PathLike | None = None,
) -> DataLoader:
    """The test loader of a finished run, from its ``run.json`` (a dict, the file, or the run folder).

    It loads ``run["dataset"]`` (the recorded local copy if it is there, else the Hub id, or ``data_dir``),
    checks its size and labels against the record and applies the eval transform of
    ``run["pretrained_cfg"]``. Raises :class:`DataError` when the data is unreachable or differs.
    """
    if not isinstance(run, dict):
        path = Path(run)
        run = json.loads((path / "run.json" if path.is_dir() else path).read_text(encoding="utf-8"))
    info = run["dataset"]
    local = data_dir or info.get("data_dir")
    if local and not Path(local).exists():
        if data_dir:
            raise DataError(f"{data_dir} does not exist")
        local = None  # recorded copy not on this machine: try the name
    data = load_image_dataset(
        info["name"],
        local,
        val_split=info.get("test_split"),
        image_column=info.get("image_column"),
        label_column=info.get("label_column"),
        need_train=False,
    )
    expected = info.get("num_test_images")
    if expected is not None and len(data.test) != expected:
        raise DataError(
            f"test split {data.test_split!r} of {info['name']!r} has {len(data.test)} images, "
            f"the run had {expected}"
        )
    names = info.get("label_names")
    if names and list(names) != data.label_names:
        raise DataError(f"label names of {info['name']!r} differ from the run's")
    data_config = data_config_from_cfg(run["pretrained_cfg"])
    mode = "L" if data_config["input_size"][0] == 1 else "RGB"
    dataset = TorchImageDataset(
        data.test, data.image_column, data.label_column, build_transforms(data_config, False), mode
    )
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **loader_kwargs(workers, False))
