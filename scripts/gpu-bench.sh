#!/usr/bin/env bash
# GPU benchmark in one run (issue 15): models/hour of the 70-epoch LargeMLP Fashion-MNIST trial for the
# reference-shaped loop, the engine, Tune packing at 0.25 GPU per trial and bundles of K = 8, 32, 128; peak
# GPU memory per bundle; projected wall time of paper-mlp (G1) and paper-fashion on this one GPU. Under
# 8 minutes on one current GPU. Usage, from the project root:
#
#   scripts/gpu-bench.sh                      # uses $PYTHON if set, else .venv/bin/python, else python3
#   scripts/gpu-bench.sh --data-dir DIR       # extra arguments go to `study bench --only gpu`
#
# Needs torch with CUDA, ray, and Fashion-MNIST (the usual places, see `study doctor`). Without a GPU it
# runs the same code on the CPU and says so (that is how tests/test_bench.py runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
"$PY" - <<'PYEOF'
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, torch {torch.__version__}")
else:
    print(f"device: no CUDA GPU visible (torch {torch.__version__}); the figures below are the CPU's")
PYEOF
start=$(date +%s)
"$PY" -m study.cli bench --only gpu --bundle-sizes 8,32,128 --bundle-epochs 2 "$@"
echo "gpu-bench: $(( $(date +%s) - start )) s"
