#!/usr/bin/env bash
# The GPU demo model's whole run (training, statistics, its card's rows, the CUDA tests) on one
# lent GPU machine. How to run it, step by step: benchmarks/gpu/README.md.
#   bash benchmarks/gpu/session.sh prepare | tiny | device [seconds] [session.py options] | unpack FOLDER
set -euo pipefail
cd "$(dirname "$0")/../.."
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
    python benchmarks/gpu/session.py --write-blocker "$work/site"
    PYTHONPATH="$work/site" python benchmarks/gpu/session.py --tiny --archive carry/cifar10-jpeg.tar.gz \
        --state "$work/state" --out "$work/out"
    ;;
unpack)  # what the device sent back (FOLDER): the bundle into meansparse_core/assets/, the session into carry/session
    python -c "import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks/gpu')
from session import unpack_bundle; unpack_bundle(Path(sys.argv[1]), Path('meansparse_core/assets'))" "$2"
    mkdir -p carry/session && tar -xzf "$2/session.tar.gz" -C carry/session
    ls -la meansparse_core/assets/cifar-preact-resnet18.* carry/session
    ;;
device)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site carry/wheels/*.whl
    export PYTHONPATH=/tmp/site
    python3 benchmarks/gpu/session.py --archive carry/cifar10-jpeg.tar.gz --state carry/gpu --out "$OUT" \
        --returned carry/returned --deadline "${2:-560}" "${@:3}" 2>&1 | tee "$OUT/session.log"
    ;;
*)
    echo "usage: bash benchmarks/gpu/session.sh prepare | tiny | device [seconds] | unpack FOLDER" >&2
    exit 2
    ;;
esac
