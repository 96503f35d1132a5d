"""GPU check: what does ``SVB.apply()`` cost against one training step, and how exact is it?

Run through ``bash benchmarks/gpu_check.sh`` on a GPU machine, or directly; ``--device cpu --small`` runs the
same code on a CPU with small models, only to check that it runs (its figures mean nothing). For each model
(default: WRN-28-10 and WRN-28-16 at batch 128, ResNet-50 at 224 px and batch 128, the pre-activation
Inception-ResNet-v2 at 299 px and batch 64), on one device, it measures:

1. ``SVB(model, 0.5, bbn_epsilon=1.0).apply()`` on timm's random (He) init: most singular values out of band,
   every layer rebuilt by the solver (the worst case);
2. the same on a mid-training state (orthogonal init plus a relative perturbation ``--spread``: a few
   directions out of band, most layers proved in band by the certificate): what SVB costs between two
   applies, and so what SVB after every step (``every_n_steps=1``, ``--svb-every 1``) costs per step;
3. one training step: bf16 autocast, SGD with Nesterov momentum, channels_last on CUDA;

and prints each apply's median time as a number of training steps, with the largest relative difference per
layer of the result to a float64 reference (per-layer float64 SVD, clip, rebuild; contract <= 1e-4). Rows
are printed as they finish, so a run stopped by the time limit keeps its finished rows; a model that would
start after ``--budget`` seconds is skipped with a note.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
from svb_speed import mid_training_state, snapshot  # benchmarks/svb_speed.py: its folder is on sys.path
from torch import nn

import timm_svb
from timm_svb import SVB, SVBStats

MODELS = "wrn28_10_svb:128,wrn28_16_svb:128,resnet50_svb:128,inception_resnet_v2_preact_svb:64"
SMALL_MODELS = "preact_resnet20_svb:8,convnet20_svb:8"


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


def he_init_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """timm's ResNet init (He normal, fan-out) on every conv/linear layer: most values out of band."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_out = m.weight.shape[0] * m.weight[0, 0].numel()
                noise = torch.randn(m.weight.shape, generator=generator) * (2 / fan_out) ** 0.5
                m.weight.copy_(noise)
    return snapshot(model)


@torch.no_grad()
def float64_reference(svb: SVB) -> dict[str, torch.Tensor]:
    """The conv/linear weights SVB bounds, clipped through a per-layer float64 SVD (not written back)."""
    lo, hi = timm_svb.functional.band(svb.epsilon)
    out = {}
    for layer in svb.layers:
        if layer.kind == "bn":
            continue
        weight = layer.module.weight
        mats = timm_svb.functional.weight_matrices(weight, getattr(layer.module, "groups", 1)).double()
        u, s, vh = torch.linalg.svd(mats, full_matrices=False)
        out[layer.name] = ((u * s.clamp(lo, hi).unsqueeze(-2)) @ vh).reshape(weight.shape)
    return out


def max_relative_difference(svb: SVB, reference: dict[str, torch.Tensor]) -> float:
    """Largest per-layer relative Frobenius difference of the model's weights to ``reference``."""
    diffs = []
    for layer in svb.layers:
        if layer.name in reference:
            ref = reference[layer.name]
            diffs.append(((layer.module.weight.double() - ref).norm() / ref.norm()).item())
    return max(diffs)


class Trainer:
    """bf16-autocast SGD (Nesterov) steps on generated batches already on the device."""

    def __init__(self, model: nn.Module, batch_size: int, device: torch.device, num_batches: int = 2) -> None:
        self.model, self.device = model, device
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


@dataclass
class Row:
    model: str
    batch: int
    layers: int
    bn_layers: int
    he_ms: float
    he_err: float
    he_clipped: int
    mid_ms: float
    mid_err: float
    mid_certified: int
    step_ms: float

    def cells(self) -> list[str]:
        return [
            f"{self.model} (batch {self.batch}, {self.layers} conv/linear + {self.bn_layers} BN layers)",
            f"{self.he_ms:.1f} ms ({self.he_err:.0e}; {self.he_clipped} clipped)",
            f"{self.mid_ms:.1f} ms ({self.mid_err:.0e}; {self.mid_certified} certified)",
            f"{self.step_ms:.1f} ms",
            f"{self.he_ms / self.step_ms:.2f} / {self.mid_ms / self.step_ms:.2f} steps",
        ]


HEADER = [
    "model",
    "SVB.apply, He init (error vs float64; values clipped)",
    "mid-training (error; layers certified)",
    "one bf16 step",
    "ratio He / mid",
]


def timed_apply(
    svb: SVB, state: dict[str, torch.Tensor], device: torch.device, repeats: int
) -> tuple[float, float, SVBStats]:
    """Median milliseconds of ``svb.apply()`` from ``state``, the result's largest relative difference to
    a float64 SVD, and the statistics of one more apply from ``state``."""
    model = svb.model
    model.load_state_dict(state)
    reference = float64_reference(svb)
    seconds = median_seconds(svb.apply, device, repeats, lambda: model.load_state_dict(state))
    error = max_relative_difference(svb, reference)  # the last timed run's result
    model.load_state_dict(state)
    return seconds * 1e3, error, svb.apply()


def measure(name: str, batch: int, device: torch.device, args: argparse.Namespace) -> Row:
    """The row of one model: both applies (timed, checked against float64) and one training step."""
    torch.manual_seed(0)
    model = timm.create_model(name).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    svb = SVB(model, epsilon=args.epsilon, bbn_epsilon=args.bbn_epsilon)
    layers = sum(layer.kind != "bn" for layer in svb.layers)
    bn_layers = len(svb.layers) - layers
    he_state = he_init_state(model, seed=0)
    mid_training_state(model, args.spread, seed=0)
    mid_state = snapshot(model)
    he_ms, he_err, he_stats = timed_apply(svb, he_state, device, args.repeats)
    mid_ms, mid_err, mid_stats = timed_apply(svb, mid_state, device, args.repeats)
    model.train()
    trainer = Trainer(model, batch, device)
    step_ms = median_seconds(trainer.step, device, args.repeats) * 1e3
    return Row(
        name,
        batch,
        layers,
        bn_layers,
        he_ms,
        he_err,
        he_stats.clipped,
        mid_ms,
        mid_err,
        mid_stats.certified,
        step_ms,
    )


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return f"CPU, {torch.get_num_threads()} threads"


def parse_models(text: str) -> list[tuple[str, int]]:
    models = []
    for item in filter(None, text.split(",")):
        name, _, batch = item.partition(":")
        models.append((name, int(batch or 128)))
    return models


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument(
        "--small", action="store_true", help=f"check that the script runs (CPU): {SMALL_MODELS}, 1 repeat"
    )
    parser.add_argument(
        "--models", default=None, help=f"NAME:BATCH,... (default: {MODELS}; --small: {SMALL_MODELS})"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs per figure (default: 3; --small: 1)"
    )
    parser.add_argument("--epsilon", type=float, default=0.5, help="SVB epsilon (default: 0.5)")
    parser.add_argument("--bbn-epsilon", type=float, default=1.0, help="BBN epsilon (default: 1.0)")
    parser.add_argument(
        "--spread",
        type=float,
        default=0.3,
        help="relative perturbation of the mid-training state (default: 0.3)",
    )
    parser.add_argument(
        "--budget", type=float, default=150, help="start no model after this many seconds (default: 150)"
    )
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # gpu_check.sh passes its arguments to both scripts
        print(f"(ignoring arguments meant for recipe_throughput.py: {' '.join(unknown)})")
    args.models = parse_models(args.models or (SMALL_MODELS if args.small else MODELS))
    args.repeats = args.repeats or (1 if args.small else 3)
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    start = time.perf_counter()
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "gpu_check: error: no CUDA device visible to torch (use --device cpu --small on a CPU)"
        )
    torch.backends.cudnn.benchmark = True  # TF32 stays off: the float64 reference is the yardstick

    print(
        f"device: {describe_device(device)}; torch {torch.__version__}, timm {timm.__version__}", flush=True
    )
    print(
        f"SVB epsilon {args.epsilon} + BBN epsilon {args.bbn_epsilon}; median of {args.repeats} runs; one "
        "training step = bf16 autocast, SGD Nesterov" + (", channels_last" if device.type == "cuda" else ""),
        flush=True,
    )
    rows: list[Row] = []
    for name, batch in args.models:
        if time.perf_counter() - start > args.budget:
            print(f"  {name}: skipped, past the {args.budget:.0f} s budget", flush=True)
            continue
        rows.append(measure(name, batch, device, args))
        print("  " + " | ".join(rows[-1].cells()), f"[{time.perf_counter() - start:.0f} s]", flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print()
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")
    print()
    print(
        "ratio: SVB.apply() in training steps (goals: worst case < 1, mid-training < 0.3); the mid-training "
        "ratio is what SVB after every step costs per step. Error: largest relative difference per layer "
        "to a float64 SVD (contract <= 1e-4)."
    )
    if args.small:
        print("note: --small run: a check that the script runs, not a measurement")
    return rows


if __name__ == "__main__":
    main()
