"""The GPU session script's CPU-testable parts: the data it makes, its scheduler, its device emulation."""

import importlib.util
import io
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from meansparse_core.data import FolderDataset, load_dataset, load_items

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_session", ROOT / "benchmarks" / "gpu" / "session.py")
gpu_session = sys.modules["gpu_session"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_session)


def jpeg_archive(path: Path) -> Path:
    """A CIFAR-shaped archive: cifar10-jpeg/{train,test}/<class>/<image>.jpg, listed out of order."""
    generator = torch.Generator().manual_seed(0)
    with tarfile.open(path, "w:gz") as tar:
        for split, count in (("test", 2), ("train", 3)):
            for label in ("frog", "cat"):
                for i in reversed(range(count)):
                    pixels = torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8).numpy()
                    data = io.BytesIO()
                    Image.fromarray(pixels).save(data, "JPEG")
                    info = tarfile.TarInfo(f"cifar10-jpeg/{split}/{label}/{i:04d}.jpg")
                    info.size = len(data.getvalue())
                    tar.addfile(info, io.BytesIO(data.getvalue()))
    return path


def test_archive_becomes_batches_with_the_folder_datasets_pixels_labels_and_order(tmp_path):
    archive = jpeg_archive(tmp_path / "cifar.tar.gz")
    batches = gpu_session.cifar_batches_from_archive(archive, tmp_path / "batches")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "tree", filter="data")
    for split in ("train", "test"):
        ours = load_dataset("cifar10", split, batches)
        folder = FolderDataset(tmp_path / "tree" / "cifar10-jpeg" / split, (3, 32, 32))
        assert ours.classes == folder.classes == ["cat", "frog"]
        for got, expected in zip(load_items(ours, range(len(ours))), load_items(folder, range(len(folder)))):
            assert torch.equal(got, expected)


def python_job(name, code, limit=60.0, **options):
    return gpu_session.Job(name, [sys.executable, "-c", code], limit, **options)


def test_jobs_run_in_order_stop_at_their_limit_and_resume_in_the_next_call(tmp_path):
    scale = replace(gpu_session.TINY, slack=1.0)
    session = gpu_session.Session(tmp_path, scale)
    jobs = [
        python_job("first", "print('{\"ok\": 1}')"),
        python_job("slow", "import time; time.sleep(60)", limit=1),
        python_job("after_slow", "print(1)", needs=("slow",)),
        python_job("after_first", "print(2)", needs=("first",)),
    ]
    session.run(jobs)
    status = {name: session.results[name]["status"] for name in ("first", "slow", "after_first")}
    assert status == {"first": "done", "slow": "stopped", "after_first": "done"}
    assert session.results["first"]["output"] == {"ok": 1}
    assert "after_slow" not in session.results, "what needs a stopped job waits for the next call"
    jobs[1] = python_job("slow", "print(3)")
    again = gpu_session.Session(tmp_path, scale)
    again.run(jobs)
    assert again.results["first"]["calls"] == 1, "a finished job is not run again"
    assert again.results["slow"]["status"] == again.results["after_slow"]["status"] == "done"


def test_the_rehearsal_refuses_what_the_device_lacks(tmp_path):
    blocked = gpu_session.write_device_blocker(tmp_path, ROOT / "carry" / "wheels")
    assert "streamlit" in blocked and "tqdm" not in blocked and "meansparse_core" not in blocked
    probe = "import importlib, sys\nfor m in sys.argv[1:]:\n    try: importlib.import_module(m); print(m, 'ok')\n" \
            "    except ImportError: print(m, 'refused')"
    shown = subprocess.run([sys.executable, "-c", probe, "streamlit", "tqdm", "numpy"], capture_output=True, text=True,
                           env={"PYTHONPATH": str(tmp_path), "PATH": ""}, check=True).stdout
    assert shown.split("\n")[:3] == ["streamlit refused", "tqdm ok", "numpy ok"]


@pytest.mark.parametrize("name", ["train", "calibrate", "autoattack_sparse", "autoattack_base", "apgd_bpda"])
def test_every_planned_job_is_there_once(tmp_path, name):
    session = gpu_session.Session(tmp_path, gpu_session.GPU)
    names = [job.name for job in gpu_session.jobs(session, tmp_path, ["train"])]
    assert names.count(name) == 1 and len(names) == len(set(names))


def test_what_comes_back_restores_a_fresh_machine(tmp_path):
    first = gpu_session.Session(tmp_path / "device", gpu_session.GPU)
    first.results["calibrate"] = {"status": "done", "output": {"taps": 8}}
    first.save()
    weights = torch.randint(0, 256, (gpu_session.PART_BYTES + 1000,), dtype=torch.uint8).numpy().tobytes()
    (first.state / "assets" / f"{gpu_session.MODEL}.pt").write_bytes(weights)
    for suffix in (".json", ".stats.pt"):
        (first.state / "assets" / f"{gpu_session.MODEL}{suffix}").write_text(suffix)
    gpu_session.pack(first, tmp_path / "out")
    back = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert back == ["bundle.tar.0", "bundle.tar.1", "session.tar.gz"], "weights over the tool's 16 MiB come in parts"
    assert all((tmp_path / "out" / name).stat().st_size <= 16 * 2**20 for name in back)
    fresh = gpu_session.Session(tmp_path / "fresh", gpu_session.GPU)
    gpu_session.restore(fresh, tmp_path / "out")
    assert fresh.done("calibrate")
    assert (fresh.state / "assets" / f"{gpu_session.MODEL}.stats.pt").read_text() == ".stats.pt"
    assert (fresh.state / "assets" / f"{gpu_session.MODEL}.pt").read_bytes() == weights


def test_training_shares_the_gpu_with_one_job_and_evaluations_run_four_at_a_time(tmp_path):
    session = gpu_session.Session(tmp_path, replace(gpu_session.TINY, slack=1.0))
    nap = "import time; time.sleep(4)"
    session.run([python_job("train", nap, lanes=2), *[python_job(f"beside_{i}", nap) for i in range(2)],
                 *[python_job(f"eval_{i}", nap, needs=("train", "beside_0", "beside_1")) for i in range(5)]])

    def most_at_once(names):
        spans = [(session.results[n]["started_at_s"], session.results[n]["ended_at_s"]) for n in names]
        return max(sum(start <= t < end for start, end in spans) for t, _ in spans)

    assert most_at_once(["train", "beside_0", "beside_1"]) == 2
    assert most_at_once([f"eval_{i}" for i in range(5)]) == 4


def test_the_plan_takes_the_most_attack_steps_that_leave_the_epochs(tmp_path, monkeypatch):
    import meansparse_core.training

    seconds = {10: 0.10, 7: 0.05, 5: 0.03}
    monkeypatch.setattr(meansparse_core.training, "seconds_per_step", lambda args, steps: seconds[args.attack_steps])
    session = gpu_session.Session(tmp_path, gpu_session.GPU)
    argv = gpu_session.plan_training(session, tmp_path / "data")
    plan = session.results["plan"]
    per_epoch = -(-(50_000 - 1000) // 256)
    assert plan["steps_per_epoch"] == per_epoch and plan["attack_steps"] == 7, "10 steps leave fewer than 30 epochs"
    assert plan["epochs"] == int(400 / (1.1 * 0.05 * per_epoch)) >= gpu_session.MIN_EPOCHS
    shown = " ".join(argv)
    assert "--recipe pgd-at-ema --holdout 1000" in shown and f"--epochs {plan['epochs']}" in shown


def test_the_card_shows_the_session_and_the_held_out_curve():
    point = {"epoch": 1, "adversarial_train_accuracy": 0.3, "seconds": 9.5,
             "held_out_raw": {"clean": 0.5, "pgd10": 0.25}, "held_out_average": {"clean": 0.55, "pgd10": 0.3}}
    results = {"environment": {"gpu": "H200", "torch": "2", "date": "today", "cudnn_allow_tf32": True},
               "plan": {"attack_steps": 10, "epochs": 31, "seconds_per_step": {"10": 0.06}},
               "train": {"status": "done", "wall_s": 401.0, "command": "python -m meansparse_core.training"},
               "curve": [point]}
    card = gpu_session.card_rows(results)
    assert "10 attack steps x 31 epochs" in card and "train: done, 401.0 s" in card
    assert "| 1 | 30.0% | 50.0% | 25.0% | 55.0% | 30.0% | 9.5 |" in card
