"""Adversarial training recipe for the bundled demo models: Linf PGD-AT (Madry et al., 2018).

Each step trains on PGD adversarial examples crafted against the current model (``--attack-steps
1`` with a random start is FGSM-RS, Wong et al., 2020). SGD with Nesterov momentum, one-cycle
learning rate, seeded; a checkpoint after every epoch lets an interrupted run resume exactly.
The training split is decoded once into a uint8 tensor on the training device and augmented
there (random crops, flips), so a GPU is never waiting for image decoding. ``--amp`` trains in
bfloat16 mixed precision (the weights, the optimiser and every later evaluation stay float32).
At the end the weights are written in fp16 with a manifest that the model registry reads.

    python -m meansparse_core.training --arch digits-cnn --data digits --eps 32 --epochs 30 \\
        --run-dir runs/digits --out assets/digits-cnn
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .architectures import build_architecture
from .attacks import PGD
from .data import DATASETS, ArrayDataset, load_dataset, load_items, sample_indices
from .files import atomic_write


def training_images(dataset: Dataset, n: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split (or ``n`` items drawn by ``seed``) as uint8 (N, C, H, W) images and labels, decoded once."""
    indices = sample_indices(len(dataset), n, seed) if n else range(len(dataset))
    if isinstance(dataset, ArrayDataset):  # already uint8 in memory: no decoding
        images = torch.from_numpy(dataset.images[list(indices)]).permute(0, 3, 1, 2).contiguous()
        return images, torch.tensor([dataset.labels[i] for i in indices])
    images, labels = load_items(dataset, indices)
    return images.mul(255).round().to(torch.uint8), labels


UNIT_PIXELS = torch.arange(256, dtype=torch.float32) / 255  # uint8 pixel value -> [0, 1], as the data loaders divide


def augment(images: torch.Tensor, generator: torch.Generator, flip: bool) -> torch.Tensor:
    """Random crops (padding an eighth of the side, reflected) and, for natural images, horizontal flips.

    ``images`` (uint8 or [0, 1] floats) stay on their device; the random draws come from
    ``generator`` on the CPU, so a seeded run crops and flips the same way on every device.
    """
    if images.dtype == torch.uint8:
        # a lookup, not a division: CUDA divides by a scalar through its reciprocal, which can
        # round differently from the CPU's true division, so every device sees the CPU's pixels
        images = UNIT_PIXELS.to(images.device)[images.long()]
    n, c, h, w = images.shape
    device = images.device
    pad = max(1, h // 8)
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(device)
    rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]
    crops = padded[torch.arange(n, device=device)[:, None, None, None],
                   torch.arange(c, device=device)[None, :, None, None], rows, cols]
    if flip:
        mirrored = (torch.rand(n, generator=generator) < 0.5).to(device)
        crops = torch.where(mirrored[:, None, None, None], crops.flip(-1), crops)
    return crops


def _new_run(args: argparse.Namespace, total_steps: int, device: torch.device):
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
    # channels-last convolutions run about 1.4x faster on CPU (oneDNN) and use the tensor cores' layout on GPUs
    model = build_architecture(args.arch).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=total_steps)
    return model, optimizer, schedule


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                args: argparse.Namespace, seed: int) -> torch.Tensor:
    """One PGD-AT step on a batch; the number of adversarial examples still classified correctly."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.amp):
        attack = PGD(model, args.eps, args.attack_steps, seed=seed,
                     step=args.step_size or 1.25 * args.eps / args.attack_steps)
        logits = model(attack.run(x, y))  # crafted in train mode, as in PGD-AT
        loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return (logits.argmax(1) == y).sum()


def _batches(images: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace, generator: torch.Generator):
    """One epoch of augmented (images, labels, attack seed) batches, in the generator's order."""
    flip = args.data != "digits"
    for batch in torch.randperm(len(labels), generator=generator).split(args.batch_size):
        batch = batch.to(images.device)
        x = augment(images[batch], generator, flip).contiguous(memory_format=torch.channels_last)
        yield x, labels[batch], int(torch.randint(0, 2**31, (1,), generator=generator))


def seconds_per_step(args: argparse.Namespace, steps: int = 10) -> float:
    """Seconds one training step takes with ``args`` (after two warm-up steps), on random images."""
    device = torch.device(args.device)
    model, optimizer, _ = _new_run(args, steps + 2, device)
    generator = torch.Generator().manual_seed(args.seed)
    size = DATASETS[args.data].image_size
    images = torch.randint(0, 256, (args.batch_size, *size), generator=generator, dtype=torch.uint8).to(device)
    labels = torch.randint(0, DATASETS[args.data].num_classes, (args.batch_size,), generator=generator).to(device)
    timed = []
    for i in range(steps + 2):
        _synchronize(device)
        start = time.perf_counter()
        x, y, seed = next(_batches(images, labels, args, generator))
        int(_train_step(model, optimizer, x, y, args, seed))  # waits for the step to finish
        timed.append(time.perf_counter() - start)
    return sum(timed[2:]) / steps


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(args: argparse.Namespace) -> nn.Module | None:
    """The trained model in eval mode, or None when ``args.time_limit`` ran out first (the checkpoint resumes it)."""
    started = time.perf_counter()
    device = torch.device(args.device)
    images, labels = training_images(load_dataset(args.data, "train", args.data_dir), args.train_n, args.seed)
    images, labels = images.to(device), labels.to(device)
    steps_per_epoch = -(-len(labels) // args.batch_size)
    model, optimizer, schedule = _new_run(args, args.epochs * steps_per_epoch, device)
    generator = torch.Generator().manual_seed(args.seed)
    checkpoint = Path(args.run_dir) / "checkpoint.pt"
    first_epoch = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        first_epoch = state["epoch"] + 1
        print(f"resumed after epoch {first_epoch}", file=sys.stderr)
    epoch_seconds = 0.0
    for epoch in range(first_epoch, args.epochs):
        if args.time_limit and time.perf_counter() - started + epoch_seconds > args.time_limit:
            print(f"stopped before epoch {epoch + 1}/{args.epochs}: the time limit of {args.time_limit:g} s "
                  f"would run out; the same command resumes from {checkpoint}", file=sys.stderr)
            return None
        start, correct = time.perf_counter(), torch.zeros((), dtype=torch.long, device=device)
        model.train()
        for x, y, seed in _batches(images, labels, args, generator):
            correct += _train_step(model, optimizer, x, y, args, seed)
            schedule.step()
        epoch_seconds = time.perf_counter() - start
        print(f"epoch {epoch + 1}/{args.epochs}: adversarial train accuracy {int(correct) / len(labels):.3f} "
              f"({epoch_seconds:.1f}s)", file=sys.stderr)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "schedule": schedule.state_dict(), "generator": generator.get_state(), "epoch": epoch}
        atomic_write(checkpoint, lambda f: torch.save(state, f))
    return model.eval()


def write_bundle(model: nn.Module, args: argparse.Namespace) -> None:
    """fp16 weights plus the manifest (``<out>.json``) that ``meansparse_core.models`` reads."""
    out = Path(args.out)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(out.with_suffix(".pt"), lambda f: torch.save(state, f))
    manifest = {
        "label": args.label or f"{args.arch} ({args.data}, Linf PGD-AT eps {args.eps:g}/255)",
        "architecture": args.arch, "dataset": args.data, "threat_model": "Linf",
        "weights": out.with_suffix(".pt").name, "statistics": out.name + ".stats.pt",
        "training": {k: v for k, v in vars(args).items()
                     if k not in ("out", "label", "run_dir", "data_dir", "device", "time_limit")},
    }
    out.with_suffix(".json").write_text(json.dumps(manifest, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True)
    parser.add_argument("--data", choices=sorted(DATASETS), required=True)
    parser.add_argument("--data-dir")
    parser.add_argument("--eps", type=float, default=8.0, help="Linf budget in /255")
    parser.add_argument("--attack-steps", type=int, default=5)
    parser.add_argument("--step-size", type=float, default=None, help="/255 (default 1.25*eps/steps)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--run-dir", required=True, help="checkpoints for resuming")
    parser.add_argument("--out", required=True, help="bundle path without suffix, e.g. assets/digits-cnn")
    parser.add_argument("--label")
    parser.add_argument("--amp", action="store_true",
                        help="bfloat16 mixed precision for training (weights stay float32)")
    parser.add_argument("--train-n", type=int, default=None,
                        help="train on this many images drawn by --seed (default: all)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds: stop before an epoch that would end later (the same command resumes)")
    args = parser.parse_args(argv)
    model = train(args)
    if model is None:
        sys.exit(3)
    write_bundle(model, args)


if __name__ == "__main__":
    main()
