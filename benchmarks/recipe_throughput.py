"""Images/s of ``recipes/train.py`` itself, through each data path, with and without SVB, next to the bare
training step it runs.

    python benchmarks/recipe_throughput.py                        # a GPU: WRN-28-10, bf16, channels_last
    python benchmarks/recipe_throughput.py --device cpu --model preact_resnet20_svb   # the 2-core CPU figures
    python benchmarks/recipe_throughput.py --device cpu --small   # smoke test on a CPU (figures mean nothing)

On the real CIFAR-10 copy (``--data``, by default ``../shared/data/cifar10-jpeg`` beside the repository; its
first ``--steps`` x ``--batch-size`` training images) or, where it is absent (and always with ``--small``), on
generated 32x32 images saved to disk (``datasets`` ``save_to_disk``, as a local copy of CIFAR would be), in
one process, it measures and prints as it goes:

1. ``bare step``: forward, cross-entropy, backward and SGD step of the same model, memory format and autocast
   on one fixed batch already on the device: the ceiling of any training loop;
2. ``recipe, per-image loader``: ``recipes/train.py --no-svb --in-memory off`` (PIL decode and timm
   transforms per image, loader workers on GPUs, Accelerate, the per-step schedule; the test pass excluded),
   the images/s of its second epoch (the first warms up);
3. ``recipe, in memory``: the same with ``--in-memory on`` (the splits decoded once, batches cropped, flipped
   and normalised on the device);
4. ``recipe, in memory, SVB+BBN``: 3. with SVB + BBN once per epoch (``--svb-every 1ep``, after the epoch's
   last step), so the second epoch pays one bounding.

The bare step is measured again after each recipe row (the load of a shared machine hits both alike); the
closing table gives each recipe row's ratio to the median bare step. ``benchmarks/gpu_check.sh`` runs this
script last.
Arguments it does not know (those meant for ``gpu_check.py``) are ignored with a note.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import timm_svb  # noqa: F401  (registers the zoo)
from timm_svb.recipe.data import make_synthetic_dataset
from timm_svb.recipe.trainer import run_in_process

SMALL = {"model": "convnet20", "batch_size": 16, "steps": 4, "model_kwargs": ["depth_x=1"], "data": None}
CIFAR_COPY = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"
ROWS = (  # key, label, --in-memory, SVB
    ("recipe_loader", "recipe, per-image loader", "off", False),
    ("recipe_memory", "recipe, in memory", "on", False),
    ("recipe_memory_svb", "recipe, in memory, SVB+BBN", "on", True),
)


def bare_images_per_s(args: argparse.Namespace, device: torch.device) -> float:
    """Images/s of forward + backward + SGD step on one batch already on ``device``."""
    kwargs = dict(kv.split("=", 1) for kv in args.model_kwargs)
    model = timm.create_model(args.model, num_classes=10, **{k: int(v) for k, v in kwargs.items()})
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        model = torch.compile(model, backend=args.compile)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(max(3, args.steps // 10)):  # warm-up: cudnn autotuning, compilation
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.steps * args.batch_size / (time.perf_counter() - start)


def recipe_run(
    args: argparse.Namespace, data: Path, out: Path, in_memory: str, svb: bool
) -> tuple[float, int]:
    """Images/s of the recipe's second epoch, and how many times SVB bounded in it."""
    argv = [
        *("--model", args.model, "--data-dir", str(data), "--output", str(out), "--epochs", "2"),
        *("--batch-size", str(args.batch_size), "--lr", "0.01", "--checkpoint-hist", "0"),
        *("--spectrum-every", "0", "--no-progress", "--log-with", "none", "--seed", "0"),
        *("--channels-last" if args.channels_last else "--no-channels-last",),
        *("--in-memory", in_memory, "--train-subset", str(args.steps * args.batch_size)),
    ]
    if args.model_kwargs:
        argv += ["--model-kwargs", *args.model_kwargs]
    if args.device == "cpu":
        argv += ["--cpu", "--workers", "0"]
    elif args.workers is not None:
        argv += ["--workers", str(args.workers)]
    if args.mixed_precision:
        argv += ["--mixed-precision", args.mixed_precision]
    if args.compile:
        argv += ["--compile", args.compile]
    if svb:  # bound after each epoch's last step: the measured epoch pays one SVB + BBN
        argv += [
            *("--svb-epsilon", "0.5", "--bbn-epsilon", "1", "--svb-every", "1ep"),
            *("--svb-skip-last", "0", "--no-svb-skip-final-epoch"),
        ]
    else:
        argv += ["--no-svb"]
    result = run_in_process(argv)
    row = result.state.history[-1]
    return row["images_per_s"], row.get("svb_applied") or 0


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="where to train")
    parser.add_argument("--small", action="store_true", help="a tiny model and epoch: the CPU smoke test")
    parser.add_argument("--model", default="wrn28_10", help="timm model (SVB gets --svb-epsilon 0.5)")
    parser.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=INT", help="model arguments")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per epoch (and timed steps)")
    parser.add_argument(
        "--mixed-precision",
        default="auto",
        choices=("auto", "bf16", "fp16", "no"),
        help="autocast (auto: bf16 on GPUs and on CPUs with native bf16, else float32)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=CIFAR_COPY if CIFAR_COPY.is_dir() else None,
        help="a local image data set to train on (default: the CIFAR-10 JPEG copy if here, else generated)",
    )
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="NCHW")
    parser.add_argument("--compile", default=None, metavar="BACKEND", help="torch.compile backend")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: the recipe's)")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"(ignoring arguments meant for gpu_check.py: {' '.join(unknown)})")
    if args.small:
        vars(args).update(SMALL)
    if args.mixed_precision == "auto":
        native_bf16 = args.device == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
        args.mixed_precision = "bf16" if native_bf16 else "no"
    if args.mixed_precision == "no" or (args.device == "cpu" and args.mixed_precision == "fp16"):
        args.mixed_precision = None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu (and --small for the smoke test)")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"

    print(
        f"== recipe throughput: {args.model} {' '.join(args.model_kwargs)}, batch {args.batch_size}, 32x32, "
        f"{args.mixed_precision or 'float32'}, {'channels_last' if args.channels_last else 'NCHW'}, "
        f"{args.steps} steps an epoch, {name}, torch {torch.__version__}",
        flush=True,
    )
    print(f"{'':30s}{'images/s':>10s}", flush=True)
    results: dict[str, float] = {}
    bare = [bare_images_per_s(args, device)]  # measured again after each recipe row: the median counts
    print(f"{'bare step':30s}{bare[0]:10.0f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "data"
            start = time.perf_counter()
            make_synthetic_dataset(
                data, num_train=args.steps * args.batch_size, num_test=args.batch_size, num_classes=10
            )
            print(f"(generated {args.steps * args.batch_size} images in {time.perf_counter() - start:.1f} s)")
        else:
            print(f"(data: the first {args.steps * args.batch_size} training images of {data})")
        for key, label, in_memory, svb in ROWS:
            results[key], applied = recipe_run(args, data, Path(tmp) / key, in_memory, svb)
            bare.append(bare_images_per_s(args, device))
            note = f"  (SVB x{applied} in the epoch)" if svb else ""
            print(f"{label:30s}{results[key]:10.0f}{note}", flush=True)
            print(f"{'bare step':30s}{bare[-1]:10.0f}", flush=True)
            if svb:
                results["svb_applied"] = applied
    results["bare"] = statistics.median(bare)
    print(f"\n{'(median of the bare rows)':30s}{'images/s':>10s}{'ratio':>8s}")
    print(f"{'bare step':30s}{results['bare']:10.0f}")
    for key, label, _, _ in ROWS:
        results[f"{key}_ratio"] = results[key] / results["bare"]
        print(f"{label:30s}{results[key]:10.0f}{results[f'{key}_ratio']:8.3f}", flush=True)
    return results


if __name__ == "__main__":
    main()
