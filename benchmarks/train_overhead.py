"""What does the recipe's training loop cost over a plain PyTorch loop? Steps/s of both, same everything.

Run: ``python benchmarks/train_overhead.py`` (``--help`` for options). In one process, on one model and one
optimizer (the same memory; each slice of both loops starts from the same weights and momentum), the same
data (generated images, the same batches in the same order) and the same settings (float32, SGD momentum 0.9
Nesterov, weight decay 1e-4), it times:

1. a plain hand-written loop: ``for x, y in loader: zero_grad; cross_entropy(model(x), y).backward(); step``;
2. the recipe's loop, ``timm_svb.recipe.loop.train_one_epoch``, with the recipe's Accelerator
   (``timm_svb.recipe.trainer.make_accelerator``), its learning-rate scheduler set every step (a constant
   rate here, so that both loops do the same arithmetic) and the SVB + BBN plugin attached, bounding once
   per 391 steps (the paper: once per epoch, 391 steps for CIFAR at batch 128).

A round is 391 steps of each loop, run in 17 alternating slices of 23 steps (A B, B A, ...), so that the load
of a shared machine hits both alike; ``--repeats`` rounds follow a warm-up. It prints the steps/s of each
(median over rounds) and their ratio (recipe / plain; the target is >= 0.95), last.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import timm_svb  # noqa: F401  (registers the zoo)
from timm_svb.recipe.loop import RecipeLR, RecordingSVB, train_one_epoch
from timm_svb.recipe.trainer import make_accelerator


class GeneratedImages(Dataset):
    """``n`` random normalised images with labels, each a fixed function of its index."""

    def __init__(self, n: int, size: int, num_classes: int) -> None:
        self.n, self.size, self.num_classes = n, size, num_classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(index)
        return torch.randn(3, self.size, self.size, generator=g), index % self.num_classes


def make_loader(args: argparse.Namespace, steps: int) -> DataLoader:
    """A loader of ``steps`` batches in a fixed order: both loops see the same batches."""
    dataset = GeneratedImages(steps * args.batch_size, args.img_size, args.num_classes)
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=False, drop_last=True, num_workers=0)


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Weights and optimizer state (momentum), copied."""
    return {k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(optimizer.state_dict())


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: tuple[dict, dict]) -> None:
    """Back to a snapshot."""
    model.load_state_dict(state[0])
    optimizer.load_state_dict(state[1])


def sgd(model: torch.nn.Module, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)


def plain_epoch(
    model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, cl: bool
) -> int:
    """The hand-written baseline loop."""
    model.train()
    steps = 0
    for x, y in loader:
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        steps += 1
    return steps


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", default="convnet20_svb", help="timm model")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size")
    parser.add_argument("--img-size", type=int, default=32, help="image size")
    parser.add_argument("--num-classes", type=int, default=10, help="classes")
    parser.add_argument("--chunks", type=int, default=17, help="alternations per round")
    parser.add_argument("--chunk-steps", type=int, default=23, help="steps per alternation (17 x 23 = 391)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; SVB bounds once per round")
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last for both loops")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    steps = args.chunks * args.chunk_steps

    # One model, one optimizer, the same memory for both loops: before every slice the pair starts from the
    # same weights and momentum and sees the same batches, so both do the same arithmetic (up to SVB's
    # bounding after the round's last step) and a difference in speed is the loops' own.
    model = timm.create_model(args.model, num_classes=args.num_classes)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = sgd(model, args.lr)
    plain_loader = make_loader(args, args.chunk_steps)

    accelerator = make_accelerator(seed=0)
    # the paper's frequency: once per epoch of `steps` steps (391: CIFAR at batch 128), after its last step
    svb = RecordingSVB(model, 0.5, 1.0, every_n_steps=steps)
    recipe_model, recipe_opt = accelerator.prepare(model, optimizer)
    scheduler = RecipeLR(recipe_opt, steps, sched="const", lr=args.lr)
    recipe_loader = accelerator.prepare(make_loader(args, args.chunk_steps))
    start_state = snapshot(model, optimizer)

    def plain_chunk() -> float:
        start = time.perf_counter()
        plain_epoch(model, plain_loader, optimizer, args.channels_last)
        return time.perf_counter() - start

    def recipe_chunk() -> float:
        handle = svb.attach(recipe_opt)  # the hook counts the recipe's steps only
        start = time.perf_counter()
        train_one_epoch(
            recipe_model,
            recipe_loader,
            recipe_opt,
            accelerator,
            scheduler=scheduler,
            channels_last=args.channels_last,
            progress=False,
        )
        seconds = time.perf_counter() - start
        handle.remove()
        return seconds

    plain_chunk(), recipe_chunk()  # warm-up
    plain, recipe, pair_ratios = [], [], []
    for r in range(args.repeats):
        restore(model, optimizer, start_state)
        svb.step, before = 0, svb.num_applied
        plain_s = recipe_s = 0.0
        for i in range(args.chunks):
            state = snapshot(model, optimizer)
            # alternate A B / B A, so that neither loop always runs right after the other; the round goes on
            # from the recipe's state
            if i % 2 == 0:
                p = plain_chunk()
                restore(model, optimizer, state)
                q = recipe_chunk()
            else:
                q = recipe_chunk()
                after = snapshot(model, optimizer)
                restore(model, optimizer, state)
                p = plain_chunk()
                restore(model, optimizer, after)
            plain_s, recipe_s = plain_s + p, recipe_s + q
            pair_ratios.append(p / q)
        assert svb.num_applied == before + 1, "SVB must bound exactly once per round"
        plain.append(steps / plain_s)
        recipe.append(steps / recipe_s)
        print(f"round {r + 1}: plain {plain[-1]:.3f} steps/s, recipe {recipe[-1]:.3f} steps/s", flush=True)

    result = {
        "plain": statistics.median(plain),
        "recipe": statistics.median(recipe),
        "ratio": statistics.median(r / p for p, r in zip(plain, recipe, strict=True)),
        "ratio_pairs": statistics.median(pair_ratios),
        "svb_ms": svb.seconds / max(svb.num_applied, 1) * 1000,
    }
    print(
        f"\n{args.model}, batch {args.batch_size}, {args.img_size}x{args.img_size}, float32, "
        f"{torch.get_num_threads()} threads; {args.repeats} rounds of {steps} steps per loop, alternating "
        f"every {args.chunk_steps} steps; SVB + BBN once per {steps} steps ({result['svb_ms']:.0f} ms each)"
    )
    print(f"plain PyTorch loop : {result['plain']:.3f} steps/s (median of rounds)")
    print(f"recipe loop + SVB  : {result['recipe']:.3f} steps/s (median of rounds)")
    print(
        f"ratio recipe/plain : {result['ratio']:.3f} (median of rounds), {result['ratio_pairs']:.3f} "
        f"(median of {len(pair_ratios)} alternations); target >= 0.95"
    )
    return result


if __name__ == "__main__":
    main()
