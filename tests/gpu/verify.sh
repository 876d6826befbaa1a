#!/usr/bin/env bash
# The GPU verification run (issue 19): on a machine with an NVIDIA GPU, from a fresh checkout, in under 8 minutes.
#   bash tests/gpu/verify.sh [OUT_DIR]      (default: gpu-report/)
# Writes OUT_DIR/report.json and OUT_DIR/report.md (tests/gpu/verify.py says what is in them): which backends ran,
# were absent or failed, engine build times, sparse kernels per layer, accuracy against the CPU reference, faces/s
# at batch 1/8/32/128 (dense alone, dense + quality), GPU memory; with neither TensorRT nor onnxruntime-gpu, the
# branch's GEMMs with PyTorch's 2:4 semi-structured sparse tensors. Exit 0 when nothing failed (absent is fine),
# 1 when a check failed, 124 on the time limit.
#
# Python: $PYTHON if set, else .venv/bin/python if the checkout has one, else a virtual environment made here
# with --system-site-packages (so the machine's PyTorch, CuPy, TensorRT, pycuda stay visible) and bestshot
# installed into it without its dependencies where the system already has them; the install's outcome is logged.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-gpu-report}
LIMIT_S=${VERIFY_LIMIT_S:-450}   # leaves the environment set-up its share of the 8 minutes
mkdir -p "$OUT"
if [[ -n "${PYTHON:-}" ]]; then
  PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
else
  python3 -m venv --system-site-packages .venv-gpu
  PY=.venv-gpu/bin/python
  # Online: bestshot and its dependencies (the `cpu` extra only where no onnxruntime is there yet). Offline: the
  # system's packages; whatever is missing shows as an absent or failed check in the report.
  extra=$("$PY" -c 'import onnxruntime' 2>/dev/null && echo "" || echo "[cpu]")
  timeout 240 "$PY" -m pip install -q -e ".${extra}" >"$OUT/install.log" 2>&1 \
    || timeout 120 "$PY" -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/install.log" 2>&1 \
    || echo "pip install failed (offline?): using the system's packages, see $OUT/install.log" >&2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout "$LIMIT_S" "$PY" tests/gpu/verify.py --out "$OUT"
rc=$?
echo "report: $OUT/report.json $OUT/report.md (exit $rc)" >&2
exit $rc
