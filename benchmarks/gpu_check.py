"""GPU check: is ``SVB.apply()`` cheaper than one training step, and what does SVB cost in images/s?

Run through ``bash benchmarks/gpu_check.sh`` on a GPU machine, or directly; ``--device cpu --small`` runs the
same code on a CPU with a small model, only to check that it runs (its figures mean nothing). It prints a
table of, on the same weights and device:

1. ``SVB(model).apply()`` on a mid-training state (orthogonal init plus a relative perturbation ``--spread``);
2. the reference approach: per-layer ``torch.linalg.svd`` in float32, clip, rebuild, copy back;
3. one training step (bf16 autocast, SGD with Nesterov momentum, batch 128, channels-last on CUDA);
4. images/s of a hand-written training loop over generated data, without SVB and with ``SVB.attach``
   applying once per epoch (``--steps-per-epoch`` steps, 391 = CIFAR's 50k images at batch 128).

The recipe (``recipes/train.py``) is not timed: row 4 is a hand-written loop of the same model, step and
schedule, with the data already on the device (no data loading), and the output says so.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn

import timm_svb
from timm_svb import SVB

ROOT = Path(__file__).resolve().parent.parent


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    fn: Callable[[], object], device: torch.device, repeats: int, setup: Callable[[], None] | None = None
) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (after one warm-up), synchronised on CUDA."""
    times = []
    for i in range(repeats + 1):
        if setup is not None:
            setup()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def mid_training_state(model: nn.Module, spread: float, seed: int) -> dict[str, torch.Tensor]:
    """Orthogonal init plus a relative perturbation ``spread`` per layer: a few directions out of band."""
    generator = torch.Generator().manual_seed(seed)
    timm_svb.orthogonal_init_(model, generator=generator)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                noise = torch.randn(m.weight.shape, generator=generator).to(m.weight)
                m.weight.add_(noise * spread * m.weight.norm() / noise.norm())
    return {k: v.clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def reference_apply(svb: SVB) -> None:
    """Per-layer float32 ``torch.linalg.svd``, clip, rebuild and copy back, over the layers SVB bounds."""
    lo, hi = 1 / (1 + svb.epsilon), 1 + svb.epsilon
    for layer in svb.layers:
        weight = layer.module.weight
        mats = timm_svb.functional.weight_matrices(weight, getattr(layer.module, "groups", 1)).float()
        u, s, vh = torch.linalg.svd(mats, full_matrices=False)
        weight.copy_(((u * s.clamp(lo, hi).unsqueeze(-2)) @ vh).reshape(weight.shape).to(weight.dtype))


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    diffs = [
        ((a[k].double() - b[k].double()).norm() / b[k].double().norm()).item()
        for k in a
        if k.endswith("weight") and a[k].dim() > 1
    ]
    return max(diffs)


class Trainer:
    """bf16-autocast SGD steps on generated batches already on the device."""

    def __init__(self, model: nn.Module, batch_size: int, device: torch.device, num_batches: int = 4) -> None:
        self.model, self.device, self.batch_size = model, device, batch_size
        self.optimizer = torch.optim.SGD(
            model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4
        )
        size = model.pretrained_cfg["input_size"]
        fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        self.batches = [
            (
                torch.randn(batch_size, *size, device=device).contiguous(memory_format=fmt),
                torch.randint(0, model.num_classes, (batch_size,), device=device),
            )
            for _ in range(num_batches)
        ]
        self.i = 0

    def step(self) -> None:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        self.optimizer.step()

    def images_per_second(self, steps: int, after_warmup: Callable[[], object] | None = None) -> float:
        """Images/s over ``steps`` timed steps; ``after_warmup`` runs between the warm-up and the timing."""
        for _ in range(3):  # warm-up: kernels, allocator
            self.step()
        if after_warmup is not None:
            after_warmup()
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        synchronize(self.device)
        return steps * self.batch_size / (time.perf_counter() - start)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return f"CPU, {torch.get_num_threads()} threads"


def recipe_note() -> str:
    recipe = ROOT / "recipes" / "train.py"
    where = "present" if recipe.is_file() else "not present"
    return (
        f"recipes/train.py is {where}; the images/s rows time a hand-written loop (same model, bf16 step and "
        "SVB.attach schedule, generated data on the device, no data loading), not the recipe"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument(
        "--small",
        action="store_true",
        help="check that the script runs (CPU): preact_resnet20_svb, batch 8, 1 repeat, 4-step epochs",
    )
    parser.add_argument(
        "--model", default=None, help="timm model (default: wrn28_10_svb; --small: preact_resnet20_svb)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (default: 128; --small: 8)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs per row (default: 5; --small: 1)"
    )
    parser.add_argument(
        "--steps-per-epoch",
        type=int,
        default=None,
        help="SVB once every this many steps (default: 391; --small: 4)",
    )
    parser.add_argument("--epsilon", type=float, default=0.5, help="SVB epsilon (default: 0.5)")
    parser.add_argument(
        "--spread",
        type=float,
        default=None,
        help="relative perturbation of the orthogonal weights (default: 0.3; --small: 0.6)",
    )
    args = parser.parse_args(argv)
    small = args.small
    args.model = args.model or ("preact_resnet20_svb" if small else "wrn28_10_svb")
    args.batch_size = args.batch_size or (8 if small else 128)
    args.repeats = args.repeats or (1 if small else 5)
    args.steps_per_epoch = args.steps_per_epoch or (4 if small else 391)
    args.spread = args.spread if args.spread is not None else (0.6 if small else 0.3)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device visible to torch (use --device cpu --small to test on CPU)")
        return 2
    torch.backends.cudnn.benchmark = True  # TF32 stays off: the reference SVD's rebuild must be exact

    print(f"device: {describe_device(device)}; torch {torch.__version__}, timm {timm.__version__}")
    model = timm.create_model(args.model).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    svb = SVB(model, epsilon=args.epsilon)
    print(f"model: {args.model}, {n_params / 1e6:.1f}M parameters, {len(svb.layers)} conv/linear layers")
    state = mid_training_state(model, spread=args.spread, seed=0)

    def restore() -> None:
        model.load_state_dict(state)

    rows: list[tuple[str, str, str]] = []

    def record(name: str, value: str, note: str) -> None:
        """Keep a table row and print it now, so a run stopped by the time limit still shows its rows."""
        rows.append((name, value, note))
        print(f"  {name}: {value} ({note})", flush=True)

    t_svb = median_seconds(lambda: svb.apply(), device, args.repeats, restore)
    restore()
    stats = svb.apply()
    svb_out = {k: v.clone() for k, v in model.state_dict().items()}
    record(
        "SVB.apply() (mid-training state)",
        f"{t_svb * 1e3:.1f} ms",
        f"{stats.clipped} singular values clipped",
    )
    t_ref = median_seconds(lambda: reference_apply(svb), device, args.repeats, restore)
    ref_out = {k: v.clone() for k, v in model.state_dict().items()}
    diff = max_relative_difference(svb_out, ref_out)
    record(
        "per-layer torch.linalg.svd + clip",
        f"{t_ref * 1e3:.1f} ms",
        f"SVB.apply() is {t_ref / t_svb:.1f}x faster; max relative difference {diff:.1e}",
    )

    restore()
    trainer = Trainer(model, args.batch_size, device)
    model.train()
    t_step = median_seconds(trainer.step, device, args.repeats)
    verdict = "goal met" if t_svb < t_step else "goal NOT met"
    record(
        f"one bf16 training step, batch {args.batch_size}",
        f"{t_step * 1e3:.1f} ms",
        f"SVB.apply() = {t_svb / t_step:.2f} steps (goal < 1: {verdict})",
    )

    steps = args.steps_per_epoch
    plain = trainer.images_per_second(steps)
    svb_epoch = SVB(model, epsilon=args.epsilon, every_n_steps=steps)
    handles = []
    # attached after the warm-up, so the timed steps hold exactly one apply (after the last step)
    svb_ips = trainer.images_per_second(steps, lambda: handles.append(svb_epoch.attach(trainer.optimizer)))
    handles[0].remove()
    applied = svb_epoch.num_applied
    record(f"images/s without SVB ({steps} steps)", f"{plain:.0f}", "hand-written loop, generated data")
    record(
        f"images/s with SVB.attach, once per {steps} steps",
        f"{svb_ips:.0f}",
        f"{100 * (svb_ips / plain - 1):+.1f}% vs without; SVB applied {applied}x in the timed steps",
    )

    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print()
    print(f"| {'measurement':<{widths[0]}} | {'value':>{widths[1]}} | note")
    print(f"|{'-' * (widths[0] + 2)}|{'-' * (widths[1] + 2)}|------")
    for name, value, note in rows:
        print(f"| {name:<{widths[0]}} | {value:>{widths[1]}} | {note}")
    print()
    print(f"note: {recipe_note()}")
    if args.small:
        print("note: --small run: a check that the script runs, not a measurement")
    return 0


if __name__ == "__main__":
    sys.exit(main())
