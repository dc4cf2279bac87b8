"""B1b: should evaluation's forward-only passes (clean accuracy, the live set) use the sparsified model
compiled whole (``compiled.CompiledModel``, alpha a tensor input) instead of the library's eager path?

Runs two new processes one after the other, sharing a fresh Inductor cache folder (the first process
fills it, the second finds it warm). Each loads the demo model and ``--n`` CIFAR-10 test images
(sampled with seed 0, as ``evaluate`` samples them) and scores them at ``--alpha`` in batches of
``--batch``: eagerly, then compiled (the first compiled pass includes compiling), then a second
compiled pass at another alpha (reuses the compiled code), then eager and compiled timed again.
It prints what each process pays, and how far compiled logits are from eager ones: the largest
difference, how many logits differ at all, and how many predictions change.

    python benchmarks/b1_compiled_model.py --data-dir /tmp/cifar/cifar10-jpeg [--n 500] [--batch 100]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

START = time.perf_counter()

import torch  # noqa: E402  (timed from the start of the process)

from common import arguments, demo_cifar, save  # noqa: E402


def child(data_dir: str, n: int, batch: int, alpha: float) -> dict:
    from meansparse_core import attach
    from meansparse_core.compiled import CompiledModel
    from meansparse_core.data import load_dataset, load_items, sample_indices

    model, stats = demo_cifar()
    dataset = load_dataset("cifar10", "test", data_dir, fetch=False)
    images, labels = load_items(dataset, sample_indices(len(dataset), n, 0))
    batches = images.split(batch)
    sparse = attach(model, stats)
    ready = time.perf_counter() - START

    def timed(score) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        with torch.no_grad():
            logits = torch.cat([score(b) for b in batches])
        return time.perf_counter() - start, logits

    eager_s, eager = timed(lambda b: sparse(b, alpha))
    compiled = CompiledModel(sparse)
    first_s, fast = timed(lambda b: compiled(b, alpha))
    other_alpha_s, _ = timed(lambda b: compiled(b, alpha + 0.05))
    eager_again_s, _ = timed(lambda b: sparse(b, alpha))
    compiled_again_s, _ = timed(lambda b: compiled(b, alpha))
    return {"ready_s": ready, "eager_s": eager_s, "compiled_first_pass_s": first_s,
            "compiled_other_alpha_s": other_alpha_s, "eager_again_s": eager_again_s,
            "compiled_again_s": compiled_again_s, "process_s": time.perf_counter() - START,
            "max_abs_logit_difference": (fast - eager).abs().max().item(),
            "logits_differing": int((fast != eager).sum()), "logits": fast.numel(),
            "predictions_changed": int((fast.argmax(1) != eager.argmax(1)).sum()),
            "accuracy_eager": (eager.argmax(1) == labels).float().mean().item(),
            "accuracy_compiled": (fast.argmax(1) == labels).float().mean().item()}


def main() -> None:
    parser = arguments(__doc__, rounds=1)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.25)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.data_dir, args.n, args.batch, args.alpha)))
        return
    runs = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for which in ("first process", "second process"):
            out = subprocess.run([sys.executable, __file__, "--child", "--data-dir", args.data_dir, "--n", str(args.n),
                                  "--batch", str(args.batch), "--alpha", str(args.alpha)],
                                 env=env, check=True, capture_output=True, text=True).stdout
            runs[which] = json.loads(out.strip().splitlines()[-1])
    for which, r in runs.items():
        print(f"{which}: ready {r['ready_s']:.1f} s; eager {r['eager_s']:.2f} s (again {r['eager_again_s']:.2f} s); "
              f"compiled first pass {r['compiled_first_pass_s']:.1f} s, at another alpha "
              f"{r['compiled_other_alpha_s']:.2f} s, again {r['compiled_again_s']:.2f} s; whole process "
              f"{r['process_s']:.1f} s")
        print(f"  logits: {r['logits_differing']} of {r['logits']} differ, largest by "
              f"{r['max_abs_logit_difference']:.2e}; predictions changed: {r['predictions_changed']}; accuracy "
              f"eager {r['accuracy_eager']:.1%}, compiled {r['accuracy_compiled']:.1%}")
    save("b1_compiled_model", {"n": args.n, "batch": args.batch, "alpha": args.alpha, "runs": runs,
                               "load_average": os.getloadavg()})


if __name__ == "__main__":
    main()
