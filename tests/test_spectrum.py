"""Spectra: exact recovery of known singular values, statistics, the plot, the CLI and its errors."""

import contextlib
import csv
import io
import math
import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import timm
import torch
from timm.models import save_for_hf
from torch import nn

import timm_svb  # registers the models
from timm_svb.spectrum import (
    CSV_COLUMNS,
    SpectrumInputError,
    depth_thirds,
    layer_rows,
    layer_shapes,
    load_model,
    main,
    model_spectrum,
    plot_spectra,
    spectra_figure,
    spectrum_by_depth,
    spectrum_summary,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]
# a model without published weights, whatever the record holds (tests never download)
UNPUBLISHED = next(
    n for n in timm.list_models("preact_resnet*") if not timm.get_pretrained_cfg(n).has_weights
)


def orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    return q * torch.sign(torch.diagonal(r))


def with_singular_values(
    rows: int, cols: int, values: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """A ``rows x cols`` matrix ``U diag(values) V^T`` with random orthogonal ``U``, ``V``."""
    k = min(rows, cols)
    u, v = orthogonal(rows, generator)[:, :k], orthogonal(cols, generator)[:, :k]
    return (u * values) @ v.T


def known_model(dtype: torch.dtype = torch.float64) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Wide and tall linears, a grouped conv and an ill-conditioned layer (float64 SVD fallback)."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 5, bias=False),  # 5 x 8
        nn.Conv2d(4, 6, 3, groups=2, bias=False),  # 2 groups of 3 x 18
        nn.ReLU(),
        nn.Linear(4, 12),  # tall 12 x 4
        nn.Linear(6, 6),  # condition number 1e8
    ).to(dtype)
    expected = {
        "0": torch.tensor([[3.0, 2.0, 1.5, 0.5, 0.25]], dtype=torch.float64),
        "1": torch.tensor([[4.0, 1.0, 0.1], [2.5, 2.0, 0.2]], dtype=torch.float64),
        "3": torch.tensor([[1.4, 1.1, 0.9, 0.7]], dtype=torch.float64),
        "4": torch.tensor([[10.0, 5.0, 1.0, 1e-2, 1e-4, 1e-7]], dtype=torch.float64),
    }
    with torch.no_grad():
        model[0].weight.copy_(with_singular_values(5, 8, expected["0"][0], g))
        groups = [with_singular_values(3, 18, s, g) for s in expected["1"]]
        model[1].weight.copy_(torch.cat(groups).reshape(6, 2, 3, 3))
        model[3].weight.copy_(with_singular_values(12, 4, expected["3"][0], g))
        model[4].weight.copy_(with_singular_values(6, 6, expected["4"][0], g))
    return model, expected


def test_known_singular_values_are_recovered_exactly():
    model, expected = known_model(torch.float64)
    spectrum = model_spectrum(model)
    assert list(spectrum) == ["0", "1", "3", "4"]
    for name, values in expected.items():
        got = spectrum[name]
        assert got.dtype == torch.float64 and got.device.type == "cpu"
        assert got.shape == values.shape
        torch.testing.assert_close(got, values, rtol=1e-9, atol=0)


def test_known_singular_values_float32_weights():
    model, expected = known_model(torch.float32)
    spectrum = model_spectrum(model)
    for name in ("0", "1", "3"):  # float32 rounding of the weights moves singular values by ~1e-7 relative
        torch.testing.assert_close(spectrum[name], expected[name], rtol=1e-6, atol=1e-6)


def test_shapes_selection_and_nonfinite():
    model, _ = known_model()
    tied = nn.Sequential(model, nn.Linear(6, 6, bias=False).double())
    tied[1].weight = model[4].weight  # tied weights are measured once, under the first name
    assert list(model_spectrum(tied)) == ["0.0", "0.1", "0.3", "0.4"]
    assert layer_shapes(model) == {"0": (5, 8), "1": (6, 2, 3, 3), "3": (12, 4), "4": (6, 6)}
    assert list(model_spectrum(model, exclude=("4",))) == ["0", "1", "3"]
    assert list(model_spectrum(model, include=("1", "3"))) == ["1", "3"]
    assert list(model_spectrum(model, layer_types=(nn.Conv2d,))) == ["1"]
    with pytest.raises(ValueError, match="has no layer to"):
        model_spectrum(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    with pytest.warns(RuntimeWarning, match="'0' holds NaN"):
        spectrum = model_spectrum(model)
    assert spectrum["0"].shape == (1, 5) and spectrum["0"].isnan().all()
    assert layer_rows(spectrum)[0].condition_number != layer_rows(spectrum)[0].condition_number  # NaN


def test_layer_rows_statistics():
    spectrum = {
        "a": torch.tensor([[2.0, 1.0, 0.5, 0.25]], dtype=torch.float64),
        "b": torch.tensor([[1.2, 0.9], [1.5, 2 / 3]], dtype=torch.float64),  # the band edges count as in
        "c": torch.tensor([[1.0, 0.0]], dtype=torch.float64),
    }
    rows = layer_rows(spectrum, epsilon=0.5, model="m", shapes={"a": (4, 4)})
    a, b, c = rows
    assert (a.model, a.layer, a.shape, a.groups, a.num_values) == ("m", "a", (4, 4), 1, 4)
    assert (a.min, a.max, a.condition_number, a.fraction_outside_band) == (0.25, 2.0, 8.0, 0.75)
    assert (b.groups, b.shape, b.fraction_outside_band) == (2, None, 0.0)
    assert b.condition_number == pytest.approx(1.5 / (2 / 3))
    assert c.condition_number == math.inf and c.fraction_outside_band == 0.5
    assert layer_rows(spectrum, epsilon=3.0)[0].fraction_outside_band == 0.0  # band [0.25, 4]
    summary = spectrum_summary(spectrum, epsilon=0.5)
    assert summary["spectrum/layers"] == 3 and summary["spectrum/sv_max"] == 2.0
    assert summary["spectrum/condition_max"] == math.inf
    assert summary["spectrum/fraction_outside_band"] == pytest.approx(4 / 10)


def test_depth_thirds_and_by_depth():
    assert [len(v) for v in depth_thirds([str(i) for i in range(22)]).values()] == [7, 8, 7]
    assert depth_thirds(list("abcdefg")) == {
        "lower": ["a", "b"],
        "middle": ["c", "d", "e"],
        "higher": ["f", "g"],
    }
    assert [len(v) for v in depth_thirds(["a"]).values()] == [0, 1, 0]
    spectrum = {n: torch.full((1, 2), float(i)) for i, n in enumerate("abcdef")}
    by_depth = spectrum_by_depth(spectrum)
    assert by_depth["lower"].tolist() == [0, 0, 1, 1] and by_depth["higher"].tolist() == [4, 4, 5, 5]


def test_figure_draws_one_colour_per_model_in_each_panel():
    model, _ = known_model()
    spectra = {"first": model_spectrum(model), "second": model_spectrum(model[:2])}
    fig = spectra_figure(spectra, epsilon=0.5, bins=20)
    assert [ax.get_title().split()[0] for ax in fig.axes] == ["lower", "middle", "higher"]
    for ax in fig.axes:
        steps = [p for p in ax.patches if type(p).__name__ == "StepPatch"]
        assert len({tuple(p.get_edgecolor()) for p in steps}) == len(steps) >= 1
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[1:] == ["first", "second"] and legend[0].startswith("SVB band [0.667, 1.5]")
    fig_log = spectra_figure(spectra, log_x=True, log_y=True)
    assert fig_log.axes[0].get_xscale() == "log" and fig_log.axes[0].get_yscale() == "log"
    with pytest.raises(ValueError, match="spectra is empty"):
        spectra_figure({})


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One CLI run on two small models, shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("cli") / "spectra.png"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["preact_resnet20", "preact_resnet20_svb", "--out", str(out), "--bins", "30"]) == 0
    return out, buffer.getvalue()


@pytest.mark.slow
def test_cli_writes_png_and_csv(cli_run):
    out, printed = cli_run
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC)
    height, width, _ = matplotlib.image.imread(out).shape
    assert width > 1000 and height > 300
    with out.with_suffix(".csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    names = list(model_spectrum(timm.create_model("preact_resnet20")))
    assert [r["layer"] for r in rows if r["model"] == "preact_resnet20"] == names
    assert rows[0]["shape"] == "16x3x3x3" and rows[-1]["shape"] == "10x64"
    # independent reference: the same model (the CLI seeds with --seed 0 before each), float64 numpy SVD
    torch.manual_seed(0)
    model = timm.create_model("preact_resnet20")
    lo, hi = 1 / 1.5, 1.5  # the default band, epsilon 0.5
    for r in (r for r in rows if r["model"] == "preact_resnet20"):
        module = model.get_submodule(r["layer"])
        groups = getattr(module, "groups", 1)
        w = module.weight.detach().double().numpy()
        s = np.linalg.svd(w.reshape(groups, w.shape[0] // groups, -1), compute_uv=False).ravel()
        assert (int(r["groups"]), int(r["num_values"])) == (groups, s.size), r["layer"]
        assert float(r["min"]) == pytest.approx(s.min(), rel=1e-6)
        assert float(r["max"]) == pytest.approx(s.max(), rel=1e-6)
        assert float(r["condition_number"]) == pytest.approx(s.max() / s.min(), rel=1e-5)
        assert float(r["fraction_outside_band"]) == pytest.approx(np.mean((s < lo) | (s > hi)), abs=1e-12)
    assert "preact_resnet20: 22 layers, 746 singular values" in printed
    assert f"wrote {out}" in printed


@pytest.mark.slow
def test_cli_two_models_in_one_plot_and_csv(cli_run):
    out, printed = cli_run
    with out.with_suffix(".csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    svb = [r for r in rows if r["model"] == "preact_resnet20_svb"]
    base = [r for r in rows if r["model"] == "preact_resnet20"]
    assert len(svb) == len(base) == 22
    # orthogonal init: every singular value is 1, so nothing is outside the band
    assert all(float(r["fraction_outside_band"]) == 0 for r in svb)
    assert all(float(r["condition_number"]) == pytest.approx(1, abs=1e-5) for r in svb)
    assert any(float(r["fraction_outside_band"]) > 0 for r in base)
    assert "preact_resnet20_svb: 22 layers" in printed and "0.0% outside the SVB band" in printed


@pytest.mark.slow
def test_checkpoint_inputs_give_the_source_spectrum(tmp_path):
    source = timm.create_model("preact_resnet20", num_classes=7)
    save_for_hf(source, str(tmp_path / "saved"), safe_serialization=True)
    expected = model_spectrum(source)
    file = tmp_path / "saved" / "model.safetensors"
    specs = [f"local-dir:{tmp_path / 'saved'}", str(tmp_path / "saved"), str(file), f"preact_resnet20={file}"]
    for spec in specs:
        got = model_spectrum(load_model(spec))
        assert list(got) == list(expected)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["preact_resnet21"], "unknown model 'preact_resnet21'; did you mean preact_resnet20"),
        (["no_such_model_at_all"], "unknown model 'no_such_model_at_all'"),
        (["missing.safetensors"], "missing.safetensors: no such file"),
        (["preact_resnet20=missing.safetensors"], "no such file"),
        (["=x.safetensors"], "name the architecture before '='"),
        (["preact_resnet20=GARBAGE"], "cannot read checkpoint"),
        (["ORPHAN"], "cannot tell its architecture"),
        pytest.param(["resnet18=CKPT"], "does not fit resnet18", marks=pytest.mark.slow),  # a ResNet-18
        ([UNPUBLISHED, "--pretrained"], f"No pretrained weights for '{UNPUBLISHED}"),
        (["local-dir:NOWHERE"], "cannot load 'local-dir:"),
        (["preact_resnet20", "--labels", "a", "b"], "--labels gives 2 labels for 1 models"),
        (["preact_resnet20", "--epsilon", "0"], "epsilon must be a finite number > 0"),
        (["preact_resnet20", "--out", "NOWHERE/x.png"], "output folder"),
        (["preact_resnet20", "--out", "NOWHERE.txt"], "the suffix must name a plot format"),
        pytest.param(
            ["preact_resnet20", "--device", "cuda"],
            "no CUDA device is available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available"),
        ),
    ],
)
def test_bad_inputs_give_clear_errors(tmp_path, capsys, args, message):
    garbage = tmp_path / "bad.safetensors"
    garbage.write_bytes(b"this is not a safetensors file")
    orphan = tmp_path / "orphan" / "weights.safetensors"
    orphan.parent.mkdir()
    orphan.write_bytes(b"")
    ckpt = tmp_path / "ckpt.pth"
    torch.save(timm.create_model("preact_resnet20").state_dict(), ckpt)
    places = {
        "GARBAGE": str(garbage),
        "ORPHAN": str(orphan),
        "CKPT": str(ckpt),
        "NOWHERE": str(tmp_path / "nowhere"),
        "missing": str(tmp_path / "missing"),
    }
    args = [_substitute(a, places) for a in args]
    out = tmp_path / "s.png"
    with pytest.raises(SystemExit) as exc:
        main([*args, "--out", str(out)] if "--out" not in args else args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err.replace(str(tmp_path) + "/", "")
    assert not out.exists()


def _substitute(arg: str, places: dict[str, str]) -> str:
    for key, value in places.items():
        arg = arg.replace(key, value)
    return arg


@pytest.mark.slow  # a fresh interpreter each, importing torch and timm
@pytest.mark.parametrize("module", ["timm_svb.spectrum", "timm_svb.curves"])
def test_python_dash_m_prints_no_runtime_warning(module):
    """`python -m timm_svb.spectrum` warned that the package had imported the module before runpy ran it
    as __main__; the package imports it on first use now, and `import timm_svb` alone leaves it out."""
    done = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", module, "--help"],
        cwd=REPO,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        },
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr and done.stdout.startswith("usage: timm-svb-")


def test_the_package_names_the_spectrum_functions_on_first_use():
    assert timm_svb.model_spectrum is model_spectrum and timm_svb.plot_spectra is plot_spectra
    assert {"model_spectrum", "plot_spectra"} <= set(dir(timm_svb)) and set(timm_svb.__all__) <= set(
        dir(timm_svb)
    )
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        timm_svb.no_such_name  # noqa: B018


def test_load_model_raises_spectrum_input_error():
    with pytest.raises(SpectrumInputError, match="unknown model"):
        load_model("definitely_not_a_model")


def test_module_entry_point_help(monkeypatch, capsys):
    # `python -m timm_svb.spectrum --help`, run in process (a subprocess spends its time importing torch)
    monkeypatch.setattr(sys, "argv", ["timm_svb.spectrum", "--help"])
    with pytest.raises(SystemExit) as exit_info, warnings.catch_warnings():
        # runpy: this test module has imported it already (a fresh interpreter does not: the test below)
        warnings.simplefilter("ignore", RuntimeWarning)
        runpy.run_module("timm_svb.spectrum", run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: timm-svb-spectrum")
    for option in ("--pretrained", "--out", "--csv", "--epsilon", "--labels", "--log-y", "local-dir:"):
        assert option in out
