#!/usr/bin/env bash
# Issue 20's GPU session in one or two device calls; the time budget of every step is in
# benchmarks/gpu_session.py's docstring. Run from the repository root.
#
# 1. Here, once (needs the package registry), then the CPU rehearsal (about 10 minutes on 2 cores):
#      bash benchmarks/gpu_session.sh prepare   # wheels -> carry/wheels, CIFAR-10 archive -> carry/ (git-ignored)
#      bash benchmarks/gpu_session.sh tiny      # everything at toy scale on the CPU, device packages only
# 2. Device call 1, with the device tool's run:
#      command:   bash benchmarks/gpu_session.sh device 560
#      carry:     ["carry/wheels", "carry/cifar10-jpeg.tar.gz", "carry/returned"]
#      timeout_s: 590
#    Its last line is {"unfinished": [...], ...}; $OUT brings back bundle.tar (weights, manifest,
#    statistics), session.tar.gz (results.json, logs, CLI result cache, B1/B3 JSON) and session.log.
# 3. If "unfinished" is empty, call give_back. Otherwise call 2 AT ONCE (the machine stays warm for
#    30 s; a warm machine keeps carry/gpu, so the jobs resume where they stopped), with the seconds
#    left: the status tool's budget_left_s minus 60 (start-up and packing), at most 560:
#      command:   bash benchmarks/gpu_session.sh device <seconds>
#      same carry, timeout_s = <seconds> + 30
#    If the machine went cold in between, first copy call 1's bundle.tar and session.tar.gz
#    (from files_at) into carry/returned/: the fresh machine starts from them (a training run
#    stopped mid-way restarts, since its checkpoint is too big to come back).
#    Extra arguments after the seconds go to gpu_session.py: a session that should train longer
#    than 270 s (the first run, 2026-11-26 on an H200, fitted 40 epochs of PGD-5 into 197 s and its
#    adversarial training accuracy was still rising) gives e.g. `device 590 --train-seconds 420
#    --max-epochs 80` in call 1 and leaves the evaluations to call 2.
# 4. Here: unpack bundle.tar into assets/ and session.tar.gz anywhere; draft the card's rows with
#      python benchmarks/gpu_session.py --card <unpacked>/results.json
#    then write assets/cifar-resnet9-w64.md, measure its CPU speed (benchmarks/b5_interactivity.py),
#    and add its clean-accuracy check on the 500-image subset to tests/test_bundled_models.py.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(robustbench==1.1.1 pyautoattack==0.2.0 geotorch==0.4.0 gdown==5.1.0 beautifulsoup4==4.15.0 soupsieve==4.1.3)
case "${1:-}" in
prepare)
    mkdir -p carry/wheels carry/returned
    python -m pip download -q --no-deps --only-binary=:all: -d carry/wheels "${WHEELS[@]}"
    # pyautoattack's wheel holds 45 MB of example weights that no attack reads: drop them, so
    # everything carried stays under the tool's 64 MiB.
    python - <<'PY'
import zipfile
from pathlib import Path
wheel = next(Path("carry/wheels").glob("pyautoattack-*.whl"))
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if "/examples/" in item.filename:
            continue
        data = src.read(item)
        if item.filename.endswith("/RECORD"):
            data = b"\n".join(line for line in data.split(b"\n") if b"/examples/" not in line)
        dst.writestr(item, data)
slim.replace(wheel)
PY
    cp "${MEANSPARSE_SHARED_DATASETS:-../shared/datasets}/cifar10-jpeg.tar.gz" carry/
    du -sh carry/wheels carry/cifar10-jpeg.tar.gz
    ;;
tiny)
    work="${TMPDIR:-/tmp}/gpu-session-tiny"
    rm -rf "$work/site" && mkdir -p "$work"
    python -m pip install -q --no-index --no-deps --no-compile --target "$work/site" carry/wheels/*.whl
    python benchmarks/gpu_session.py --write-blocker "$work/site"
    PYTHONPATH="$work/site" python benchmarks/gpu_session.py --tiny --archive carry/cifar10-jpeg.tar.gz \
        --state "$work/state" --out "$work/out"
    ;;
device)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site carry/wheels/*.whl
    export PYTHONPATH=/tmp/site
    python3 benchmarks/gpu_session.py --archive carry/cifar10-jpeg.tar.gz --state carry/gpu --out "$OUT" \
        --returned carry/returned --deadline "${2:-560}" "${@:3}" 2>&1 | tee "$OUT/session.log"
    ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh prepare | tiny | device [seconds]" >&2
    exit 2
    ;;
esac
