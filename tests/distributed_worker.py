"""Run by tests/test_distributed.py under ``torchrun --nproc-per-node 2``.

``distributed_worker.py OUT``: every evaluation and a calibration run sharded over the ranks, then
rank 0 runs each again as a single process (same process, same thread settings) and writes both
to OUT. ``distributed_worker.py --rank-1-after K kill|fail CLI-ARGS...``: the command line, where rank 1
kills itself with SIGKILL (kill) or raises an error (fail) when it starts its (K+1)-th attacked
batch: a fault at a known point. ``distributed_worker.py --count-reads OUT CLI-ARGS...``: the
command line, each rank writing to OUT.rank<r> how many images it read from the dataset.
"""

import os
import signal
import sys

import torch

from meansparse_core import Statistics, attach
from meansparse_core.data import load_dataset, load_items
from meansparse_core.distributed import SOLO, join, leave
from meansparse_core.evaluation import EvalSettings, evaluate
from meansparse_core.models import bundled_statistics_path, find_model, load_model
from meansparse_core.statistics import calibrate

SETTINGS = [EvalSettings(alpha=0.3, attack=attack, eps=eps, steps=steps, grad=grad, batch_size=batch_size)
            for attack, eps, steps, batch_size in [("pgd", 32, 5, 7), ("apgd-ce", 32, 5, 7), ("square", 32, 40, 7),
                                                   ("autoattack", 64, 1, 2)]
            for grad in ("exact", "straight-through")]
ITEMS = {"pgd": 40, "apgd-ce": 40, "square": 40, "autoattack": 4}


def run(group):
    spec = find_model("bundled/digits-cnn")
    model = load_model(spec)
    sparse = attach(model, Statistics.load(bundled_statistics_path(spec)))
    images, labels = load_items(load_dataset("digits", "test"), range(40))
    train, _ = load_items(load_dataset("digits", "train"), range(90))
    outcomes = {f"{s.attack} {s.grad}": evaluate(sparse, images[:ITEMS[s.attack]], labels[:ITEMS[s.attack]], s,
                                                 group=group).outcomes
                for s in SETTINGS}
    one_item = evaluate(sparse, images[:1], labels[:1], SETTINGS[0], group=group)  # rank 1 has no batch
    stats = calibrate(model, train.split(16), group=group)
    lone_batch = calibrate(model, train[:5].split(16), group=group)
    authors = calibrate(model, train.split(16), group=group, estimator="authors")  # 6 batches, the last of 10
    return {"outcomes": outcomes, "one_item": one_item.outcomes, "world_size": one_item.world_size,
            "stats": stats.to_payload(), "lone_batch": lone_batch.to_payload(), "authors": authors.to_payload()}


def rank_1_after(batches: int, fault: str, argv: list[str]) -> int:
    from meansparse_core import cli, evaluation

    attack_batch, started = evaluation._attack_batch, []

    def dying(*args, **kwargs):
        if os.environ["RANK"] == "1" and len(started) == batches:
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError("The disk is full.")
        started.append(1)
        return attack_batch(*args, **kwargs)

    evaluation._attack_batch = dying
    return cli.main(argv)


def count_reads(out: str, argv: list[str]) -> int:
    from meansparse_core import cli, data

    read, getitem = [], data.ArrayDataset.__getitem__
    data.ArrayDataset.__getitem__ = lambda self, index: read.append(index) or getitem(self, index)
    code = cli.main(argv)
    with open(f"{out}.rank{os.environ['RANK']}", "w") as f:
        f.write(str(len(read)))
    return code


if __name__ == "__main__":
    if sys.argv[1] == "--count-reads":
        sys.exit(count_reads(sys.argv[2], sys.argv[3:]))
    if sys.argv[1] == "--rank-1-after":
        sys.exit(rank_1_after(int(sys.argv[2]), sys.argv[3], sys.argv[4:]))
    group = join(torch.device("cpu"))
    shared = run(group)
    if group.is_main:
        torch.save({"shared": shared, "single": run(SOLO)}, sys.argv[1])
    leave()
