"""The SVB plugin: apply, statistics, schedule, hooks under Accelerate and GradScaler, state, bad input."""

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from test_functional import (
    one_thread,  # noqa: F401  (autouse: this module on one thread too)
    reference_bbn,
    reference_bound,
    rel_err,
    with_spectrum,
)
from torch import nn

import timm_svb.svb
from timm_svb import SVB, NonFiniteWeightError, SVBError

PROMISED_SLACK = 2e-5  # docs/engine.md: float32 weights in band to within this relative slack after SVB


def small_net(seed: int = 0) -> nn.Module:
    """Weights far out of band (scaled Gaussian), grouped/depthwise convs, BN with varied statistics."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, groups=4, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False),
        nn.Conv2d(32, 32, 3, padding=1, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(3.0)
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.1, 4.0)
                m.running_var.uniform_(0.1, 3.0)
    return net


def numpy_svs(module: nn.Module) -> np.ndarray:
    groups = getattr(module, "groups", 1)
    w = module.weight.detach().double().numpy().reshape(groups, module.weight.shape[0] // groups, -1)
    return np.concatenate([np.linalg.svd(m, compute_uv=False) for m in w])


def matrix_layers(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_apply_bounds_every_layer_and_reports():
    net = small_net()
    before = {id(m): numpy_svs(m) for m in matrix_layers(net)}
    bias = net[0].bias.clone()
    stats = SVB(net, epsilon=0.2).apply(per_layer=True)
    expected_clipped = 0
    for m in matrix_layers(net):
        s = numpy_svs(m)
        assert s.min() >= 1 / 1.2 * (1 - PROMISED_SLACK) and s.max() <= 1.2 * (1 + PROMISED_SLACK)
        expected_clipped += int(((before[id(m)] < 1 / 1.2) | (before[id(m)] > 1.2)).sum())
    assert stats.layers == 5 and stats.bn_layers == 0
    assert stats.clipped == expected_clipped
    all_before = np.concatenate(list(before.values()))
    assert stats.sv_min == pytest.approx(all_before.min(), rel=1e-4)
    assert stats.sv_max == pytest.approx(all_before.max(), rel=1e-4)
    assert set(stats.per_layer) == {"0", "3", "6", "7", "10"}
    assert stats.per_layer["10"].sv_max == pytest.approx(before[id(net[10])].max(), rel=1e-4)
    assert torch.equal(net[0].bias, bias)


def test_apply_with_bbn_matches_algorithm_2_and_leaves_beta_and_stats():
    net = small_net()
    gammas = [(bn, bn.weight.detach().clone()) for bn in net.modules() if isinstance(bn, nn.BatchNorm2d)]
    kept = [(bn.bias.clone(), bn.running_mean.clone(), bn.running_var.clone()) for bn, _ in gammas]
    stats = SVB(net, epsilon=0.5, bbn_epsilon=0.2).apply()
    expected_changed = 0
    for (bn, gamma), (beta, mean, var) in zip(gammas, kept, strict=True):
        # Algorithm 2 written out element by element in float64 (tests/test_functional.py)
        expected = reference_bbn(gamma.double().tolist(), var.double().tolist(), bn.eps, 0.2)
        np.testing.assert_allclose(bn.weight.detach().double().numpy(), expected, rtol=2e-7)
        expected_changed += int((np.abs(np.array(expected) - gamma.double().numpy()) > 1e-6).sum())
        assert torch.equal(bn.bias, beta) and torch.equal(bn.running_mean, mean)
        assert torch.equal(bn.running_var, var)
    assert stats.bn_layers == 2 and stats.bn_clipped == expected_changed > 0


def test_in_band_model_is_bitwise_unchanged():
    net = small_net()
    svb = SVB(net, epsilon=0.5)
    svb.apply()
    with torch.no_grad():  # BN gammas in band: gamma / sigma within a factor 1.2 of each other
        for bn in net.modules():
            if isinstance(bn, nn.BatchNorm2d):
                sigma = (bn.running_var + bn.eps).sqrt()
                bn.weight.copy_(sigma * torch.empty_like(sigma).uniform_(1.0, 1.2))
    snapshot = {k: v.clone() for k, v in net.state_dict().items()}
    stats = SVB(net, epsilon=0.5, bbn_epsilon=0.5).apply()
    assert stats.clipped == 0 and stats.bn_clipped == 0
    for k, v in net.state_dict().items():
        assert torch.equal(v, snapshot[k]), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weights_keep_dtype_and_settle(dtype):
    """In band to within the dtype's epsilon (BAND_SLACK), and a second apply changes nothing."""
    net = small_net().to(dtype)
    assert SVB(net, epsilon=0.5).apply().clipped > 0
    for m in matrix_layers(net):
        assert m.weight.dtype == dtype
        groups = getattr(m, "groups", 1)
        w = m.weight.detach().double().numpy().reshape(groups, m.weight.shape[0] // groups, -1)
        s = np.concatenate([np.linalg.svd(mat, compute_uv=False) for mat in w])
        slack = torch.finfo(dtype).eps
        assert s.min() >= 1 / 1.5 * (1 - slack) and s.max() <= 1.5 * (1 + slack)
    snapshot = {k: v.clone() for k, v in net.state_dict().items()}
    assert SVB(net, epsilon=0.5).apply().clipped == 0
    for k, v in net.state_dict().items():
        assert torch.equal(v, snapshot[k]), k


def test_include_exclude_and_layer_types():
    net = small_net()
    classifier = net[10].weight.clone()
    svb = SVB(net, exclude=("10",))
    assert [layer.name for layer in svb.layers] == ["0", "3", "6", "7"]
    svb.apply()
    assert torch.equal(net[10].weight, classifier)
    assert [layer.name for layer in SVB(net, include=("3", "1"), bbn_epsilon=1.0).layers] == ["1", "3"]
    assert [layer.name for layer in SVB(net, layer_types=(nn.Linear,)).layers] == ["10"]
    with pytest.raises(TypeError, match="sequence of glob"):
        SVB(net, exclude="10")


def test_shared_weight_bounded_once():
    lin = nn.Linear(8, 8)
    net = nn.Sequential(lin, nn.ReLU(), lin)
    assert len(SVB(net).layers) == 1


@pytest.mark.parametrize("name", ["epsilon", "bbn_epsilon"])
@pytest.mark.parametrize("value", [0.0, -0.5, float("nan"), float("inf")])
def test_bad_epsilon_names_argument(name, value):
    with pytest.raises(ValueError, match=name):
        SVB(small_net(), **{name: value})


@pytest.mark.parametrize("value", [0, -3, 1.5])
def test_bad_every_n_steps(value):
    with pytest.raises(ValueError, match="every_n_steps"):
        SVB(small_net(), every_n_steps=value)


def test_schedule_rule_arguments_checked():
    with pytest.raises(ValueError, match="steps_per_epoch"):
        SVB(small_net(), every_n_steps=2, skip_last_steps=3)
    with pytest.raises(ValueError, match="num_epochs"):
        SVB(small_net(), steps_per_epoch=10, skip_final_epoch=True)
    with pytest.raises(ValueError, match="bbn_mode"):
        SVB(small_net(), bbn_mode="abs")


def test_model_without_layers_is_a_clear_error():
    with pytest.raises(ValueError, match="no layer to bound"):
        SVB(nn.Sequential(nn.ReLU(), nn.Dropout()))
    with pytest.raises(ValueError, match="no layer to bound.*exclude"):
        SVB(nn.Linear(3, 3), exclude=("*",))


def test_nan_weight_raises_names_layer_and_writes_nothing():
    net = small_net()
    with torch.no_grad():
        net[7].weight[0, 0, 0, 0] = float("nan")
    snapshot = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(NonFiniteWeightError, match="layer.*'?7"):
        SVB(net, bbn_epsilon=1.0).apply()
    for k, v in net.state_dict().items():
        assert torch.equal(v, snapshot[k]) or (torch.isnan(v).any() and k == "7.weight"), k


def test_nan_weight_warn_mode_skips_only_that_layer():
    net = small_net()
    with torch.no_grad():
        net[7].weight[0, 0, 0, 0] = float("inf")
    bad = net[7].weight.clone()
    with pytest.warns(RuntimeWarning, match="7"):
        stats = SVB(net, on_nonfinite="warn").apply()
    assert stats.skipped == ["7"] and stats.layers == 4
    assert torch.equal(net[7].weight, bad)
    assert numpy_svs(net[3]).max() <= 1.5 * (1 + PROMISED_SLACK)


def test_nan_running_var_in_bbn_is_caught():
    net = small_net()
    net[4].running_var[3] = float("nan")
    gamma = net[4].weight.clone()
    with pytest.raises(NonFiniteWeightError, match="4"):
        SVB(net, bbn_epsilon=1.0).apply()
    assert torch.equal(net[4].weight, gamma)


def test_parametrized_weight_is_refused():
    net = nn.Sequential(nn.Linear(4, 4))
    torch.nn.utils.parametrizations.orthogonal(net[0])
    with pytest.raises(ValueError, match="parametrized"):
        SVB(net)


def train_steps(net, svb, optimizer, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        net(torch.randn(4, 3, 8, 8)).square().mean().backward()
        optimizer.step()


def test_hook_fires_every_n_steps_and_handle_removes():
    net = small_net()
    svb = SVB(net, every_n_steps=3)
    calls = []
    svb.apply = lambda per_layer=False: calls.append(svb.step)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    handle = svb.attach(optimizer)
    train_steps(net, svb, optimizer, 10)
    assert calls == [3, 6, 9] and svb.step == 10 and svb.num_applied == 3
    handle.remove()
    train_steps(net, svb, optimizer, 3)
    assert svb.step == 10


def test_hook_really_bounds():
    net = small_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    svb = SVB(net, epsilon=0.5, every_n_steps=2)
    seen = []
    real_apply = svb.apply

    def recording_apply(per_layer=False):
        seen.append({id(m): m.weight.detach().clone() for m in matrix_layers(net)})
        return real_apply(per_layer)

    svb.apply = recording_apply
    svb.attach(optimizer)
    train_steps(net, None, optimizer, 2)
    assert len(seen) == 1 and svb.num_applied == 1  # after step 2, on the weights that step left
    for m in matrix_layers(net):
        groups = getattr(m, "groups", 1)
        before = seen[0][id(m)].double().numpy().reshape(groups, m.weight.shape[0] // groups, -1)
        after = m.weight.detach().double().numpy().reshape(before.shape)
        for got, mat in zip(after, before, strict=True):
            assert rel_err(got, reference_bound(mat, 0.5)) <= 1e-5
            s = np.linalg.svd(got, compute_uv=False)
            assert s.min() >= 1 / 1.5 * (1 - PROMISED_SLACK) and s.max() <= 1.5 * (1 + PROMISED_SLACK)


def test_schedule_skips_last_steps_and_final_epoch():
    svb = SVB(
        small_net(),
        every_n_steps=2,
        steps_per_epoch=10,
        skip_last_steps=3,
        num_epochs=3,
        skip_final_epoch=True,
    )
    fired = [t for t in range(1, 31) if svb.should_apply(t)]
    # epoch 1 = steps 1..10 (8, 9, 10 are its last 3), epoch 2 = 11..20, epoch 3 (final) = 21..30
    assert fired == [2, 4, 6, 12, 14, 16]
    once_an_epoch = SVB(small_net(), steps_per_epoch=391)
    assert once_an_epoch.every_n_steps == 391
    assert [t for t in range(1, 1200) if once_an_epoch.should_apply(t)] == [391, 782, 1173]


def test_attach_without_schedule_is_an_error():
    with pytest.raises(ValueError, match="every_n_steps"):
        SVB(small_net()).attach(torch.optim.SGD(small_net().parameters(), lr=0.1))


def test_grad_scaler_skipped_steps_not_counted():
    net = small_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    svb = SVB(net, every_n_steps=2)
    svb.attach(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    real = 0
    for i in range(6):
        optimizer.zero_grad()
        scaler.scale(net(torch.randn(4, 3, 8, 8)).square().mean()).backward()
        if i in (1, 4):
            net[10].weight.grad[0, 0] = float("inf")  # an overflow: GradScaler skips this step
        else:
            real += 1
        scaler.step(optimizer)
        scaler.update()
    assert svb.step == real == 4
    assert svb.num_applied == 2


def test_accelerate_gradient_accumulation_counts_real_steps():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    net = small_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    net, optimizer = accelerator.prepare(net, optimizer)
    svb = SVB(net, every_n_steps=2)
    svb.attach(optimizer)
    for _ in range(16):
        with accelerator.accumulate(net):
            accelerator.backward(net(torch.randn(4, 3, 8, 8)).square().mean())
            optimizer.step()
            optimizer.zero_grad()
    assert svb.step == 4 and svb.num_applied == 2


def test_state_dict_round_trip_continues_schedule():
    svb = SVB(small_net(), every_n_steps=5)
    svb.step, svb.num_applied = 7, 1
    other = SVB(small_net(), every_n_steps=5)
    other.load_state_dict(svb.state_dict())
    assert other.state_dict() == {"step": 7, "num_applied": 1}
    other.apply = lambda per_layer=False: None
    optimizer = torch.optim.SGD(other.model.parameters(), lr=0.01)
    other.attach(optimizer)
    train_steps(other.model, other, optimizer, 3)
    assert other.step == 10 and other.num_applied == 2


def test_from_model_reads_svb_config():
    net = small_net()
    net.svb_config = {"epsilon": 0.3, "bbn_epsilon": 1.0}
    svb = SVB.from_model(net, bbn_epsilon=0.2, every_n_steps=7)
    assert (svb.epsilon, svb.bbn_epsilon, svb.every_n_steps) == (0.3, 0.2, 7)
    with pytest.raises(ValueError, match="svb_config"):
        SVB.from_model(small_net())


# ------------------------------------------------------------------ routes seen from the plugin


def linear_with(weight: np.ndarray) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
    return layer


def test_fallback_layers_are_bounded_written_and_reported():
    """Layers on every route, each checked against a float64 numpy SVD: far beyond the float32 Gram's limit
    (float64 SVD, float64 Gram), just above and just below it."""
    rng = np.random.default_rng(20)
    conds = {"svd": 1e6, "gram64": 1e3, "above": 10.5, "below": 9.5}
    weights = {k: with_spectrum(24, 72, 0.1, 0.1 * c, rng).astype(np.float32) for k, c in conds.items()}
    net = nn.Sequential(*(linear_with(w) for w in weights.values()))
    stats = SVB(net, epsilon=0.5).apply(per_layer=True)
    lo, hi = 1 / 1.5, 1.5
    for i, (kind, before) in enumerate(weights.items()):
        row = stats.per_layer[str(i)]
        s_true = np.linalg.svd(before.astype(np.float64), compute_uv=False)
        assert row.fallback == (kind != "below"), kind
        assert row.clipped == int(((s_true < lo) | (s_true > hi)).sum()) > 0, kind
        assert row.sv_min == pytest.approx(s_true.min(), rel=1e-4 if kind == "svd" else 5e-6), kind
        assert row.sv_max == pytest.approx(s_true.max(), rel=5e-6), kind
        got = net[i].weight.detach().double().numpy()
        assert rel_err(got, reference_bound(before, 0.5)) <= (1e-6 if row.fallback else 5e-6), kind
    assert stats.clipped == sum(row.clipped for row in stats.per_layer.values())


@pytest.mark.slow
def test_wrn28_10_sized_layers_near_the_limits():
    """640 x 5760 (WRN-28-10's widest conv) at condition numbers 29.5 (float64 Gram) and 2.4 (float32 Gram and
    eigh, the route of weights bounded an epoch ago): within 5e-6 of the float64 reference, in band to within
    5e-6, and a second apply re-clips nothing (condition number 9.9: tests/test_functional.py)."""
    rng = np.random.default_rng(21)
    weights = [
        with_spectrum(640, 5760, *spectrum, rng).astype(np.float32) for spectrum in [(0.1, 2.95), (0.6, 1.44)]
    ]
    net = nn.Sequential(*(linear_with(w) for w in weights))
    stats = SVB(net, epsilon=0.5).apply(per_layer=True)
    assert [stats.per_layer[k].fallback for k in ("0", "1")] == [True, False]
    assert stats.per_layer["0"].clipped > 0 and stats.per_layer["1"].clipped > 0
    for layer, before in zip(net, weights, strict=True):
        got = layer.weight.detach().double().numpy()
        assert rel_err(got, reference_bound(before, 0.5)) <= 5e-6
        s = np.linalg.svd(got, compute_uv=False)
        assert s.min() >= (1 / 1.5) * (1 - 5e-6) and s.max() <= 1.5 * (1 + 5e-6)
    snapshot = [layer.weight.detach().clone() for layer in net]
    assert SVB(net, epsilon=0.5).apply().clipped == 0
    assert all(torch.equal(layer.weight, w) for layer, w in zip(net, snapshot, strict=True))


def test_zero_tiny_and_huge_weights():
    rng = np.random.default_rng(22)
    spectrum = with_spectrum(12, 36, 0.2, 3.0, rng)
    net = nn.Sequential(
        linear_with(np.zeros((12, 36), np.float32)),
        linear_with((spectrum * 1e-24).astype(np.float32)),
        linear_with((spectrum * 1e20).astype(np.float32)),
    )
    zero = net[0].weight.clone()
    with pytest.warns(RuntimeWarning, match="left layer.*0 as they are"):
        stats = SVB(net, epsilon=0.5).apply(per_layer=True)
    assert stats.degenerate == ["0"] and stats.skipped == []
    assert stats.per_layer["0"].degenerate and stats.per_layer["0"].clipped == 0
    assert torch.equal(net[0].weight, zero)
    assert stats.clipped == stats.per_layer["1"].clipped + stats.per_layer["2"].clipped
    for i, magnitude in [(1, 1e-24), (2, 1e20)]:
        before = (spectrum * magnitude).astype(np.float32)
        s_true = np.linalg.svd(before.astype(np.float64), compute_uv=False)
        assert stats.per_layer[str(i)].clipped == int(((s_true < 1 / 1.5) | (s_true > 1.5)).sum()) == 12
        assert stats.per_layer[str(i)].sv_min == pytest.approx(s_true.min(), rel=1e-5)
        got = net[i].weight.detach().double().numpy()
        assert np.isfinite(got).all()
        assert rel_err(got, reference_bound(before, 0.5)) <= 1e-5
    assert stats.sv_min == 0.0 and stats.sv_max == pytest.approx(3.0e20, rel=1e-5)
    # a second apply: the zero layer is still left alone, the others are in band
    with pytest.warns(RuntimeWarning, match="as they are"):
        assert SVB(net, epsilon=0.5).apply().clipped == 0


def test_warn_mode_skips_only_the_nonfinite_layer_among_extreme_ones():
    rng = np.random.default_rng(23)
    spectrum = with_spectrum(12, 36, 0.2, 3.0, rng)
    net = nn.Sequential(
        linear_with((spectrum * 1e20).astype(np.float32)),
        linear_with((spectrum * 1e-24).astype(np.float32)),
        linear_with(spectrum.astype(np.float32)),
    )
    with torch.no_grad():
        net[2].weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN/Inf: 2"):
        stats = SVB(net, epsilon=0.5, on_nonfinite="warn").apply()
    assert stats.skipped == ["2"] and stats.layers == 2 and stats.clipped == 24
    for layer in net[:2]:
        s = np.linalg.svd(layer.weight.detach().double().numpy(), compute_uv=False)
        assert s.min() >= (1 / 1.5) * (1 - PROMISED_SLACK) and s.max() <= 1.5 * (1 + PROMISED_SLACK)


@pytest.mark.parametrize(
    "gammas",
    [[0.0] * 16, [1.0, -3.0] * 8],
    ids=["all zero (timm zero_init_last)", "mixed signs, mean < 0"],
)
def test_bbn_leaves_layers_whose_gammas_average_to_zero_or_below(gammas):
    net = small_net()
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor(gammas))
    before = net[1].weight.clone()
    other = net[4].weight.clone()
    with pytest.warns(RuntimeWarning, match="left layer.*'?1'?.*<= 0"):
        stats = SVB(net, epsilon=0.5, bbn_epsilon=0.2).apply(per_layer=True)
    assert torch.equal(net[1].weight, before)  # no NaN, no flipped signs
    assert stats.degenerate == ["1"] and stats.bn_layers == 2
    row = stats.per_layer["1"]
    assert row.degenerate and row.clipped == 0 and math.isnan(row.sv_min) and math.isnan(row.sv_max)
    assert stats.bn_clipped == stats.per_layer["4"].clipped > 0  # the other BN layer is bounded
    assert not torch.equal(net[4].weight, other)


def test_refused_at_construction():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False))
    with pytest.raises(ValueError, match="'1'.*running statistics.*bbn_mode='rel'"):
        SVB(net, bbn_epsilon=1.0)
    SVB(net, bbn_epsilon=1.0, bbn_mode="rel").apply()  # the reference code's mode needs no statistics
    SVB(net)  # without BBN the BN layer is not touched
    with pytest.raises(ValueError, match="'0'.*lazy module.*forward pass"):
        SVB(nn.Sequential(nn.LazyConv2d(8, 3), nn.ReLU()))
    lazy = nn.Sequential(nn.LazyConv2d(8, 3), nn.ReLU())
    lazy(torch.randn(1, 3, 8, 8))
    assert [layer.name for layer in SVB(lazy).layers] == ["0"]
    with pytest.raises(ValueError, match="'0'.*meta device"):
        SVB(nn.Sequential(nn.Linear(4, 4, device="meta")))


def test_one_process_failure_is_an_svb_error_and_writes_nothing(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("solver exploded")

    net = small_net()
    snapshot = {k: v.clone() for k, v in net.state_dict().items()}
    monkeypatch.setattr(timm_svb.svb, "_solve", broken)
    with pytest.raises(SVBError, match=r"failed in layer\(s\) '0'.*RuntimeError: solver exploded.*Nothing"):
        SVB(net, bbn_epsilon=1.0).apply()
    for k, v in net.state_dict().items():
        assert torch.equal(v, snapshot[k]), k


# ------------------------------------------------------------------ memory formats


def test_channels_last_and_non_contiguous_weights():
    reference, net = small_net(), small_net()
    net = net.to(memory_format=torch.channels_last)
    net[10].weight = nn.Parameter(net[10].weight.detach().T.contiguous().T)  # a transposed layout
    for model in (reference, net):
        SVB(model, epsilon=0.5, bbn_epsilon=0.2).apply()
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert net[7].weight.is_contiguous(memory_format=torch.channels_last)
    assert net[10].weight.stride() == (1, 10)
    for (k, a), b in zip(net.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    timm_svb.orthogonal_init_(net)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------ step counting


def test_fused_optimizer_with_grad_scaler_counts_real_steps():
    """GradScaler calls step() on fused optimizers even when it skips (inf grads): only 4 of 6 are real."""
    net = small_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, fused=True)
    svb = SVB(net, every_n_steps=2)
    calls = []
    real_apply = svb.apply
    svb.apply = lambda per_layer=False: calls.append(svb.step) or real_apply()
    svb.attach(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    for i in range(6):
        optimizer.zero_grad()
        scaler.scale(net(torch.randn(4, 3, 8, 8)).square().mean()).backward()
        if i in (1, 4):
            net[10].weight.grad[0, 0] = float("inf")
        before = net[10].weight.clone()
        scaler.step(optimizer)
        scaler.update()
        assert torch.equal(net[10].weight, before) == (i in (1, 4))  # the skipped steps changed nothing
    assert svb.step == 4 and calls == [2, 4] and svb.num_applied == 2
    assert svb.state_dict() == {"step": 4, "num_applied": 2}


def test_attach_twice_is_refused():
    net = small_net()
    svb = SVB(net, every_n_steps=2)
    first = torch.optim.SGD(net.parameters(), lr=0.01)
    handle = svb.attach(first)
    for optimizer in (first, torch.optim.SGD(net.parameters(), lr=0.01)):
        with pytest.raises(RuntimeError, match="already attached.*handle.remove"):
            svb.attach(optimizer)
    handle.remove()
    svb.attach(first)
    train_steps(net, svb, first, 4)
    assert svb.step == 4 and svb.num_applied == 2


# ------------------------------------------------------------------ wrapped models


@pytest.mark.slow
def test_compiled_model_names_are_unwrapped():
    net = small_net()
    net[3] = torch.compile(net[3], backend="eager")  # a compiled submodule
    compiled = torch.compile(net, backend="eager")
    svb = SVB(compiled, exclude=("10", "0"), bbn_epsilon=1.0)
    assert [layer.name for layer in svb.layers] == ["1", "3", "4", "6", "7"]
    assert [layer.name for layer in SVB(compiled, include=("3",)).layers] == ["3"]
    stats = svb.apply(per_layer=True)
    assert set(stats.per_layer) == {"1", "3", "4", "6", "7"}
    assert numpy_svs(net[3]).max() <= 1.5 * (1 + PROMISED_SLACK)
    compiled(torch.randn(2, 3, 8, 8))
    net.svb_config = {"epsilon": 0.3}
    assert SVB.from_model(compiled).epsilon == 0.3


def test_ddp_world_one_names_are_unwrapped(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(small_net())
        svb = SVB(model, exclude=("10", "0"))
        assert [layer.name for layer in svb.layers] == ["3", "6", "7"]
        assert [layer.name for layer in SVB(model, include=("7",)).layers] == ["7"]
        stats = svb.apply(per_layer=True)
        assert set(stats.per_layer) == {"3", "6", "7"} and stats.clipped > 0
        model.module.svb_config = {"epsilon": 0.3}
        assert SVB.from_model(model).epsilon == 0.3
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ two processes


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """tests/workers/dist_svb_worker.py under torchrun, 2 CPU processes (gloo); each rank's results."""
    out = tmp_path_factory.mktemp("dist")
    tests = Path(__file__).parent
    worker = tests / "workers" / "dist_svb_worker.py"
    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    # the worker imports test_svb's model
    pythonpath = os.pathsep.join(p for p in (str(tests), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    # the worker's process group waits 600 s in a collective: a rank left waiting fails this timeout
    subprocess.run(
        [*cmd, "--standalone", "--nproc_per_node=2", str(worker), str(out)], check=True, env=env, timeout=240
    )
    return [torch.load(out / f"rank{rank}.pt") for rank in (0, 1)]


def solved_by(rank_result: dict, net: nn.Module) -> set[str]:
    """The layers whose matrices (or gammas) this rank handed to the engine, matched by value."""
    state = rank_result["before_last"]
    names = set()
    for name, module in net.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            groups = getattr(module, "groups", 1)
            w = state[f"{name}.weight"]
            mats = w.reshape(groups, w.shape[0] // groups, -1)
            mats = mats.mT if mats.shape[1] > mats.shape[2] else mats  # the engine's orientation
            for parts in rank_result["solved"]["_certify_parts"]:
                if any(torch.equal(part, mats) for part in parts):
                    names.add(name)
        elif isinstance(module, nn.BatchNorm2d):
            gammas = rank_result["solved"]["bbn_gamma"]
            if any(torch.equal(g, state[f"{name}.weight"]) for stack in gammas for g in stack):
                names.add(name)
    return names


@pytest.mark.slow
def test_two_process_ranks_share_the_work_and_end_identical(two_process_run):
    rank0, rank1 = two_process_run
    net = small_net()
    owned = [solved_by(r, net) for r in (rank0, rank1)]
    everything = {n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))}
    assert owned[0] and owned[1] and not owned[0] & owned[1]
    assert owned[0] | owned[1] == everything
    for k, v in rank0["state"].items():
        assert torch.equal(v, rank1["state"][k]), k
    assert rank0["num_applied"] == rank1["num_applied"] == 3
    # the last apply changed layers; statistics are reduced over ranks, so both report the same
    assert rank0["clipped"] == rank1["clipped"] > 0
    # conv/linear weights: the same as one process bounding everything (BN gammas depend on each rank's
    # own running variance, which DDP does not synchronise after the forward pass)
    single = small_net()
    single.load_state_dict(rank0["before_last"])
    SVB(single, epsilon=0.5).apply()
    for k, v in single.named_parameters():
        if k.endswith("weight") and v.dim() > 1:
            torch.testing.assert_close(v.detach(), rank0["state"][k], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_two_process_ddp_names_are_unwrapped(two_process_run):
    for result in two_process_run:
        assert result["names_exclude"] == ["3", "6", "7"]
        assert result["names_include"] == ["3", "7"]


@pytest.mark.slow
def test_two_process_one_rank_failing_raises_on_every_rank(two_process_run):
    """Rank 1's solver raises; both ranks raise the same SVBError (instead of rank 0 waiting 600 s)."""
    messages = [result["failure"] for result in two_process_run]
    assert messages[0] is not None and messages[0] == messages[1]
    assert "on rank 1 in layer(s)" in messages[0] and "RuntimeError: injected solver failure" in messages[0]
    assert "every rank raises" in messages[0]


@pytest.mark.slow
def test_two_process_fsdp2_is_refused_naming_ddp(two_process_run):
    for result in two_process_run:
        assert result["fsdp2"] is not None and "DistributedDataParallel" in result["fsdp2"]


def test_bbn_bounds_sync_batchnorm_layers_as_batchnorm():
    """A model converted for ``--sync-bn`` (``nn.SyncBatchNorm``) gets the BBN of its BatchNorm2d form."""
    plain, synced = small_net(), nn.SyncBatchNorm.convert_sync_batchnorm(small_net())
    kinds = {type(m) for m in synced.modules()}
    assert nn.SyncBatchNorm in kinds and nn.BatchNorm2d not in kinds
    expected, got = SVB(plain, bbn_epsilon=0.2).apply(), SVB(synced, bbn_epsilon=0.2).apply()
    assert got.bn_layers == expected.bn_layers == 2 and got.bn_clipped == expected.bn_clipped > 0
    for a, b in zip(plain.state_dict().values(), synced.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def _subgroup_worker(rank: int, store: str, out: str) -> None:
    """Rank of a 3-process gloo world; ranks 1 and 2 bound a net over the subgroup {1, 2} (group ranks 0 and
    1, global ranks 1 and 2) and save the result."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=3)
    group = dist.new_group([1, 2])  # every rank takes part in creating it
    if rank in (1, 2):
        net = small_net()
        SVB(net, epsilon=0.5, bbn_epsilon=1.0, process_group=group).apply()
        torch.save(net.state_dict(), f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_subgroup_with_ranks_not_from_zero_broadcasts_from_each_layers_owner(tmp_path):
    """Over a process group of global ranks 1 and 2, each layer's bounded weights come from the rank that
    bounded it: both ranks end with what one process computes."""
    torch.multiprocessing.spawn(
        _subgroup_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=3, join=True
    )
    expected = small_net()
    SVB(expected, epsilon=0.5, bbn_epsilon=1.0).apply()
    for rank in (1, 2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, value in expected.state_dict().items():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")
