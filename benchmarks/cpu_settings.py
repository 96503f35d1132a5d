"""Which CPU settings train the CIFAR models fastest: float32 vs bf16 autocast, channels_last, torch.compile,
batch size. Images/s of the bare training step (forward, cross-entropy, backward, Nesterov SGD step on one
batch in memory) for every combination, in rounds (each round visits every setting once, so the load of a
shared machine hits all alike); the median over rounds is printed, with each setting's ratio to float32 NCHW
eager at the first batch size.

    python benchmarks/cpu_settings.py                                   # preact_resnet20 and convnet20
    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/cpu_settings.py    # one core, as the studies run
    python benchmarks/cpu_settings.py --models convnet20 --batch-sizes 128 --rounds 1 --seconds 1  # smoke

The first lines say what the CPU can do natively (torch's CPU capability, oneDNN's bf16 support): bf16
autocast is only fast where the CPU has bf16 instructions (AVX-512 BF16 or AMX); elsewhere oneDNN emulates it.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import timm_svb  # noqa: F401  (registers the zoo)


def make_step(model_name: str, batch_size: int, bf16: bool, channels_last: bool, compiled: bool):  # noqa: ANN201
    """A closure that takes one training step of a fresh model (the compiled one warmed up by the caller)."""
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10)
    x = torch.randn(batch_size, 3, 32, 32)
    if channels_last:
        model, x = (
            model.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    y = torch.randint(0, 10, (batch_size,))
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step() -> None:
        with autocast():
            loss = F.cross_entropy(forward(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def images_per_s(step, batch_size: int, seconds: float) -> float:  # noqa: ANN001
    """Steps for at least ``seconds`` (and 2 steps): images/s."""
    steps, start = 0, time.perf_counter()
    while steps < 2 or time.perf_counter() - start < seconds:
        step()
        steps += 1
    return steps * batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[tuple, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["preact_resnet20", "convnet20"], help="timm models")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256], help="batch sizes")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every setting (median counts)")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per setting and round")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    args = parser.parse_args(argv)
    print(
        f"== CPU settings: torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 "
        f"{'native' if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 'NOT native (emulated)'}",
        flush=True,
    )
    # bf16 at the first batch size, eager only: where it is emulated one setting says enough (~10x slower)
    settings = [
        (model, batch, bf16, cl, compiled)
        for model, batch, bf16, cl, compiled in itertools.product(
            args.models, args.batch_sizes, (False, True), (False, True), (False, True)[: 1 + args.compile]
        )
        if not bf16 or (batch == args.batch_sizes[0] and not compiled)
    ]
    steps = {}
    for model, batch, bf16, cl, compiled in settings:  # build (and compile) each once, warmed up
        steps[(model, batch, bf16, cl, compiled)] = step = make_step(model, batch, bf16, cl, compiled)
        for _ in range(2):
            step()
    measured: dict[tuple, list[float]] = {s: [] for s in settings}
    for _ in range(args.rounds):
        for setting in settings:
            measured[setting].append(images_per_s(steps[setting], setting[1], args.seconds))
    results = {s: statistics.median(v) for s, v in measured.items()}
    header = ("model", "batch", "precision", "layout", "compile", "images/s", "ratio")
    print("{:18s}{:>6s}  {:10s}{:15s}{:9s}{:>9s}{:>7s}".format(*header))

    for model in args.models:
        base = results[(model, args.batch_sizes[0], False, False, False)]
        for setting in sorted((s for s in settings if s[0] == model), key=lambda s: -results[s]):
            _, batch, bf16, cl, compiled = setting
            print(
                f"{model:18s}{batch:6d}  {'bf16' if bf16 else 'float32':10s}"
                f"{'channels_last' if cl else 'NCHW':15s}{'yes' if compiled else 'no':9s}"
                f"{results[setting]:9.0f}{results[setting] / base:7.2f}",
                flush=True,
            )
    return results


if __name__ == "__main__":
    main()
