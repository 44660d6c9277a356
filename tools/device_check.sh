#!/usr/bin/env bash
# The GPU checks in one run, for a machine with CUDA (the `device` tool's): tests, benchmarks, the lab, the suite.
#
#   OUT=some/dir bash tools/device_check.sh
#
# Writes its logs and benchmark tables under $OUT; each stage has its own time limit so one slow
# stage cannot eat the others' time. It installs normkit (editable, no dependencies) into the
# machine's python3 (else puts src/ on PYTHONPATH), which must already hold torch with CUDA and the test and lab packages.
set -u
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stage() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }

stage "machine"
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || export PYTHONPATH=$PWD/src

stage "GPU tests"
timeout 180 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" | tail -25

stage "the lab on the GPU (normkit train --device cuda)"
timeout 90 python3 -m normkit.cli train --device cuda --no-tensorboard --out /tmp/lab-cuda 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" \
    | tee "$OUT/train_cuda.log" | tail -8

stage "bench_batchnorm --device cuda"
timeout 150 python3 benchmarks/bench_batchnorm.py --device cuda --budget 1.5 2>/dev/null | tee "$OUT/bench_batchnorm_cuda.md"

stage "bench_variants --device cuda"
timeout 120 python3 benchmarks/bench_variants.py --device cuda --budget 1.5 --no-keras 2>/dev/null \
    | tee "$OUT/bench_variants_cuda.md"

stage "bench_lab --device cuda"
timeout 60 python3 benchmarks/bench_lab.py --device cuda --threads 1 --rounds 5 2>&1 | tee "$OUT/bench_lab_cuda.md"

stage "the whole suite under this machine's torch (pytest -n 12)"
timeout 150 python3 -m pytest -q -p no:cacheprovider -n 12 tests 2>&1 | tail -40 | tee "$OUT/suite.log"
stage "done"
