#!/usr/bin/env bash
# The one command for the GPU machine: builds the compiled extensions in place, then runs every phase of
# benchmarks/gpu_check.py, each with its own time limit, under 8 minutes cold on an H100.
#
#   bash scripts/gpu_check.sh                        # everything; results in $OUT (default ./gpu-check-out)
#   bash scripts/gpu_check.sh --phases decode,hf     # a subset
#   bash scripts/gpu_check.sh --phases variants,llama --resume FIRST/gpu-results.json   # add to an earlier run
#   bash scripts/gpu_check.sh --phases quant         # weight-only int8/int4 alone (three 8B compiles: its own run)
#   bash scripts/gpu_check.sh --smoke                # CPU, tiny sizes: what tests/test_gpu_check.py runs
#
# Writes $OUT/gpu-results.json, $OUT/gpu-check.log and $OUT/profile.txt. Runs from the checkout with
# PYTHONPATH=. (no install: the package's dependencies include bittensor, which the GPU machine lacks). Needs
# torch, transformers, tokenizers and numpy; Cython and setuptools for the compiled stream loop (without them
# the pure-Python twin runs, and the log says so). Wheels of anything else, carried in .whl/, are installed
# first, offline (see /work/.library/device/README.md on producing them): the gguf phase needs gguf's,
# `pip download --no-deps gguf -d .whl` (pure Python). PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export GPU_CHECK_COMMAND="bash scripts/gpu_check.sh $*"
python="${PYTHON:-python3}"
log="$out/gpu-check.log"
: >"$log"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/minercore-wheels .whl/*.whl 2>&1 | tee -a "$log"
    export PYTHONPATH="$PYTHONPATH:/tmp/minercore-wheels"
fi
echo "== build: compiled stream loop and int4 row kernel, in place" | tee -a "$log"
"$python" setup.py -q build_ext --inplace >>"$log" 2>&1 || echo "build failed: the pure-Python twin runs" | tee -a "$log"
"$python" -c "import minercore.text.streamloop as s; print('stream loop:', s.IMPLEMENTATION)" 2>&1 | tee -a "$log"
exec "$python" benchmarks/gpu_check.py --out "$out" "$@"
