#!/usr/bin/env bash
# B6 on a lent GPU machine: see benchmarks/gpu/README.md. Run from the repository root.
#   bash benchmarks/gpu/b6.sh tiny               # CPU rehearsal, toy scale (a few minutes on 2 cores)
#   bash benchmarks/gpu/b6.sh device [seconds]   # on the GPU machine; results to $OUT and carry/b6-state
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
tiny)
    python benchmarks/gpu/b6.py --tiny --deadline 3600 --state "${TMPDIR:-/tmp}/b6-tiny" \
        --out "${TMPDIR:-/tmp}/b6-tiny/b6-tiny.json"
    ;;
device)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site carry/wheels/*.whl
    export PYTHONPATH=/tmp/site
    mkdir -p carry/b6-state
    out="carry/b6-state/b6-$(date -u +%F).json"
    # A fresh machine resumes from the JSON an earlier call brought back (copied into carry/returned/).
    if [ ! -e "$out" ] && ls carry/returned/b6-*.json >/dev/null 2>&1; then cp "$(ls carry/returned/b6-*.json | tail -1)" "$out"; fi
    python3 benchmarks/gpu/b6.py --archive carry/cifar10-jpeg.tar.gz --state carry/b6-state --out "$out" \
        --deadline "${2:-540}" 2>&1 | tee "$OUT/b6.log"
    cp "$out" "$OUT/"
    ;;
*)
    echo "usage: bash benchmarks/gpu/b6.sh tiny | device [seconds]" >&2
    exit 2
    ;;
esac
