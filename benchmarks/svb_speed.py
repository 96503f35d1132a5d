"""How fast is ``SVB.apply()``? Measured against the reference approach and against a training step.

Run: ``python benchmarks/svb_speed.py`` (``--help`` for options). On WRN-28-10 (36.5M parameters) it times,
in one process, on the same weights, the runs of each repeat interleaved (so a busy machine slows all alike;
medians are printed):

1. the reference approach: per layer ``torch.linalg.svd`` in float32, clip, rebuild, copy back;
2. ``SVB(model).apply()`` (the certificate first, the solver only for layers it cannot prove in band);
3. ``SVB(model, certify=False).apply()`` (the solver for every layer: what the certificate saves);

for two weight states: timm's random init (He: most singular values out of band, every layer rebuilt; the
worst case) and a mid-training state (orthogonal init plus an SGD-sized perturbation: a few directions out
of band). It checks each result against the float32 reference and against a float64 one (per-layer float64
SVD; relative Frobenius error per layer, the largest printed; contract <= 1e-4), then times one training
step (forward + backward + SGD, batch 128, float32) to give ``SVB.apply()`` as a fraction of it.

``--every-step N`` also trains N steps (SGD, lr 0.1, Nesterov, random data at ``--every-step-batch``) from
orthogonal init with ``SVB.attach`` bounding after every step (``every_n_steps=1``, the recipe's
``--svb-every 1``) and prints the median time of those applies against the median training step of the
same run, and against the batch-128 step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch
from torch import nn

import timm_svb
from timm_svb import SVB


def reference_apply(model: nn.Module, epsilon: float, dtype: torch.dtype = torch.float32) -> None:
    """The reference approach: a full SVD per layer (float32 by default) in a Python loop."""
    lo, hi = 1 / (1 + epsilon), 1 + epsilon
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                mat = m.weight.reshape(m.weight.shape[0], -1).to(dtype)
                u, s, vh = torch.linalg.svd(mat, full_matrices=False)
                m.weight.copy_(((u * s.clamp(lo, hi)) @ vh).reshape(m.weight.shape))


def mid_training_state(model: nn.Module, spread: float, seed: int) -> None:
    """Orthogonal init, then a perturbation of relative size ``spread`` per layer, like an epoch of SGD."""
    generator = torch.Generator().manual_seed(seed)
    timm_svb.orthogonal_init_(model, generator=generator)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                noise = torch.randn(m.weight.shape, generator=generator).to(m.weight)
                m.weight.add_(noise * spread * m.weight.norm() / noise.norm())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def interleaved(
    runs: dict[str, Callable[[], object]], model: nn.Module, state: dict, repeats: int
) -> tuple[dict[str, float], dict[str, dict]]:
    """Median seconds of each run over ``repeats`` rounds (one of each per round, each from ``state``),
    and each run's resulting weights."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    results = {}
    for run in runs.values():  # warm-up: first calls allocate and load kernels
        model.load_state_dict(state)
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            model.load_state_dict(state)
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
            results[name] = snapshot(model)
    return {name: statistics.median(t) for name, t in times.items()}, results


def max_rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    errs = [
        ((a[k].double() - b[k].double()).norm() / b[k].double().norm()).item()
        for k in a
        if k.endswith("weight") and a[k].dim() > 1
    ]
    return max(errs)


def make_step(
    model: nn.Module, batch_size: int, lr: float
) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    """One forward + backward + SGD (Nesterov) step on a random batch, float32; and its optimizer."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    size = model.pretrained_cfg["input_size"]
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        x = torch.randn(batch_size, *size, generator=generator)
        y = torch.randint(0, model.num_classes, (batch_size,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step, optimizer


def train_step_seconds(model: nn.Module, batch_size: int, repeats: int) -> float:
    """Median seconds of one forward + backward + SGD step at ``batch_size``, after one warm-up step."""
    step, _ = make_step(model, batch_size, lr=0.01)
    model.train()
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        step()
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def every_step(model: nn.Module, epsilon: float, steps: int, batch_size: int) -> dict[str, float]:
    """Train ``steps`` steps from orthogonal init with SVB after every step; apply and step timings."""
    timm_svb.orthogonal_init_(model, generator=torch.Generator().manual_seed(1))
    model.train()
    step, optimizer = make_step(model, batch_size, lr=0.1)
    svb = SVB(model, epsilon=epsilon, every_n_steps=1)
    applies: list[float] = []
    clipped: list[int] = []
    certified: list[int] = []
    real_apply = svb.apply

    def timed_apply(per_layer: bool = False):
        start = time.perf_counter()
        stats = real_apply(per_layer)
        applies.append(time.perf_counter() - start)
        clipped.append(stats.clipped)
        certified.append(stats.certified)
        return stats

    svb.apply = timed_apply
    svb.attach(optimizer)
    totals = []
    for _ in range(steps):
        start = time.perf_counter()
        step()  # the hook's apply runs inside optimizer.step()
        totals.append(time.perf_counter() - start)
    step_only = [t - a for t, a in zip(totals, applies, strict=True)]
    return {
        "apply": statistics.median(applies[1:]),  # the first apply sees weights no SVB has bounded yet
        "first_apply": applies[0],
        "step": statistics.median(step_only),
        "clipped": statistics.median(clipped[1:]),
        "certified": statistics.median(certified[1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="wrn28_10", help="timm model name (default: wrn28_10)")
    parser.add_argument("--epsilon", type=float, default=0.5, help="SVB epsilon (default: 0.5)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per state (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--batch-size", type=int, default=128, help="training-step batch size (default: 128)")
    parser.add_argument("--step-repeats", type=int, default=1, help="timed training steps (default: 1)")
    parser.add_argument("--no-train-step", action="store_true", help="skip the training-step measurement")
    parser.add_argument("--states", default="random,mid", help="weight states to time (default: random,mid)")
    parser.add_argument(
        "--every-step", type=int, default=0, help="also train this many steps with SVB after every step"
    )
    parser.add_argument(
        "--every-step-batch", type=int, default=16, help="batch size of those steps (default: 16)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10)
    n_params = sum(p.numel() for p in model.parameters())
    svb = SVB(model, epsilon=args.epsilon)
    solver_only = SVB(model, epsilon=args.epsilon, certify=False)
    print(f"model {args.model}: {n_params / 1e6:.2f}M parameters, {len(svb.layers)} conv/linear layers")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    states = {"random init": snapshot(model)}
    mid_training_state(model, spread=0.3, seed=0)
    states["mid-training"] = snapshot(model)
    states = {k: v for k, v in states.items() if any(k.startswith(s) for s in args.states.split(","))}

    lines = []
    svb_seconds = 0.0
    for label, state in states.items():
        model.load_state_dict(state)
        reference_apply(model, args.epsilon, torch.float64)
        exact = snapshot(model)
        runs = {
            "reference": lambda: reference_apply(model, args.epsilon),
            "svb": lambda: svb.apply(),
            "solver only": lambda: solver_only.apply(),
        }
        seconds, results = interleaved(runs, model, state, args.repeats)
        model.load_state_dict(state)
        stats = svb.apply()
        svb_seconds = max(svb_seconds, seconds["svb"])
        lines.append(
            f"{label:>12}: reference per-layer float32 SVD {seconds['reference']:.3f} s, SVB.apply() "
            f"{seconds['svb']:.3f} s, speed-up {seconds['reference'] / seconds['svb']:.1f}x "
            f"(solver for every layer, certify=False: {seconds['solver only']:.3f} s, "
            f"{seconds['reference'] / seconds['solver only']:.1f}x); {stats.certified} of {stats.layers} "
            f"layers certified, {stats.clipped} singular values clipped; max relative difference "
            f"{max_rel_err(results['svb'], results['reference']):.1e} to the float32 reference, "
            f"{max_rel_err(results['svb'], exact):.1e} to a float64 SVD (contract <= 1e-4; the float32 "
            f"reference itself {max_rel_err(results['reference'], exact):.1e})"
        )
        print(lines[-1], flush=True)
    if not args.no_train_step:
        step_s = train_step_seconds(model, args.batch_size, args.step_repeats)
        lines.append(
            f"training step (batch {args.batch_size}, float32) {step_s:.2f} s; slowest SVB.apply() "
            f"{svb_seconds:.3f} s = {svb_seconds / step_s:.3f} of one step"
        )
        print(lines[-1], flush=True)
    if args.every_step:
        run = every_step(model, args.epsilon, args.every_step, args.every_step_batch)
        line = (
            f"SVB after every step ({args.every_step} steps at batch {args.every_step_batch}, lr 0.1, from "
            f"orthogonal init): median apply {run['apply']:.3f} s (first {run['first_apply']:.3f} s; median "
            f"{run['certified']:.0f} of {len(svb.layers)} layers certified, {run['clipped']:.0f} values "
            f"clipped), median step without it {run['step']:.2f} s: {run['apply'] / run['step']:.3f} of a "
            f"batch-{args.every_step_batch} step"
        )
        if not args.no_train_step:
            line += f", {run['apply'] / step_s:.3f} of a batch-{args.batch_size} step"
        lines.append(line)
        print(lines[-1], flush=True)
    print("\n".join(["", *lines]))


if __name__ == "__main__":
    main()
