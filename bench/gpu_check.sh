#!/usr/bin/env bash
# The GPU check (issues #9 and #18) on one lent H100, in one call of the device tool (about 5
# minutes, at most 9):
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=570)
# Every part of bench/gpu_check.py runs in its own process under a time limit, so one that
# fails or hangs leaves the others' results. Under $OUT: log.txt, env.json, loss.json,
# train_bf16.json, train_fp8.json, gpu_path.json, results.json (all parts) and table.md.
#
# `bash bench/gpu_check.sh --smoke` runs every part at tiny sizes on a CPU in one process
# (tests/test_gpu_check.py), with $PYTHON (default python3) and $OUT (default a new temp dir).
#
# Wheels: the GPU image's python3 is 3.12 with torch, triton and every dependency of this
# package except megatron-core, which travels as a wheel in .whl/ (git-ignored). Once, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
#     -d .whl megatron-core==0.16.1
# (2.6 MB; it needs torch, numpy and packaging, which the image has). Transformer Engine is
# not in the image and cannot travel as a wheel (its PyTorch extension builds against the
# local torch and CUDA), so without it the FP8 part reports itself skipped with the reason.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
# Each part of bench/gpu_check.py with its time limit in seconds: 530 in all.
LIMITS="env:40 loss:80 train-bf16:180 train-fp8:100 gpu-path:100 table:30"
mkdir -p "$OUT"
echo "results in $OUT"
if [ "${1:-}" = --smoke ]; then
  exec "$PY" bench/gpu_check.py --smoke --out "$OUT" $(echo "$LIMITS" | sed 's/:[0-9]*//g')
fi

ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/*.whl: see the top of $0"; exit 1; }
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
# NVTE_DEBUG: Transformer Engine, where present, logs which attention backend it selected.
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 \
  | tee "$OUT/log.txt"
status=0
# A training part starts no timed round that would end in its last 40 seconds (imports come
# before its clock starts; tearing down and writing results after).
for spec in $LIMITS; do
  part=${spec%:*} limit=${spec#*:} budget=()
  case $part in train-*) budget=(--budget-s $((limit - 40))) ;; esac
  timeout -k 5 "$limit" "$PY" bench/gpu_check.py --out "$OUT" ${budget[@]+"${budget[@]}"} \
    "$part" 2>&1 | tee -a "$OUT/log.txt" || status=1
done
grep -m 4 -E "Selected backend|Available backends" "$OUT/log.txt"
exit $status
