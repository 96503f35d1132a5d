"""timm_svb.recipe.data on the CPU without network: the digits, Hub data sets that cannot be reached,
local folders (save_to_disk, parquet, imagefolder), streamed splits and the errors that explain bad data."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from recipe_helpers import (
    make_data,
    one_thread,  # noqa: F401  (autouse fixture)
    recipe_data,
    run_recipe,
)

import timm_svb  # noqa: F401  (registers the zoo)

DIGITS, DataError = recipe_data.DIGITS, recipe_data.DataError
build_test_loader, digits_dataset = recipe_data.build_test_loader, recipe_data.digits_dataset
load_image_dataset = recipe_data.load_image_dataset


@pytest.mark.slow  # builds the digits set (seconds)
def test_digits_dataset_is_fixed() -> None:
    """The split and the images, against scikit-learn's digits and the documented recipe written out."""
    from PIL import Image
    from sklearn.datasets import load_digits

    dsd = digits_dataset()
    assert (len(dsd["train"]), len(dsd["test"])) == (1437, 360)
    assert dsd["train"].features["label"].names == [str(i) for i in range(10)]
    digits = load_digits()
    order = np.random.RandomState(0).permutation(1797)  # the first 360 are the test set
    assert dsd["test"]["label"] == digits.target[order[:360]].tolist()
    assert dsd["train"]["label"] == digits.target[order[360:]].tolist()
    for split, position, index in (("test", 5, order[5]), ("train", 1000, order[1360])):
        pixels = np.clip(np.round(digits.images[index] * 255 / 16), 0, 255).astype(np.uint8)
        expected = Image.fromarray(pixels, mode="L").resize((32, 32), Image.BILINEAR).convert("RGB")
        image = dsd[split][position]["image"]
        assert image.size == (32, 32) and image.mode == "RGB"
        assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_unreachable_hub_dataset_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="--data-dir"):
        load_image_dataset("uoft-cs/cifar10")


@pytest.fixture
def no_hub_requests(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fails the test on any Hub request or backoff sleep (datasets retries an unreachable Hub with sleeps);
    returns the hosts that the reachability check tried to connect to (each connection refused)."""
    import time

    tried: list[str] = []

    def refuse(address: tuple[str, int], timeout: float | None = None) -> Any:
        tried.append(address[0])
        raise OSError("Name or service not known")

    def no_request(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr("socket.create_connection", refuse)
    monkeypatch.setattr(time, "sleep", lambda *a: pytest.fail("a retry backed off"))
    monkeypatch.setattr("datasets.load_dataset_builder", no_request)
    monkeypatch.setattr("datasets.load_dataset", no_request)
    return tried


@pytest.mark.parametrize("offline", [False, True])
def test_unreachable_hub_fails_at_once_without_a_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_hub_requests: list[str], offline: bool
) -> None:
    """Hub unreachable (one connection refused) or offline mode (the set not cached): one DataError saying
    what to do, before the run folder exists and without a request or a retry."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", offline)

    def not_cached(name: str) -> Any:
        no_hub_requests.append("cache")
        raise FileNotFoundError(name)

    if offline:  # offline, only the cache is read: an empty one
        monkeypatch.setattr(recipe_data, "_split_files", not_cached)
    run = tmp_path / "run"
    expected = "not in the Hugging Face cache and offline" if offline else "Hub, which is unreachable"
    says = f"'uoft-cs/cifar10' .*{expected}.* Pass --data-dir DIR with a local copy"
    with pytest.raises(DataError, match=says):
        run_recipe(["--dataset", "uoft-cs/cifar10", "--output", str(run)])
    assert not run.exists()
    assert no_hub_requests == (["cache"] if offline else ["huggingface.co"])
    # local data needs no Hub
    recipe_data.check_hub_reachable("uoft-cs/cifar10", data_dir=str(tmp_path))
    recipe_data.check_hub_reachable(DIGITS)


def test_malformed_datasets_are_explained(tmp_path: Path) -> None:
    import datasets

    no_label = datasets.DatasetDict(
        {
            s: datasets.Dataset.from_dict(
                {"image": [np.zeros((4, 4, 3), np.uint8)] * 2, "note": ["a", "b"]},
                features=datasets.Features({"image": datasets.Image(), "note": datasets.Value("string")}),
            )
            for s in ("train", "test")
        }
    )
    no_label.save_to_disk(str(tmp_path / "no_label"))
    with pytest.raises(DataError, match="--label-column"):
        load_image_dataset("x", tmp_path / "no_label")
    only_train = datasets.DatasetDict({"train": no_label["train"]})
    only_train.save_to_disk(str(tmp_path / "only_train"))
    with pytest.raises(DataError, match="--val-split"):
        load_image_dataset("x", tmp_path / "only_train")
    with pytest.raises(DataError, match="does not exist"):
        load_image_dataset("x", tmp_path / "missing")


def _parquet_repo(root: Path, splits: dict[str, int], broken: str | None = None) -> Path:
    """A local copy of a Hub dataset repository: ``data/SPLIT-00000-of-00001.parquet`` (labels -1 for
    splits of size < 0: unlabelled), and a corrupt file for split ``broken``."""
    (root / "data").mkdir(parents=True)
    dsd = recipe_data.make_synthetic_dataset(None, num_train=8, num_test=4)
    for split, size in splits.items():
        ds = dsd["train"].select(range(abs(size)))
        if size < 0:
            ds = ds.map(lambda row: {"label": -1})
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    if broken:
        (root / "data" / f"{broken}-00000-of-00001.parquet").write_bytes(b"not parquet")
    return root


@pytest.mark.slow
def test_only_the_splits_used_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ImageNet's layout: train, an unlabelled test split and validation. The test split is only peeked at
    (its first rows, streamed) and found unlabelled; a split nobody uses is never read."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    repo = _parquet_repo(tmp_path / "repo", {"train": 8, "test": -4, "validation": 4}, broken="extra")
    with pytest.raises(DataError, match="extra"):  # the broken split is there, and unreadable
        load_image_dataset("x", repo, val_split="extra")
    data = load_image_dataset("x", repo)
    assert (data.test_split, len(data.test), len(data.train), data.num_train) == ("validation", 4, 8, 8)
    prepared = {p.stem.rsplit("-", 1)[-1] for p in (tmp_path / "cache").rglob("*.arrow")}
    assert prepared <= {"train", "validation"}, prepared  # the unlabelled test split was not prepared
    streamed = load_image_dataset("x", repo, streaming=True)
    assert streamed.streamed and streamed.num_train == 8 and not hasattr(streamed.train, "__len__")
    assert streamed.describe()["num_train_images"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("num_shards", [4, 3])
def test_streamed_split_is_shared_out_over_two_ranks(tmp_path: Path, num_shards: int) -> None:
    """In every epoch each rank's share of the stream (whole shards when they divide the ranks, else every
    other example) is disjoint from the other's and together they cover the split; epochs reshuffle."""
    split = recipe_data.make_synthetic_dataset(None, num_train=32)["train"]
    stream = split.to_iterable_dataset(num_shards=num_shards)
    fingerprint = lambda x: hashlib.sha1(x.numpy().tobytes()).hexdigest()  # noqa: E731
    to_tensor = recipe_data.build_transforms(timm.create_model("convnet20").pretrained_cfg, False)
    everything = {fingerprint(to_tensor(row["image"])) for row in split}
    seen = {}  # (rank, epoch): the images in the order read
    for rank in (0, 1):
        images = recipe_data.StreamingImages(
            stream, "image", "label", to_tensor, rank=rank, world_size=2, seed=3, buffer_size=8
        )
        loader = recipe_data.FixedLengthLoader(torch.utils.data.DataLoader(images, batch_size=4), 4)
        for epoch in range(2):
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == len(loader) == 4
            seen[rank, epoch] = [fingerprint(x) for xs, _ in batches for x in xs]
    for epoch in range(2):
        mine, theirs = set(seen[0, epoch]), set(seen[1, epoch])
        assert len(mine) == len(theirs) == 16 and not mine & theirs and mine | theirs == everything
    assert seen[0, 0] != seen[0, 1]


def test_short_stream_is_read_again_not_waited_for() -> None:
    """A rank whose shards hold fewer examples than the others still takes every step of the epoch."""
    split = recipe_data.make_synthetic_dataset(None, num_train=6)["train"]
    images = recipe_data.StreamingImages(
        split.to_iterable_dataset(num_shards=2), "image", "label", lambda im: torch.zeros(1), rank=0
    )
    loader = recipe_data.FixedLengthLoader(
        torch.utils.data.DataLoader(images, batch_size=4, drop_last=True), 3
    )
    assert len(list(loader)) == 3  # 6 examples give 1 batch of 4 a pass: the stream was read 3 times


def test_imagefolder_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config
    from PIL import Image

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            folder = tmp_path / "tree" / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (12, 10), (i * 50, 80, 160)).save(folder / f"{i}.png")
    data = load_image_dataset("my-pets", tmp_path / "tree")
    assert (data.image_column, data.label_column, data.label_names) == ("image", "label", ["cat", "dog"])
    assert (len(data.train), len(data.test), data.test_split) == (4, 4, "test")


def _image_tree(root: Path, classes: dict[str, str]) -> Path:
    """An imagefolder tree ``root/SPLIT/<class>/<i>.png``: two images per class, each class its colour."""
    from PIL import Image

    for split, names in classes.items():
        for name in names:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (ord(name), 40 * i, 0)).save(folder / f"{i}.png")
    return root


@pytest.mark.slow
def test_imagefolder_labels_mean_the_training_splits_classes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train/{a,b,c}``, ``test/{a,c}``: test's ``c`` images get ``c``'s label (2), not the second label of
    their own split; a class the training split lacks is refused, naming the split and the class."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    data = load_image_dataset("x", _image_tree(tmp_path / "fewer", {"train": "abc", "test": "ac"}))
    assert data.label_names == ["a", "b", "c"]
    colours = [np.asarray(image)[0, 0, 0] for image in data.test["image"]]
    assert [data.label_names[label] for label in data.test["label"]] == [chr(c) for c in colours]
    assert sorted(data.test["label"]) == [0, 0, 2, 2]
    test_only = load_image_dataset("x", tmp_path / "fewer", need_train=False)  # as the publisher reloads it
    assert sorted(test_only.test["label"]) == [0, 0, 2, 2] and test_only.label_names == ["a", "b", "c"]
    with pytest.raises(DataError, match=r"split 'test' .* \['d'\] .* 'train' lacks"):
        load_image_dataset("x", _image_tree(tmp_path / "more", {"train": "abc", "test": "abd"}))


def test_labels_outside_the_classes_are_refused_before_training(tmp_path: Path) -> None:
    """A ClassLabel -1 or an integer 5 of 3 classes would fail mid-epoch (IndexError, a device-side assert on
    a GPU): refused on loading, naming the split, the label and the fix; so are splits whose ClassLabel
    names differ."""
    import datasets

    def saved(name: str, labels: dict[str, list[int]], features: dict[str, Any]) -> Path:
        splits = {
            split: datasets.Dataset.from_dict(
                {"image": [np.zeros((4, 4, 3), np.uint8)] * len(values), "label": values},
                features=datasets.Features({"image": datasets.Image(), "label": features[split]}),
            )
            for split, values in labels.items()
        }
        datasets.DatasetDict(splits).save_to_disk(str(tmp_path / name))
        return tmp_path / name

    three = datasets.ClassLabel(names=["a", "b", "c"])
    folder = saved("minus_one", {"train": [0, 1, -1, 2], "test": [0, 1]}, {"train": three, "test": three})
    with pytest.raises(DataError, match=r"split 'train' .* label\(s\) \[-1\] .* \[0, 3\).*filter"):
        load_image_dataset("x", folder)
    ints = datasets.Value("int64")
    folder = saved("five", {"train": [0, 1, 2, 0], "test": [0, 5]}, {"train": ints, "test": ints})
    with pytest.raises(DataError, match=r"split 'test' .* label\(s\) \[5\] .* \[0, 3\)"):
        load_image_dataset("x", folder)
    other = datasets.ClassLabel(names=["a", "c", "b"])
    folder = saved("renamed", {"train": [0, 1, 2], "test": [0, 1]}, {"train": three, "test": other})
    with pytest.raises(DataError, match="split 'test' .* names its classes"):
        load_image_dataset("x", folder)


def test_damaged_save_to_disk_folder_raises_a_data_error(tmp_path: Path) -> None:
    """An empty split (saved without a shard) or a truncated .arrow shard: the documented DataError naming
    the folder, not the libraries' IndexError / OSError."""
    import datasets

    ok = make_data(tmp_path / "ok", num_train=8, num_test=4)
    dsd = datasets.load_from_disk(str(ok))
    datasets.DatasetDict({"train": dsd["train"], "test": dsd["test"].select([])}).save_to_disk(
        str(tmp_path / "empty")
    )
    shutil.copytree(ok, tmp_path / "truncated")
    (shard,) = (tmp_path / "truncated" / "train").glob("*.arrow")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    for name in ("empty", "truncated"):
        with pytest.raises(DataError, match=f"{tmp_path / name} is a damaged save_to_disk folder"):
            load_image_dataset("x", tmp_path / name)


@pytest.mark.slow
def test_data_set_name_is_recorded_for_the_digits(tmp_path: Path) -> None:
    """The digits need no data dir: the publisher rebuilds the test loader from the name alone."""
    run = {
        "dataset": {
            "name": DIGITS,
            "test_split": "test",
            "num_test_images": 360,
            "label_names": [str(i) for i in range(10)],
        },
        "pretrained_cfg": timm.create_model("convnet20_svb").pretrained_cfg,
    }
    loader = build_test_loader(run, batch_size=360)
    x, y = next(iter(loader))
    assert tuple(x.shape) == (360, 3, 32, 32) and sorted(set(y.tolist())) == list(range(10))
