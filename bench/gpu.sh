#!/usr/bin/env bash
# The GPU throughput set, in one go, on a machine with a CUDA GPU (no network needed).
#
#   bash bench/gpu.sh OUTDIR        # from the repository root; writes OUTDIR/throughput-gpu.json
#
# Needs torch with CUDA, torch-geometric, timm, h5py, scipy, pandas, pillow, scikit-learn, tqdm and
# click; hgc need not be installed (PYTHONPATH=. is set here). DGL, FAISS and anndata may be
# missing. Encoder forward passes use random weights (same compute as the real ones; the JSON says
# "weights": "random"); `hgc embed` end to end needs real slides and is in the CPU set only.
# No real data is needed.
# The stages stop themselves within their budgets (about 5 minutes in all); the JSON is rewritten
# after every stage, so even an interrupted run leaves the figures measured so far.
set -euo pipefail
OUT=${1:?usage: bash bench/gpu.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>&1 || true
PY=${PYTHON:-$(command -v python || command -v python3)}
"$PY" bench/machine.py > "$OUT/machine.json"
timeout 450 "$PY" bench/throughput.py --set gpu --out "$OUT/throughput-gpu.json" 2>&1 | tee "$OUT/throughput-gpu.log"
