"""Worker of tests/test_recipe_dist.py: ``torchrun --nproc_per_node=2 THIS OUT_DIR DATA_DIR``.

Runs recipes/train.py several times in one torch.distributed (gloo, CPU) launch and saves, per rank, what each
run ended with (the model and its EMA) and what the rank observed along the way: the random crops its
augmentation drew, the training images it was given (through the in-memory path, the default for this small
set, or the per-image loader), the times DDP's ``no_sync`` was entered and the examples of a streamed split it
read.
"""

import os
import sys
from collections import defaultdict

import safetensors.torch
import torch
from accelerate import PartialState
from recipe_helpers import FAST, recipe_data, recipe_reporting, recipe_trainer
from recipe_helpers import recipe_memory_data as memory_data
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms import RandomCrop

SEEN: dict[str, list] = defaultdict(list)


def observe() -> None:
    """Record crops, training indices, no_sync entries, streamed examples and spectrum statistics."""
    get_params, getitem = RandomCrop.get_params, recipe_data.TorchImageDataset.__getitem__
    no_sync = DistributedDataParallel.no_sync
    stream_iter = recipe_data.StreamingImages.__iter__
    summary = recipe_reporting.spectrum_summary
    crop_flip, getitems = memory_data.crop_flip, memory_data._BatchedImages.__getitems__

    def crop_params(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        params = get_params(*args, **kwargs)
        SEEN["crops"].append(tuple(params))
        return params

    def item(self, index):  # noqa: ANN001, ANN202
        if len(self) == 32:  # the training split (the test split has 10 images)
            SEEN["indices"].append(int(index))
        return getitem(self, index)

    def batch_crops(images, top, left, flip, padding):  # noqa: ANN001, ANN202
        SEEN["crops"].extend(zip(top.tolist(), left.tolist(), flip.tolist(), strict=True))
        return crop_flip(images, top, left, flip, padding)

    def items(self, indices):  # noqa: ANN001, ANN202
        if self.train:
            SEEN["indices"].extend(int(i) for i in indices)
        return getitems(self, indices)

    def counted_no_sync(self):  # noqa: ANN001, ANN202
        SEEN["no_sync"].append(1)
        return no_sync(self)

    def streamed(self):  # noqa: ANN001, ANN202
        for x, y in stream_iter(self):
            SEEN["streamed"].append((y, float(x.double().sum())))  # label and an image fingerprint
            yield x, y

    def counted_summary(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        SEEN["spectrum_summary"].append(1)
        return summary(*args, **kwargs)

    recipe_reporting.spectrum_summary = counted_summary
    RandomCrop.get_params = staticmethod(crop_params)
    recipe_data.TorchImageDataset.__getitem__ = item
    memory_data.crop_flip = batch_crops
    memory_data._BatchedImages.__getitems__ = items
    DistributedDataParallel.no_sync = counted_no_sync
    recipe_data.StreamingImages.__iter__ = streamed


def run(argv: list[str]) -> dict:
    """One recipes/train.py run in this process; what it ended with and what this rank saw meanwhile."""
    SEEN.clear()
    result = recipe_trainer.run_in_process([*argv, *FAST])
    return {
        "state": {k: v.detach().clone() for k, v in result.model.state_dict().items()},
        "ema_state": {k: v.detach().clone() for k, v in result.ema.module.state_dict().items()},
        "ema_applied": result.ema.num_applied,
        "start_epoch": result.start_epoch,
        "num_applied": None if result.svb is None else result.svb.num_applied,
        "expected": len(result.svb_steps),
        "steps": None if result.svb is None else result.svb.step,
        "clipped": (
            None
            if result.svb is None or result.svb.last_stats is None
            else result.svb.last_stats.clipped + result.svb.last_stats.bn_clipped
        ),
        "seen": {k: list(v) for k, v in SEEN.items()},
    }


def main(out_dir: str, data_dir: str) -> None:
    observe()
    # one process group for all the runs: re-creating gloo's over the same store can meet stale addresses
    destroy, PartialState.destroy_process_group = (
        PartialState.destroy_process_group,
        lambda self, group=None: None,
    )
    base = "--model convnet20_svb --model-kwargs depth_x=1 --batch-size 8 --lr 0.05 --svb-epsilon 0.05"
    base += " --bbn-epsilon 0.05 --svb-every 3 --svb-skip-last 0 --no-svb-skip-final-epoch --hflip 0.5"
    base += " --checkpoint-hist 2 --model-ema --model-ema-decay 0.5"  # the EMA bounded with the model
    common = [*base.split(), "--data-dir", data_dir]
    out = {}
    # uninterrupted, with gradient accumulation (DDP's no_sync)
    accumulated = [*common, "--epochs", "2", "--grad-accum-steps", "2"]
    straight = [*accumulated, "--spectrum-every", "1", "--output", os.path.join(out_dir, "straight")]
    out["straight"] = run(straight)
    # stopped after one epoch compiled (DDP inside torch.compile; aot_eager replays the same kernels, bit for
    # bit), then resumed without compiling: the same weights as uninterrupted, on each rank
    b = os.path.join(out_dir, "b")
    out["first"] = run([*accumulated, "--stop-after", "1", "--compile", "aot_eager", "--output", b])
    out["first_files"] = {  # what the compiled run saved
        name: sorted(safetensors.torch.load_file(os.path.join(b, name)))
        for name in ("model_best.safetensors", "checkpoints/epoch_0001/model.safetensors")
    }
    out["resumed"] = run([*accumulated, "--resume", "--output", b])
    # the training split streamed: each rank reads its own shards (no augmentation: an image's fingerprint
    # identifies it)
    streamed = [*common, "--epochs", "1", "--streaming", "--aug", "none"]
    out["streamed"] = run([*streamed, "--output", os.path.join(out_dir, "s")])
    try:  # refused on every rank, before anything waits for a peer
        run([*common, "--epochs", "1", "--sync-bn", "--output", os.path.join(out_dir, "sync-bn")])
    except SystemExit as e:
        out["sync_bn"] = str(e)
    out["world"] = int(os.environ["WORLD_SIZE"])
    torch.save(out, os.path.join(out_dir, f"rank{os.environ['RANK']}.pt"))
    destroy(PartialState())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
