#!/usr/bin/env bash
# Every check that needs a GPU, as one command for a lent device machine: the CUDA tests, the GPU tables of
# benchmarks/scale.py (prediction, bare forward, collection, tracing at 128/1024/8192 feature nodes and
# 100/200/400 genes on the 410m shape) and transcoder training against sparsify on the 410m shape (width 16384,
# k 64). Run from the repository root, with ../shared/wheels-py312 copied into .whl/ (listed in
# .git/info/exclude) and carried:
#
#     run(command="bash benchmarks/gpu_checks.sh", carry=[".whl"], timeout_s=540)
#
# Tables are printed and kept under $OUT (or /tmp/gpu_checks). On a CPU it runs the same steps (the CUDA tests are
# skipped); SCALE_ARGS="--tiny --cells 8 --trace-nodes 128 --trace-genes 100" and
# TRAIN_ARGS="--model tiny --cells 40 --layer 2 --tokens 20000 --repeats 1" keep that short.
set -uo pipefail
out=${OUT:-/tmp/gpu_checks}
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" \
    | tee "$out/device.txt"
timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/circuits/test_replacement.py 2>&1 \
    | tail -5 | tee "$out/gpu_tests.txt"
# shellcheck disable=SC2086  # SCALE_ARGS is a list of arguments
timeout 240 python3 benchmarks/scale.py ${SCALE_ARGS:---cells 256 --trace-nodes 128 1024 8192 --trace-genes 100 200 400} \
    2>&1 | grep -v "it/s\]" | tee "$out/scale.txt"
# shellcheck disable=SC2086
timeout 180 python3 benchmarks/train_throughput.py \
    ${TRAIN_ARGS:---model 410m --layer 12 --width 16384 --k 64 --device cuda --cells 320 --tokens 2000000 --repeats 2} \
    2>&1 | grep -v "it/s\]" | tee "$out/train.txt"
