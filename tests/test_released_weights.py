"""The weights the package ships (record entries with a ``package_file``): each loads offline by name and
through every path hub/README.md lists, its record, package file, release folder and model card agree, and it
reproduces its recorded test error on the CIFAR-10 JPEG copy's test split exactly (where the copy is)."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import ModelCard
from recipe_helpers import REPO, one_thread, recipe_data, recipe_loop  # noqa: F401  (autouse fixture)

import timm_svb  # noqa: F401  (registers the zoo)
from timm_svb.models._pretrained import PUBLISHED, file_sha256, shipped_weights_path

SHIPPED = sorted(name for name, entry in PUBLISHED.items() if "package_file" in entry)
RELEASES = REPO / "hub" / "releases"
CIFAR_COPY = REPO.parent / "shared" / "data" / "cifar10-jpeg"


def test_the_first_weights_are_shipped() -> None:
    """Issue 19: at least the SVB(+BBN) ConvNet-20 and pre-act ResNet-20 of the CPU-scale studies."""
    assert {"convnet20_svb.c10jpeg", "preact_resnet20_svb.c10jpeg"} <= set(SHIPPED)
    assert timm.list_pretrained("*svb*") == sorted(n for n in PUBLISHED if "svb" in n)


@pytest.mark.parametrize("name", SHIPPED)
def test_record_package_file_release_and_card_agree(name: str) -> None:
    entry, path = PUBLISHED[name], shipped_weights_path(name)
    assert path.is_file() and path.stat().st_size < 5 * 2**20
    release = RELEASES / name
    assert file_sha256(path) == entry["sha256"] == file_sha256(release / "model.safetensors")
    config = json.loads((release / "config.json").read_text())
    arch, tag = name.split(".")
    assert config["architecture"] == arch and config["pretrained_cfg"]["tag"] == tag
    card = ModelCard.load(release / "README.md")
    text = card.text
    assert "CIFAR-10 (JPEG q75 copy)" in text and f"timm.create_model('{name}', pretrained=True)" in text
    assert f"{entry['metrics']['top1_err']:.2f}" in text
    svb = entry["svb_config"]
    assert svb["epsilon"] == config["model_args"].get("svb_epsilon", 0.5) and f"{svb['epsilon']:g}" in text
    assert entry["metrics"]["weights"] == "final"  # no selection on the test split


def _paths(name: str) -> dict[str, torch.nn.Module]:
    """Every way hub/README.md loads a shipped file."""
    arch = name.split(".")[0]
    via_load = timm.create_model(name)
    timm.models.load_pretrained(via_load)
    return {
        "by name": timm.create_model(name, pretrained=True),
        "load_pretrained": via_load,
        "release folder": timm.create_model(f"local-dir:{RELEASES / name}", pretrained=True),
        "file overlay": timm.create_model(
            arch, pretrained=True, pretrained_cfg_overlay={"file": str(shipped_weights_path(name))}
        ),
    }


@pytest.mark.parametrize("name", SHIPPED)
def test_every_path_loads_exactly_the_shipped_file(name: str) -> None:
    expected = safetensors.torch.load_file(str(shipped_weights_path(name)))
    for path, model in _paths(name).items():
        state = model.state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state), (
            path
        )


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_COPY.is_dir(), reason=f"the CIFAR-10 JPEG copy is not here ({CIFAR_COPY})")
@pytest.mark.parametrize("name", SHIPPED)
def test_reproduces_its_recorded_test_error(name: str) -> None:
    """An independent evaluation (the per-image timm eval transform, not the run's in-memory path) of the
    model users get, on the copy's whole test split: the card's and the record's figures, exactly."""
    model = timm.create_model(name, pretrained=True)
    data = recipe_data.load_image_dataset(str(CIFAR_COPY), need_train=False)
    transform = recipe_data.build_transforms(timm.data.resolve_model_data_config(model), False)
    loader = torch.utils.data.DataLoader(
        recipe_data.TorchImageDataset(data.test, data.image_column, data.label_column, transform),
        batch_size=500,
    )
    metrics = recipe_loop.evaluate(model, loader)
    recorded = PUBLISHED[name]["metrics"]
    assert metrics["num_images"] == 10_000
    assert (metrics["top1_err"], metrics["top5_err"]) == (recorded["top1_err"], recorded["top5_err"])
