#!/usr/bin/env bash
# The GPU checks in one run, for a machine with CUDA (the `device` tool's): tests, the lab, benchmarks, the suite.
#
#   OUT=some/dir bash tools/device_check.sh                  # every stage
#   OUT=some/dir STAGES="tests bench" bash tools/device_check.sh
#
# Stages: tests (tests/test_gpu.py), lab (normkit train --device cuda), bench (bench_variants --fused,
# bench_memory, bench_compile and bench_batchnorm on cuda), bench-lab (bench_lab on cuda), suite (all tests, pytest -n 12
# where pytest-xdist is installed). Without a CUDA device it stops at once (exit 2), installing nothing.
# Writes logs and benchmark tables under $OUT; each stage has its own time limit so one slow stage
# cannot eat the others' time. It installs normkit (editable, no dependencies) into the machine's
# python3 (else puts src/ on PYTHONPATH), which must already hold torch with CUDA, Triton and the
# test and lab packages.
set -u
OUT=${OUT:-device-out}
STAGES=${STAGES:-tests lab bench bench-lab suite}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stage() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }
wanted() { [[ " $STAGES " == *" $1 "* ]]; }

stage "machine"
# Without CUDA every stage fails (the benchmarks' own message goes to /dev/null with their stderr): say so
# once and stop, before installing anything.
if ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "tools/device_check.sh: python3's torch sees no CUDA device (or python3 has no torch); run it on a machine" \
       "with a GPU and a CUDA build of torch" >&2
  exit 2
fi
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(), 'triton', triton.__version__)"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || export PYTHONPATH=$PWD/src

if wanted tests; then
  stage "GPU tests"
  timeout 300 python3 -m pytest -q -p no:cacheprovider -rs --durations=5 tests/test_gpu.py 2>&1 \
      | tee "$OUT/test_gpu.log" | tail -30
fi

if wanted lab; then
  stage "the lab on the GPU (normkit train --device cuda)"
  timeout 90 python3 -m normkit.cli train --device cuda --no-tensorboard --out /tmp/lab-cuda 2>&1 | tr '\r' '\n' \
      | grep -v "it/s\]$" | tee "$OUT/train_cuda.log" | tail -8
  stage "the lab on the GPU, compiled (normkit train --device cuda --compile)"
  timeout 150 python3 -m normkit.cli train --device cuda --compile --no-tensorboard --out /tmp/lab-cuda-compiled 2>&1 \
      | tr '\r' '\n' | grep -v "it/s\]$" | tee "$OUT/train_cuda_compiled.log" | tail -8
fi

if wanted bench; then
  stage "bench_variants --device cuda --fused"
  timeout 180 python3 benchmarks/bench_variants.py --device cuda --fused --budget 1.2 --no-keras 2>/dev/null \
      | tee "$OUT/bench_variants_cuda.md"
  stage "bench_memory --device cuda --fused (kept for backward and peak allocated)"
  timeout 60 python3 benchmarks/bench_memory.py --device cuda --fused 2>/dev/null | tee "$OUT/bench_memory_cuda.md"
  stage "bench_compile --device cuda (torch.compile on the GPU: not measured yet)"
  timeout 240 python3 benchmarks/bench_compile.py --device cuda --budget 2 2>/dev/null | tee "$OUT/bench_compile_cuda.md"
  stage "bench_batchnorm --device cuda"
  timeout 150 python3 benchmarks/bench_batchnorm.py --device cuda --budget 1.2 ${BENCH_ONLY:+--only "$BENCH_ONLY"} \
      2>/dev/null | tee "$OUT/bench_batchnorm_cuda.md"
fi

if wanted bench-lab; then
  stage "bench_lab --device cuda"
  timeout 60 python3 benchmarks/bench_lab.py --device cuda --threads 1 --rounds 5 2>&1 | tee "$OUT/bench_lab_cuda.md"
fi

if wanted suite; then
  stage "the whole suite under this machine's torch (pytest -n 12)"
  # -n needs pytest-xdist, which normkit[dev] does not bring; without it pytest would refuse the option.
  workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 12" || echo "")
  [ -z "$workers" ] && echo "(pytest-xdist is not installed: one process, which may not finish in the stage's time)"
  timeout 240 python3 -m pytest -q -p no:cacheprovider $workers tests 2>&1 | tail -40 | tee "$OUT/suite.log"
fi
stage "done"
