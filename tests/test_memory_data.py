"""The in-memory data path (recipes/memory_data.py): the same batches as the per-image timm transforms, the
decode cache, when the recipe takes it, resume on it, and the real CIFAR-10 copy through both paths."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image
from recipe_helpers import (
    REPO,
    make_data,
    one_thread,  # noqa: F401  (autouse fixture)
    recipe_data,
    recipe_loop,
    run_recipe,
)
from recipe_helpers import recipe_memory_data as memory_data
from timm.data import resolve_data_config
from torch.utils.data import DataLoader
from torchvision.transforms import RandomCrop, RandomHorizontalFlip
from torchvision.transforms import functional as TF

import timm_svb  # noqa: F401  (registers the zoo)

CIFAR_COPY = REPO.parent / "shared" / "data" / "cifar10-jpeg"


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("data") / "cifar_like", num_train=16, num_test=8, num_classes=4)


def cifar_config() -> dict:
    return resolve_data_config({}, model=timm.create_model("convnet20_svb", num_classes=10))


def random_split(n: int, size: int = 32, seed: int = 0) -> memory_data.MemorySplit:
    rng = np.random.RandomState(seed)
    images = torch.from_numpy(rng.randint(0, 256, (n, 3, size, size)).astype(np.uint8))
    return memory_data.MemorySplit(images, torch.arange(n) % 10)


@pytest.mark.parametrize("padding", [0, 1, 4])
def test_crop_flip_is_pad_crop_and_mirror(padding: int) -> None:
    """Against torchvision's functional pad, crop and hflip of each PIL image, every offset and both flips."""
    split = random_split(2 * (2 * padding + 1) ** 2)
    span = 2 * padding + 1
    grid = torch.tensor([(t, left, f) for t in range(span) for left in range(span) for f in (0, 1)])
    top, left, flip = grid[:, 0], grid[:, 1], grid[:, 2].bool()
    out = memory_data.crop_flip(split.images[: len(grid)], top, left, flip, padding)
    for i in range(len(grid)):
        image = Image.fromarray(split.images[i].permute(1, 2, 0).numpy())
        ref = TF.crop(TF.pad(image, padding, fill=0), int(top[i]), int(left[i]), 32, 32)
        ref = TF.hflip(ref) if flip[i] else ref
        assert torch.equal(out[i], torch.from_numpy(np.array(ref)).permute(2, 0, 1)), (i, grid[i])


def test_a_training_batch_is_the_timm_transforms_on_the_same_offsets(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of the in-memory path and the per-image transform of each of its images, made to draw the
    batch's crop offsets and flips: equal to the bit (pixels, normalisation, labels)."""
    transform = recipe_data.build_transforms(cifar_config(), True, aug="cifar", hflip=0.5, crop_padding=4)
    plan, why = memory_data.plan_memory_path(transform)
    assert plan is not None and why == "" and (plan.padding, plan.hflip) == (4, 0.5)
    split = random_split(64)
    drawn = {}

    def recording(images, top, left, flip, padding):  # noqa: ANN001, ANN202
        drawn.update(top=top.tolist(), left=left.tolist(), flip=flip.tolist())
        return crop_flip(images, top, left, flip, padding)

    crop_flip, getitems = memory_data.crop_flip, memory_data._BatchedImages.__getitems__
    monkeypatch.setattr(memory_data, "crop_flip", recording)
    monkeypatch.setattr(
        memory_data._BatchedImages, "__getitems__", lambda self, i: drawn.update(order=i) or getitems(self, i)
    )
    x, y = next(iter(memory_data.memory_loader(split, plan, train=True, batch_size=16)))
    order = drawn["order"]
    assert sorted(order) != order  # shuffled
    assert x.dtype == torch.float32 and x.shape == (16, 3, 32, 32) and 0 < sum(drawn["flip"]) < 16
    offsets = iter(zip(drawn["top"], drawn["left"], strict=True))
    flips = iter(drawn["flip"])
    monkeypatch.setattr(RandomCrop, "get_params", staticmethod(lambda img, size: (*next(offsets), 32, 32)))
    monkeypatch.setattr(
        RandomHorizontalFlip, "forward", lambda self, img: TF.hflip(img) if next(flips) else img
    )
    for i, index in enumerate(order):
        image = Image.fromarray(split.images[index].permute(1, 2, 0).numpy())
        assert torch.equal(x[i], transform(image)), i
        assert int(y[i]) == int(split.labels[index])


def test_test_batches_are_the_eval_transform(tmp_path: Path) -> None:
    """The test split through the in-memory path and through the per-image loader: the same tensors."""
    data = recipe_data.load_image_dataset(
        "x", make_data(tmp_path / "d", num_train=8, num_test=20, image_size=(40, 36))
    )
    config = {**cifar_config(), "crop_pct": 0.875}  # a resize and a center crop that change the pixels
    transform = recipe_data.build_transforms(config, False)
    plan, why = memory_data.plan_memory_path(transform)
    assert plan is not None, why
    split = memory_data.decode_split(
        data.test, data.image_column, data.label_column, "RGB", plan, progress=False
    )
    ours = list(memory_data.memory_loader(split, plan, train=False, batch_size=8))
    reference = DataLoader(
        recipe_data.TorchImageDataset(data.test, data.image_column, data.label_column, transform),
        batch_size=8,
    )
    assert len(ours) == len(reference) == 3
    for (x, y), (rx, ry) in zip(ours, reference, strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


@pytest.mark.parametrize(
    ("kwargs", "refused"),
    [
        ({"aug": "cifar", "auto_augment": "rand-m9-mstd0.5-inc1"}, "RandAugment"),
        ({"aug": "cifar", "re_prob": 0.25}, "RandomErasing"),
        ({"aug": "inception"}, "RandomResizedCrop"),
    ],
)
def test_transforms_it_cannot_do_are_named(kwargs: dict, refused: str) -> None:
    plan, why = memory_data.plan_memory_path(recipe_data.build_transforms(cifar_config(), True, **kwargs))
    assert plan is None and refused in why


def test_decode_cache_is_read_back_and_follows_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second decode of the same split reads the cache file; changed data (a new fingerprint) decodes
    again; a damaged cache file is decoded again, not trusted."""
    import datasets  # noqa: PLC0415

    transform = recipe_data.build_transforms(cifar_config(), False)
    plan, _ = memory_data.plan_memory_path(transform)
    cache = tmp_path / "cache"
    data = recipe_data.load_image_dataset("x", make_data(tmp_path / "a", num_train=8, num_test=12))
    first = memory_data.decode_split(
        data.test, "image", "label", "RGB", plan, cache_dir=cache, progress=False
    )
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1

    decoded = []
    real = memory_data._decode
    monkeypatch.setattr(memory_data, "_decode", lambda *a: decoded.append(1) or real(*a))
    again = memory_data.decode_split(
        data.test, "image", "label", "RGB", plan, cache_dir=cache, progress=False
    )
    assert not decoded and torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)

    # the same rows with one image changed, saved and loaded as a user would
    changed = data.test.map(
        lambda row, i: {"image": Image.new("RGB", (32, 32), (255, 0, 0)) if i == 0 else row["image"]},
        with_indices=True,
        features=data.test.features,
    )
    changed_dir = tmp_path / "b"
    datasets.DatasetDict({"train": data.train, "test": changed}).save_to_disk(str(changed_dir))
    new = recipe_data.load_image_dataset("x", changed_dir)
    assert new.test._fingerprint != data.test._fingerprint
    fresh = memory_data.decode_split(new.test, "image", "label", "RGB", plan, cache_dir=cache, progress=False)
    assert decoded == [1] and len(list(cache.glob("*.safetensors"))) == 2
    assert torch.equal(fresh.images[0, :, 0, 0], torch.tensor([255, 0, 0], dtype=torch.uint8))
    assert torch.equal(fresh.images[1:], first.images[1:])

    files[0].write_bytes(b"not a safetensors file")
    repaired = memory_data.decode_split(
        data.test, "image", "label", "RGB", plan, cache_dir=cache, progress=False
    )
    assert decoded == [1, 1] and torch.equal(repaired.images, first.images)


def _log_lines(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if "data path" in r.getMessage())


@pytest.mark.slow
def test_recipe_chooses_the_path_and_says_why(
    tmp_path: Path, cifar_like: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = [
        "--model",
        "convnet20_svb",
        "--model-kwargs",
        "depth_x=1",
        "--data-dir",
        str(cifar_like),
        "--epochs",
        "1",
    ]
    base += ["--batch-size", "8", "--data-cache", str(tmp_path / "cache")]
    with caplog.at_level(logging.INFO, logger="timm_svb.recipe"):
        memory = run_recipe([*base, "--output", str(tmp_path / "m")])
    assert "data path: in memory" in _log_lines(caplog)
    assert json.loads((tmp_path / "m" / "run.json").read_text())["recipe"]["data_path"] == "memory"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="timm_svb.recipe"):
        run_recipe([*base, "--in-memory-cap", "1e-6", "--output", str(tmp_path / "cap")])
    assert "per-image loader (the decoded splits take" in _log_lines(caplog)
    assert json.loads((tmp_path / "cap" / "run.json").read_text())["recipe"]["data_path"] == "loader"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="timm_svb.recipe"):
        run_recipe([*base, "--reprob", "0.5", "--output", str(tmp_path / "re")])
    assert "per-image loader (training augmentation: RandomErasing" in _log_lines(caplog)
    with pytest.raises(SystemExit, match="--in-memory on: the decoded splits take"):
        run_recipe([*base, "--in-memory", "on", "--in-memory-cap", "1e-6", "--output", str(tmp_path / "on")])
    assert memory.finished


@pytest.mark.slow
def test_both_paths_test_the_same_weights_alike(tmp_path: Path, cifar_like: Path) -> None:
    """A run on the in-memory path, its final weights evaluated through the per-image test loader of
    ``build_test_loader`` (what validate.py and the publisher use): the error the run recorded."""
    argv = ["--model", "convnet20_svb", "--model-kwargs", "depth_x=1", "--data-dir", str(cifar_like)]
    result = run_recipe([*argv, "--epochs", "1", "--batch-size", "8", "--output", str(tmp_path / "r")])
    recorded = json.loads((tmp_path / "r" / "run.json").read_text())
    assert recorded["recipe"]["data_path"] == "memory"
    model = timm.create_model("convnet20_svb", num_classes=4, depth_x=1)
    model.load_state_dict(safetensors.torch.load_file(str(tmp_path / "r" / "model_final.safetensors")))
    metrics = recipe_loop.evaluate(model, recipe_data.build_test_loader(tmp_path / "r"))
    assert metrics["top1_err"] == result.state.history[-1]["top1_err"]


@pytest.mark.slow
def test_resume_on_the_in_memory_path_is_bit_identical(tmp_path: Path, cifar_like: Path) -> None:
    argv = ["--model", "convnet20_svb", "--model-kwargs", "depth_x=1", "--data-dir", str(cifar_like)]
    argv += [
        "--batch-size",
        "8",
        "--epochs",
        "3",
        "--in-memory",
        "on",
        "--svb-every",
        "3",
        "--svb-skip-last",
        "0",
    ]
    straight = run_recipe([*argv, "--output", str(tmp_path / "a")])
    run_recipe([*argv, "--stop-after", "1", "--output", str(tmp_path / "b")])
    resumed = run_recipe([*argv, "--resume", "--output", str(tmp_path / "b")])
    assert resumed.start_epoch == 1 and resumed.svb.num_applied == straight.svb.num_applied > 0
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_COPY.is_dir(), reason=f"the CIFAR-10 JPEG copy is not here ({CIFAR_COPY})")
def test_real_cifar_copy_through_both_paths() -> None:
    """The first 64 test images of the real copy: the in-memory path's batches are the per-image loader's."""
    data = recipe_data.load_image_dataset(str(CIFAR_COPY), need_train=False)
    test = data.test.select(range(64))
    transform = recipe_data.build_transforms(cifar_config(), False)
    plan, _ = memory_data.plan_memory_path(transform)
    split = memory_data.decode_split(test, data.image_column, data.label_column, "RGB", plan, progress=False)
    reference = DataLoader(
        recipe_data.TorchImageDataset(test, data.image_column, data.label_column, transform), batch_size=32
    )
    for (x, y), (rx, ry) in zip(
        memory_data.memory_loader(split, plan, train=False, batch_size=32), reference, strict=True
    ):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert data.label_names[:2] == ["airplane", "automobile"]
