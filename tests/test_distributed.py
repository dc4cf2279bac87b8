"""torchrun with two ranks (gloo, CPU) against one process: the same outcomes item by item, the same bits.

Each test starts real torchrun jobs, kept small: the digits model, a few dozen items.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from meansparse_core import distributed
from meansparse_core.cli import main
from meansparse_core.distributed import Group
from meansparse_core.outcomes import read_items

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "distributed_worker.py")
EVALUATE = ["evaluate", "--model", "bundled/digits-cnn", "--attack", "pgd", "--eps", "32", "--steps", "5",
            "--alpha", "0.2", "--json"]


def torchrun(args: list[str], cwd: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MEANSPARSE_CACHE": str(cwd / ".cache")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def finish(job: subprocess.Popen) -> tuple[int, str, str]:
    out, err = job.communicate(timeout=600)
    return job.returncode, out, err


@pytest.mark.parametrize("count, ranks, shares", [(10, 2, [range(0, 5), range(5, 10)]),
                                                  (5, 2, [range(0, 3), range(3, 5)]),
                                                  (1, 3, [range(0, 1), range(1, 1), range(1, 1)])])
def test_shards_are_contiguous_cover_everything_once_and_differ_by_at_most_one(count, ranks, shares):
    assert [Group(rank, ranks).shard(count) for rank in range(ranks)] == shares


def test_two_ranks_give_one_process_outcomes_and_statistics_bit_for_bit(tmp_path):
    """PGD, APGD-CE, Square and AutoAttack, exact and BPDA; calibration with either estimator; and ranks
    with no items."""
    out = tmp_path / "both.pt"
    code, _, err = finish(torchrun([WORKER, str(out)], tmp_path))
    assert code == 0, err[-2000:]
    both = torch.load(out, weights_only=False)
    shared, single = both["shared"], both["single"]
    assert shared["world_size"] == 2
    assert set(shared["outcomes"]) == {f"{a} {g}" for a in ("pgd", "apgd-ce", "square", "autoattack")
                                       for g in ("exact", "straight-through")}
    for name, outcomes in shared["outcomes"].items():
        assert outcomes == single["outcomes"][name], name
    broken = {b for o in shared["outcomes"].values() for b in o.broken_by}
    assert {"", "pgd", "apgd-ce", "square"} <= broken, "every attack broke some items and spared others"
    assert shared["one_item"] == single["one_item"]
    assert shared["authors"]["meta"]["estimator"] == "authors" and shared["authors"]["meta"]["n_images"] == 90
    for key in ("stats", "lone_batch", "authors"):
        for mine, theirs in zip(shared[key]["taps"], single[key]["taps"], strict=True):
            assert mine["count"] == theirs["count"]
            assert torch.equal(mine["mean"], theirs["mean"]) and torch.equal(mine["std"], theirs["std"])


def test_torchrun_command_prints_one_process_accuracies_and_items(tmp_path, monkeypatch, capsys):
    args = [*EVALUATE, "--n-items", "40", "--no-cache"]
    code, out, err = finish(torchrun(["-m", "meansparse_core", "--", *args, "--items", "two.csv"], tmp_path))
    assert code == 0, err[-2000:]
    shared = json.loads(out)  # rank 1 printed nothing
    monkeypatch.chdir(tmp_path)
    assert main([*args, "--items", "one.csv"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert (shared["world_size"], single["world_size"]) == (2, 1)
    assert (shared["clean_acc"], shared["robust_acc"]) == (single["clean_acc"], single["robust_acc"])
    assert read_items(tmp_path / "two.csv") == read_items(tmp_path / "one.csv")
    [(indices, outcomes)] = read_items(tmp_path / "one.csv").values()
    assert len(set(indices)) == 40 and outcomes.robust_acc == single["robust_acc"]


def test_each_rank_reads_only_the_test_images_of_its_share(tmp_path):
    args = [*EVALUATE, "--n-items", "40", "--batch-size", "4", "--no-cache"]
    code, out, err = finish(torchrun([WORKER, "--count-reads", "reads", *args], tmp_path))
    assert code == 0, err[-2000:]
    reads = [int((tmp_path / f"reads.rank{rank}").read_text()) for rank in (0, 1)]
    assert all(0 < r < 40 for r in reads) and sum(reads) >= 40, reads


def test_a_killed_rank_fails_the_job_and_the_same_command_resumes_to_the_same_result(tmp_path, monkeypatch, capsys):
    args = [*EVALUATE, "--n-items", "60", "--batch-size", "4", "--items", "items.csv"]
    code, out, err = finish(torchrun([WORKER, "--rank-1-after", "2", "kill", *args], tmp_path))
    results = tmp_path / ".cache" / "results"
    assert code != 0 and out == "", "the job must fail, printing no result"
    assert not list(results.glob("*.json")) and not (tmp_path / "items.csv").exists(), "nothing written as complete"
    [rank1] = results.glob("*.rank1.journal")
    done = sum(len(json.loads(j.read_text())) for j in results.glob("*.journal"))
    assert len(json.loads(rank1.read_text())) == 2 and done >= 2

    code, out, err = finish(torchrun(["-m", "meansparse_core", "--", *args], tmp_path))
    assert code == 0, err[-2000:]
    resumed = json.loads(out)
    assert f"resumed {done} attacked batches" in err
    assert not list(results.glob("*.journal")) and len(list(results.glob("*.json"))) == 1

    monkeypatch.chdir(tmp_path)
    assert main([*args[:-1], "single.csv", "--no-cache"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert (resumed["clean_acc"], resumed["robust_acc"]) == (single["clean_acc"], single["robust_acc"])
    assert read_items(tmp_path / "items.csv") == read_items(tmp_path / "single.csv")


def test_a_rank_that_fails_prints_one_readable_line_and_the_job_fails_with_no_result(tmp_path):
    args = [*EVALUATE, "--n-items", "30", "--batch-size", "4", "--items", "items.csv"]
    code, out, err = finish(torchrun([WORKER, "--rank-1-after", "1", "fail", *args], tmp_path))
    assert code != 0 and out == ""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "error: rank 1: The disk is full." in errors, err[-3000:]
    assert all(e.startswith("error: rank 0: lost another rank") for e in errors if "rank 1" not in e)
    assert not list((tmp_path / ".cache" / "results").glob("*.json")) and not (tmp_path / "items.csv").exists()


def test_a_ranks_error_starts_its_own_line_after_another_ranks_unfinished_progress_bar(monkeypatch, capsys):
    """The ranks share stderr, where rank 0's progress bar stands without a line break."""
    monkeypatch.setattr(distributed, "join", lambda device: Group(rank=1, world_size=2))
    print("alphas:  25%|██▌       | 0.25/1", end="", file=sys.stderr)
    assert main(["evaluate", "--model", "bundled/no-such-model", "--device", "cpu"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 1: ") and "no-such-model" in errors[0]
