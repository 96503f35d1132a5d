"""How fast is ``SVB.apply()``? Measured against the reference approach and against a training step.

Run: ``python benchmarks/svb_speed.py`` (``--help`` for options). On WRN-28-10 (36.5M parameters) it times,
in one process and on the same weights:

1. the reference approach: per layer ``torch.linalg.svd`` in float32, clip, rebuild, copy back;
2. ``SVB(model).apply()``;

for two weight states: timm-style random init (most singular values out of band) and a mid-training state
(orthogonal init plus an SGD-sized perturbation: a few directions out of band). It checks the two results
agree (relative error <= 1e-4 per layer) and then times one training step (forward + backward + SGD,
batch 128, float32) to give ``SVB.apply()`` as a fraction of it. The figures are printed last.
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
from torch import nn

import timm_svb
from timm_svb import SVB


def reference_apply(model: nn.Module, epsilon: float) -> None:
    """The reference approach: a full float32 SVD per layer in a Python loop."""
    lo, hi = 1 / (1 + epsilon), 1 + epsilon
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                mat = m.weight.reshape(m.weight.shape[0], -1)
                u, s, vh = torch.linalg.svd(mat, full_matrices=False)
                m.weight.copy_(((u * s.clamp(lo, hi)) @ vh).reshape(m.weight.shape))


def mid_training_state(model: nn.Module, spread: float, seed: int) -> None:
    """Orthogonal init, then a perturbation of relative size ``spread`` per layer, like an epoch of SGD."""
    generator = torch.Generator().manual_seed(seed)
    timm_svb.orthogonal_init_(model, generator=generator)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                noise = torch.randn(m.weight.shape, generator=generator)
                m.weight.add_(noise * spread * m.weight.norm() / noise.norm())


def timed(fn, model: nn.Module, state: dict[str, torch.Tensor], repeats: int) -> tuple[float, dict]:
    """Median seconds of ``fn(model)`` over ``repeats`` runs, each from ``state``; and the last result."""
    times = []
    for _ in range(repeats):
        model.load_state_dict(state)
        start = time.perf_counter()
        fn(model)
        times.append(time.perf_counter() - start)
    return statistics.median(times), {k: v.clone() for k, v in model.state_dict().items()}


def max_rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    errs = [((a[k] - b[k]).norm() / b[k].norm()).item() for k in a if k.endswith("weight") and a[k].dim() > 1]
    return max(errs)


def train_step_seconds(model: nn.Module, batch_size: int, repeats: int) -> float:
    """Median seconds of one forward + backward + SGD step at ``batch_size``, float32."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    size = model.pretrained_cfg["input_size"]
    x = torch.randn(batch_size, *size)
    y = torch.randint(0, model.num_classes, (batch_size,))
    model.train()
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="wrn28_10", help="timm model name (default: wrn28_10)")
    parser.add_argument("--epsilon", type=float, default=0.5, help="SVB epsilon (default: 0.5)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (default: 3)")
    parser.add_argument("--batch-size", type=int, default=128, help="training-step batch size (default: 128)")
    parser.add_argument("--step-repeats", type=int, default=1, help="timed training steps (default: 1)")
    parser.add_argument("--no-train-step", action="store_true", help="skip the training-step measurement")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10)
    n_params = sum(p.numel() for p in model.parameters())
    svb = SVB(model, epsilon=args.epsilon)
    print(f"model {args.model}: {n_params / 1e6:.2f}M parameters, {len(svb.layers)} conv/linear layers")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    states = {"random init": {k: v.clone() for k, v in model.state_dict().items()}}
    mid_training_state(model, spread=0.3, seed=0)
    states["mid-training"] = {k: v.clone() for k, v in model.state_dict().items()}

    lines = []
    svb_seconds = 0.0
    for label, state in states.items():
        ref_s, ref_out = timed(lambda m: reference_apply(m, args.epsilon), model, state, args.repeats)
        fast_s, fast_out = timed(lambda m: svb.apply(), model, state, args.repeats)
        model.load_state_dict(state)
        clipped = svb.apply().clipped
        err = max_rel_err(fast_out, ref_out)
        svb_seconds = max(svb_seconds, fast_s)
        lines.append(
            f"{label:>12}: reference per-layer SVD {ref_s:.3f} s, SVB.apply() {fast_s:.3f} s, "
            f"speed-up {ref_s / fast_s:.1f}x (target >= 6x), {clipped} singular values clipped, "
            f"max relative difference {err:.1e} (target <= 1e-4)"
        )
    if not args.no_train_step:
        step_s = train_step_seconds(model, args.batch_size, args.step_repeats)
        lines.append(
            f"training step (batch {args.batch_size}, float32) {step_s:.2f} s; slowest SVB.apply() "
            f"{svb_seconds:.3f} s = {svb_seconds / step_s:.3f} of one step (target <= 0.15)"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
