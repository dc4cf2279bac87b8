"""The GPU session for the CIFAR-10 demo model: train it, calibrate it, measure its card, test CUDA.

Run it through ``benchmarks/gpu/session.sh`` (which installs the carried wheels first);
``benchmarks/gpu/README.md`` gives the calls. Every step is a job with a time limit; jobs run in
priority order, training beside the CUDA tests, evaluations four at a time. A job stopped by its
limit or by the call's deadline keeps what it finished (the training checkpoint after each epoch;
the evaluation journal after each attacked batch), and the same command resumes it: the second
device call continues the first.

The model is ``cifar-preact-resnet18`` trained by the ``pgd-at-ema`` recipe (``meansparse_core/
training.py`` says why). Planned device time on one H200 (expected: estimates scaled from the
2026-11-26 session's ResNet-9 timings by the PreAct ResNet-18's cost, which the script measures
and adapts to; limit: where the job is stopped). 15 minutes in all, start-ups included:

================================  ========  =======  ================================================
step                              expected  limit    what
================================  ========  =======  ================================================
call 1: machine start               90 s             the tool's; counts against the 15 minutes
setup                               20 s             install the wheels; decode the JPEG archive once
probe                               20 s             seconds per step for 10, 7, 5 attack steps ->
                                                     the most steps that leave >= 30 epochs (<= 40)
train                              400 s    560 s    pgd-at-ema, bf16 autocast, channels-last, uint8
                                                     images augmented on the GPU, 49,000 images (1,000
                                                     held out: the curve), stops before an epoch that
                                                     would end after 520 s
  beside it: tests_cuda             90 s    240 s    operator, placement, statistics, training
calibrate                           25 s     60 s    exact statistics over all 50,000 train images
clean, PGD-20 on 10,000           5+20 s     90 s    the targets: clean >= 80%, PGD-20 >= 45%
sweep (N = 1,000, 14 alphas)        40 s    150 s    PGD-20 per alpha; ``best_alpha`` picks alpha
clean on the 500-image subset        3 s     30 s    the figure the test suite checks
call 1 ends                        560 s             (timeout_s 590): what is done is packed to $OUT
                                                     after every job
call 2 (warm: no start)          <= 240 s            the rest, four at a time:
AutoAttack base, MeanSparse      150+250 s  300 s    each, N = 1,000, standard version
APGD-CE: BPDA, exact, base        3 x 15 s   90 s    each, N = 1,000, 100 steps
Square: base, MeanSparse          2 x 30 s  120 s    each, N = 1,000, 1,000 queries
PGD-20 on 10,000 at the alpha       30 s     90 s
================================  ========  =======  ================================================

The estimates add up to more than 15 minutes: AutoAttack with MeanSparse (about 250 s: the ResNet-9's
166 s scaled by the bigger network and its 17 taps) is unlikely to end in call 2's ~200 s. It is
started first after the sweep, and what a session leaves unfinished resumes in a later one from
the files in ``carry/returned`` (``--only autoattack_sparse,autoattack_base`` keeps that call short).
``--train-seconds 330`` instead trades about 5 epochs for the time to finish every row in one session.

Evaluation rows run with the project's CLI (``python -m meansparse_core evaluate|sweep ...
--device cuda``) in float32 with PyTorch's defaults (cuDNN may use TF32 for convolutions; the
results file records the setting). ``--tiny`` runs everything on the CPU at toy scale (a few
batches, N = 20) into another state folder: the rehearsal before any device call.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MODEL = "cifar-preact-resnet18"
KEY = f"bundled/{MODEL}"
LABEL = "cifar-preact-resnet18 (CIFAR-10, Linf PGD-AT eps 8/255, weight average, GPU)"
RECIPE = "pgd-at-ema"
ATTACK_STEPS = (10, 7, 5)  # the plan takes the first that leaves MIN_EPOCHS in the training budget
MIN_EPOCHS = 30
PART_BYTES = 15 * 2**20  # the device tool brings back files of at most 16 MiB: the weights (22 MB) travel in parts
ALPHAS = "0,0.05,0.1,0.15,0.2,0.25,0.3,0.4,0.5,0.6,0.7,0.8,1,1.5"
DEVICE_TESTS = [str(ROOT / "tests" / name) for name in ("test_operator.py", "test_placement.py", "test_statistics.py",
                                                        "test_training.py")]


@dataclass(frozen=True)
class Scale:
    """What differs between the GPU session and its CPU rehearsal."""

    device: str
    train_n: int | None  # training images (None: all 50,000)
    train_seconds: float
    max_epochs: int
    holdout: int  # training images kept out for the curve
    batch_size: int
    card_n: int  # N for AutoAttack, APGD, Square and the sweep
    full_n: int | None  # N for the clean and PGD-20 rows (None: all 10,000)
    calibrate_n: int | None
    eval_batch: int
    deadline: float  # seconds of this call
    slack: float  # every job's time limit is multiplied by this
    alphas: str = ALPHAS  # the sweep's
    apgd_steps: int = 100
    square_queries: int = 1000

    @property
    def tiny(self) -> bool:
        return self.device == "cpu"


GPU = Scale("cuda", None, 400, 40, 1000, 256, 1000, None, None, 500, 560, 1.0)
# On a shared 2-core CPU the limits only catch hangs.
TINY = Scale("cpu", 32, 600, 1, 8, 8, 8, 8, 64, 8, 3600, 10.0, "0,0.5", 5, 20)


# --- data --------------------------------------------------------------------------------------


def cifar_batches_from_archive(archive: Path, dest: Path) -> Path:
    """The CIFAR-10 JPEG archive (``cifar10-jpeg/{train,test}/<class>/<image>``) as python batches in ``dest``.

    Same pixels, labels and order as ``FolderDataset`` reading the extracted tree (classes and
    files sorted by name), so ``--n N --seed S`` draws the same images; but every later load
    is one unpickling instead of 60,000 JPEG decodes, and nothing is extracted to disk.
    """
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from PIL import Image

    from meansparse_core.data import FolderDataset, fit_image

    if (dest / "batches.meta").exists():
        return dest
    files: dict[str, dict[str, dict[str, bytes]]] = {"train": {}, "test": {}}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) >= 3 and parts[-3] in files and \
                    Path(member.name).suffix.lower() in FolderDataset.EXTENSIONS:
                files[parts[-3]].setdefault(parts[-2], {})[parts[-1]] = tar.extractfile(member).read()

    def decode(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as image:
            return fit_image(image, (3, 32, 32)).mul(255).round().byte().numpy().reshape(-1)

    classes = sorted(files["train"])
    dest.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for split, names in (("train", ["data_batch_1"]), ("test", ["test_batch"])):
            items = [(files[split][c][name], label)
                     for label, c in enumerate(classes) for name in sorted(files[split][c])]
            images = np.stack(list(pool.map(decode, [data for data, _ in items], chunksize=256)))
            batch = {b"data": images, b"labels": [label for _, label in items]}
            (dest / names[0]).write_bytes(pickle.dumps(batch))
    (dest / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in classes]}))
    return dest


# --- jobs --------------------------------------------------------------------------------------


@dataclass
class Job:
    """One step: a command (argv, or a function of the results so far), its time limit and what it needs."""

    name: str
    argv: list[str] | Callable[[dict], list[str]]
    limit: float
    needs: tuple[str, ...] = ()
    lanes: int = 4  # the most jobs that may run at once while this one runs (itself included)
    assets: bool = False  # reads the new bundle (MEANSPARSE_ASSETS points at the session's assets)
    results_codes: tuple[int, ...] = (0,)  # exit statuses that are a result (pytest's 1: some tests failed)
    process: subprocess.Popen | None = field(default=None, repr=False)
    started: float = 0.0


class Session:
    """The state folder, the results so far, and the scheduler."""

    def __init__(self, state: Path, scale: Scale, out: Path | None = None) -> None:
        self.state, self.scale, self.out = state, scale, out
        self.start = time.perf_counter()
        for folder in ("logs", "assets", "run", "work"):
            (state / folder).mkdir(parents=True, exist_ok=True)
        self.results_path = state / "results.json"
        self.results: dict = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}

    def left(self) -> float:
        return self.scale.deadline - (time.perf_counter() - self.start)

    def save(self) -> None:
        self.results_path.write_text(json.dumps(self.results, indent=2) + "\n")

    def done(self, name: str) -> bool:
        return self.results.get(name, {}).get("status") == "done"

    def run(self, jobs: list[Job]) -> None:
        """Start jobs in list order once what they need is done, until all end or time runs out.

        A job starts while fewer jobs run than its own ``lanes`` and every running job's allow
        (training shares the GPU with one job; evaluations, whose small batches leave it idle
        between kernels, run four at a time). A job whose needs failed or were stopped is left
        for the next call.
        """
        waiting = [j for j in jobs if not self.done(j.name)]
        running: list[Job] = []
        while waiting or running:
            for job in list(running):
                over = time.perf_counter() - job.started > job.limit * self.scale.slack or self.left() < 5
                if job.process.poll() is not None or over:
                    running.remove(job)
                    self._finish(job, stop=over and job.process.poll() is None)
            pending = {j.name for j in waiting + running}
            for job in list(waiting):
                unmet = [n for n in job.needs if not self.done(n)]
                if any(n not in pending for n in unmet):
                    waiting.remove(job)
                    continue
                if unmet:
                    continue
                if len(running) >= min([job.lanes] + [r.lanes for r in running]):
                    break
                if self.left() < 30:
                    waiting.clear()
                    break
                waiting.remove(job)
                self._launch(job)
                running.append(job)
            time.sleep(0.2 if self.scale.tiny else 1.0)

    def _launch(self, job: Job) -> None:
        argv = job.argv(self.results) if callable(job.argv) else job.argv
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                   PYTHONUNBUFFERED="1", MEANSPARSE_CACHE=str(self.state / "work" / ".cache"))
        if job.assets:
            env["MEANSPARSE_ASSETS"] = str(self.state / "assets")
        logs = self.state / "logs"
        with open(logs / f"{job.name}.log", "ab") as log:
            log.write(f"\n$ {' '.join(argv)}\n".encode())
        job.started = time.perf_counter()
        # stdout to a file, not a pipe: a long pytest report would fill a pipe and stall the job
        with open(logs / f"{job.name}.out", "wb") as out, open(logs / f"{job.name}.log", "ab") as log:
            job.process = subprocess.Popen(argv, cwd=self.state / "work", env=env, stdout=out, stderr=log)
        self.results[job.name] = {"status": "running", "command": _shown(argv, self.state),
                                  "calls": self.results.get(job.name, {}).get("calls", 0) + 1,
                                  "started_at_s": round(time.perf_counter() - self.start, 1)}
        print(f"[{time.perf_counter() - self.start:6.0f}s] start {job.name}", flush=True)

    def _finish(self, job: Job, stop: bool) -> None:
        if stop:  # what it finished is on disk (checkpoint, journal); the next call resumes it
            job.process.terminate()
            try:
                job.process.wait(15)
            except subprocess.TimeoutExpired:
                job.process.kill()
                job.process.wait()
        out = (self.state / "logs" / f"{job.name}.out").read_text(errors="replace")
        record = self.results[job.name]
        record["wall_s"] = round(time.perf_counter() - job.started, 1)
        record["ended_at_s"] = round(time.perf_counter() - self.start, 1)
        returncode = job.process.returncode
        record["exit_status"] = returncode
        record["status"] = "stopped" if stop else "done" if returncode in job.results_codes else "failed"
        try:
            record["output"] = json.loads(out)
        except ValueError:
            record["output"] = out[-4000:]
        self.save()
        print(f"[{time.perf_counter() - self.start:6.0f}s] {record['status']:>10} {job.name} ({record['wall_s']} s)",
              flush=True)
        if self.out is not None:  # after every job, so that a call cut short still brings back what is done
            pack(self, self.out)


def _shown(argv: list[str], state: Path) -> str:
    """The command as the card cites it: ``python -m ...`` with the session's folders named, not spelt out."""
    text = " ".join(["python" if a == sys.executable else a for a in argv])
    return (text.replace(str(state / "data"), "<cifar10-batches>").replace(str(state / "assets"), "assets")
            .replace(str(state), "<state>").replace(str(ROOT) + "/", ""))


# --- the session's jobs ------------------------------------------------------------------------


def plan_training(session: Session, data_dir: Path) -> list[str]:
    """The training command, its attack steps and epochs fixed once (by a measured step) and stored for resuming."""
    plan_path = session.state / "run" / "plan.json"
    if not plan_path.exists():
        import torch

        from meansparse_core.training import seconds_per_step

        scale = session.scale
        images = scale.train_n or 50_000
        steps_per_epoch = -(-(images - scale.holdout) // scale.batch_size)
        args = argparse.Namespace(arch=MODEL, data="cifar10", eps=8.0, step_size=None, batch_size=scale.batch_size,
                                  lr=0.2, seed=0, device=scale.device, amp=True, recipe=RECIPE)
        measured = {}
        for steps in ATTACK_STEPS:
            args.attack_steps = steps
            measured[steps] = seconds_per_step(args, steps=2 if scale.tiny else 10)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the jobs run in their own processes
            # 1.1: the held-out curve (1,000 images, clean and PGD-10, two sets of weights) and the average
            epochs = int(scale.train_seconds / (1.1 * measured[steps] * steps_per_epoch))
            if epochs >= min(MIN_EPOCHS, scale.max_epochs):
                break
        plan = {"attack_steps": steps, "epochs": max(1, min(scale.max_epochs, epochs)),
                "seconds_per_step": measured, "steps_per_epoch": steps_per_epoch}
        plan_path.write_text(json.dumps(plan, indent=2) + "\n")
    plan = json.loads(plan_path.read_text())
    session.results["plan"] = plan
    session.save()
    argv = [sys.executable, "-m", "meansparse_core.training", "--arch", MODEL, "--data", "cifar10", "--recipe", RECIPE,
            "--holdout", str(session.scale.holdout),
            "--data-dir", str(data_dir), "--eps", "8", "--attack-steps", str(plan["attack_steps"]),
            "--epochs", str(plan["epochs"]), "--batch-size", str(session.scale.batch_size), "--lr", "0.2",
            "--seed", "0", "--amp", "--device", session.scale.device, "--run-dir", str(session.state / "run"),
            "--out", str(session.state / "assets" / MODEL), "--label", LABEL,
            "--time-limit", str(session.scale.train_seconds * 1.3 * session.scale.slack)]
    return argv + (["--train-n", str(session.scale.train_n)] if session.scale.train_n else [])


def chosen_alpha(results: dict) -> float:
    """The sweep's alpha by the project's rule (``accuracy_table.best_alpha``)."""
    from meansparse_core.accuracy_table import best_alpha

    rows = [{"alpha": r["alpha"], "clean": r["clean_acc"], "robust": r["robust_acc"]}
            for r in results["sweep"]["output"]]
    return best_alpha(rows)


def jobs(session: Session, data_dir: Path, train_argv: list[str]) -> list[Job]:
    s = session.scale
    cli = [sys.executable, "-m", "meansparse_core"]
    common = ["--model", KEY, "--data-dir", str(data_dir), "--device", s.device, "--json", "--batch-size",
              str(s.eval_batch)]
    full = ["--n", str(s.full_n)] if s.full_n else []
    card = ["--n", str(s.card_n)]
    pgd20 = ["--attack", "pgd", "--steps", "20", "--step", "2"]
    apgd = ["--attack", "apgd-ce", "--steps", str(s.apgd_steps)]
    square = ["--attack", "square", "--steps", str(s.square_queries)]

    def at_alpha(*rest: str) -> Callable[[dict], list[str]]:
        return lambda results: [*cli, "evaluate", *common, "--eps", "8", *rest, "--alpha", f"{chosen_alpha(results):g}"]

    def evaluate(name: str, *rest: str, limit: float = 90) -> Job:
        eps = [] if "--eps" in rest else ["--eps", "8"]
        return Job(name, [*cli, "evaluate", *common, *eps, *rest, "--alpha", "0"], limit, ("calibrate",), assets=True)

    return [
        Job("train", train_argv, s.train_seconds * 1.4, lanes=2),
        Job("tests_cuda", [sys.executable, "-m", "pytest", *DEVICE_TESTS, "-c", str(ROOT / "pyproject.toml"),
                           "--rootdir", str(ROOT), "-q", "-p", "no:cacheprovider",
                           "--device", s.device, "--junitxml", str(session.state / "logs" / "tests_cuda.xml")], 240,
            results_codes=(0, 1)),
        Job("calibrate", [*cli, "calibrate", "--model", KEY, "--data-dir", str(data_dir), "--device", s.device,
                          "--json", "--batch-size", "1000", "--out",
                          str(session.state / "assets" / f"{MODEL}.stats.pt")]
            + (["--n", str(s.calibrate_n)] if s.calibrate_n else []), 60, ("train",), assets=True),
        evaluate("clean_full", *full, "--attack", "fgsm", "--eps", "0"),
        evaluate("pgd20_full", *full, *pgd20),
        Job("sweep", [*cli, "sweep", *common, "--eps", "8", *card, *pgd20, "--alphas", s.alphas], 150, ("calibrate",),
            assets=True),
        evaluate("clean_500", "--n", str(s.card_n) if s.tiny else "500", "--attack", "fgsm", "--eps", "0", limit=30),
        Job("autoattack_sparse", at_alpha(*card, "--attack", "autoattack"), 300, ("sweep",), assets=True),
        evaluate("autoattack_base", *card, "--attack", "autoattack", limit=300),
        Job("apgd_bpda", at_alpha(*card, *apgd, "--grad", "straight-through"), 90, ("sweep",), assets=True),
        Job("apgd_sparse", at_alpha(*card, *apgd), 90, ("sweep",), assets=True),
        evaluate("apgd_base", *card, *apgd),
        evaluate("square_base", *card, *square, limit=120),
        Job("square_sparse", at_alpha(*card, *square), 120, ("sweep",), assets=True),
        Job("pgd20_full_sparse", at_alpha(*full, *pgd20), 90, ("sweep",), assets=True),
    ]


# --- device facts and packing ----------------------------------------------------------------


def environment() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "python": sys.version.split()[0],
            "gpu": torch.cuda.get_device_name() if cuda else "none", "cpus": os.cpu_count(),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def pack(session: Session, out: Path) -> None:
    """What comes back from the device (at most 8 files of 16 MiB): the bundle in parts, everything else in one archive."""
    out.mkdir(parents=True, exist_ok=True)
    bundle = [session.state / "assets" / f"{MODEL}{suffix}" for suffix in (".pt", ".json", ".stats.pt")]
    packed = io.BytesIO()
    with tarfile.open(fileobj=packed, mode="w") as tar:
        for path in bundle:
            if path.exists():
                tar.add(path, arcname=path.name)
    data = packed.getvalue()
    for old in out.glob("bundle.tar.*"):
        old.unlink()
    for number, start in enumerate(range(0, len(data), PART_BYTES)):
        (out / f"bundle.tar.{number}").write_bytes(data[start:start + PART_BYTES])
    with tarfile.open(out / "session.tar.gz", "w:gz") as tar:
        for name in ("results.json", "logs", "run/plan.json", "work/.cache/results", "results"):
            if (session.state / name).exists():
                tar.add(session.state / name, arcname=name)


def unpack_bundle(parts: Path, dest: Path) -> None:
    """The bundle's files (weights, manifest, statistics) from the ``bundle.tar.N`` parts in ``parts``, into ``dest``."""
    numbered = sorted(parts.glob("bundle.tar.*"), key=lambda p: int(p.suffix[1:]))
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in numbered))) as tar:
        tar.extractall(dest, filter="data")


def restore(session: Session, returned: Path) -> None:
    """On a fresh machine, start from what an earlier call sent back (files copied into ``returned``)."""
    if (session.state / "results.json").exists() or not (returned / "session.tar.gz").exists():
        return
    unpack_bundle(returned, session.state / "assets")
    with tarfile.open(returned / "session.tar.gz") as tar:
        tar.extractall(session.state, filter="data")
    session.results = json.loads(session.results_path.read_text())
    print(f"restored from {returned}: done {[k for k in session.results if session.done(k)]}", flush=True)


def card_rows(results: dict) -> str:
    """A draft of the card's measured rows (markdown) from a session's ``results.json``: every row names its command."""
    gpu = results.get("environment", {}).get("gpu", "none").replace("none", "the CPU")
    lines = ["| model | attack | N | accuracy | command (seconds on " + gpu + ") |", "|---|---|---|---|---|"]
    for name, record in results.items():
        output = record.get("output") if isinstance(record, dict) else None
        if not isinstance(output, dict) or "robust_acc" not in output:
            continue
        clean = output["attack"] == "fgsm" and output["eps"] == 0
        model = "base" if output["alpha"] == 0 else f"MeanSparse, alpha {output['alpha']:g}"
        attack = "clean" if clean else _attack_words(output)
        accuracy = output["clean_acc"] if clean else output["robust_acc"]
        lines.append(f"| {model} | {attack} | {output['n']:,} | {accuracy:.2%} | `{record['command']}` "
                     f"({output['seconds']:.0f} s) |")
    sweep = results.get("sweep", {}).get("output")
    if isinstance(sweep, list):
        lines += ["", f"Sweep (`{results['sweep']['command']}`); chosen alpha {chosen_alpha(results):g}:", "",
                  "| alpha | clean | PGD-20 |", "|---|---|---|"]
        lines += [f"| {r['alpha']:g} | {r['clean_acc']:.2%} | {r['robust_acc']:.2%} |" for r in sweep]
    env, plan = results.get("environment", {}), results.get("plan", {})
    lines += ["", f"Session: {env.get('gpu')}, PyTorch {env.get('torch')}, {env.get('date')}, cuDNN TF32 "
                  f"{env.get('cudnn_allow_tf32')}; plan {plan.get('attack_steps')} attack steps x {plan.get('epochs')} "
                  f"epochs (seconds per step measured: {plan.get('seconds_per_step')})"]
    for name in ("train", "calibrate"):
        if name in results:
            lines.append(f"- {name}: {results[name]['status']}, {results[name].get('wall_s')} s of the job "
                         f"(`{results[name]['command']}`)")
    if results.get("curve"):
        lines += ["", "Training curve (held-out training images: clean and PGD-10, raw and averaged weights):", "",
                  "| epoch | adversarial train acc. | raw clean | raw PGD-10 | average clean | average PGD-10 | s |",
                  "|---|---|---|---|---|---|---|"]
        for p in results["curve"]:
            raw, average = p.get("held_out_raw", {}), p.get("held_out_average", {})
            cells = [raw.get("clean"), raw.get("pgd10"), average.get("clean"), average.get("pgd10")]
            lines.append(f"| {p['epoch']} | {p['adversarial_train_accuracy']:.1%} | "
                         + " | ".join("" if c is None else f"{c:.1%}" for c in cells) + f" | {p['seconds']:.1f} |")
    tests = results.get("tests_cuda", {})
    if isinstance(tests.get("output"), str):
        lines += ["", f"tests_cuda ({tests['status']}): `{tests['command']}`", "",
                  "    " + tests["output"].strip().replace("\n", "\n    ")[-1500:]]
    return "\n".join(lines)


def _attack_words(output: dict) -> str:
    """A card's name for an evaluated attack: AutoAttack has no step count, Square counts queries and no gradients."""
    if output["attack"] == "autoattack":
        return f"AutoAttack (standard), {output['grad']} gradients"
    if output["attack"] == "square":
        return f"Square, {output['steps']:,} queries (no gradients)"
    return f"{output['attack']}, {output['steps']} steps, {output['grad']} gradients"


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def write_device_blocker(site: Path, wheels: Path) -> list[str]:
    """A ``sitecustomize`` in ``site`` that refuses every module the GPU machine would lack.

    Allowed: the packages in ``device_packages.txt``, the carried wheels and this project;
    every other distribution installed here has its top-level modules refused, so the CPU
    rehearsal fails where the device run would.
    """
    from importlib.metadata import distributions

    listed = (ROOT / "benchmarks" / "gpu" / "device_packages.txt").read_text().splitlines()
    allowed = {_normal(n) for n in listed if n and not n.startswith("#")} | {"meansparse-explorer"}
    allowed |= {_normal(w.name.split("-")[0]) for w in wheels.glob("*.whl")}
    provided: dict[str, set[str]] = {}
    for dist in distributions():
        tops = (dist.read_text("top_level.txt") or "").split()
        tops += [f.parts[0].removesuffix(".py") for f in dist.files or []
                 if f.parts and f.parts[0] != ".." and not f.parts[0].endswith((".dist-info", ".pth", ".data"))]
        provided.setdefault(_normal(dist.metadata["Name"] or ""), set()).update(t for t in tops if t.isidentifier())
    usable = set().union(*(tops for name, tops in provided.items() if name in allowed))
    blocked = sorted(set().union(*(tops for name, tops in provided.items() if name not in allowed)) - usable)
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(f'''"""Written by benchmarks/gpu/session.py: what the GPU machine lacks is refused here too."""
import sys

BLOCKED = {set(blocked)!r}


class NotOnTheDevice:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} on the GPU machine (carry it as a wheel)",
                                      name=name)
        return None


sys.meta_path.insert(0, NotOnTheDevice())
''')
    return blocked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, help="cifar10-jpeg.tar.gz")
    parser.add_argument("--state", type=Path, help="working folder, kept between calls")
    parser.add_argument("--out", type=Path, help="where the files that come back go")
    parser.add_argument("--returned", type=Path, help="files an earlier call sent back, for a fresh machine")
    parser.add_argument("--deadline", type=float, help="seconds this call may take (default: the scale's)")
    parser.add_argument("--train-seconds", type=float, help="training budget (default: the scale's, 270 s on a GPU)")
    parser.add_argument("--max-epochs", type=int, help="most epochs the plan may choose (default: the scale's, 40)")
    parser.add_argument("--tiny", action="store_true", help="CPU rehearsal at toy scale")
    parser.add_argument("--only", help="comma-separated job names: run these (if not done yet) and nothing else")
    parser.add_argument("--card", type=Path, metavar="RESULTS", help="only print the card's rows from a results.json")
    parser.add_argument("--write-blocker", type=Path, metavar="SITE",
                        help="only write SITE/sitecustomize.py, which refuses modules the device lacks, and stop")
    args = parser.parse_args(argv)
    if args.card:
        print(card_rows(json.loads(args.card.read_text())))
        return 0
    if args.write_blocker:
        blocked = write_device_blocker(args.write_blocker, ROOT / "carry" / "wheels")
        print(f"{len(blocked)} top-level modules refused: {', '.join(b for b in blocked if not b.startswith('_'))}")
        return 0
    if not (args.archive and args.state and args.out):
        parser.error("a session needs --archive, --state and --out")
    scale = TINY if args.tiny else GPU
    chosen = {"deadline": args.deadline, "train_seconds": args.train_seconds, "max_epochs": args.max_epochs}
    scale = replace(scale, **{k: v for k, v in chosen.items() if v})
    session = Session(args.state.resolve(), scale, args.out)
    if args.returned:
        restore(session, args.returned)
    session.results["environment"] = environment()
    data_dir = cifar_batches_from_archive(args.archive, session.state / "data")
    print(f"[{time.perf_counter() - session.start:6.0f}s] data ready in {data_dir}", flush=True)
    steps = jobs(session, data_dir, plan_training(session, data_dir) if not session.done("train") else [])
    if args.only:
        steps = [job for job in steps if job.name in args.only.split(",")]
    try:
        session.run(steps)
    finally:
        manifest = session.state / "assets" / f"{MODEL}.json"
        if manifest.exists():  # the curve travels in results.json, which --card reads
            session.results["curve"] = json.loads(manifest.read_text()).get("curve", [])
            session.save()
        pack(session, args.out)
    unfinished = [job.name for job in steps if not session.done(job.name)]
    print(json.dumps({"unfinished": unfinished, "seconds": round(time.perf_counter() - session.start)}))
    return 0 if not unfinished else 4


if __name__ == "__main__":
    sys.exit(main())
