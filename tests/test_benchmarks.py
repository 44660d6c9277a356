"""Every benchmark script still runs and prints its table (smoke runs; timings are never asserted in tests).

The scripts are not imported by anything else, so without this a change in normkit could break one
unnoticed until the next measurement."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

RUNS = {
    "bench_batchnorm.py": ["--quick", "--only", "(64,120)"],
    "bench_sample_norms.py": ["--quick", "--only", "LayerNorm(120)"],
    "bench_variants.py": ["--quick", "--no-keras", "--only", "(64,120)"],
    "bench_op_floor.py": ["--budget", "0.3", "--no-fused"],
    "bench_compile.py": ["--budget", "0.3", "--shapes", "64,120"],
    "bench_lab.py": ["--rounds", "1", "--steps", "2", "--threads", "1"],
    "bench_memory.py": ["--only", "renorm"],
}


def test_every_script_has_a_smoke_run():
    assert sorted(RUNS) == sorted(path.name for path in BENCHMARKS.glob("bench_*.py"))


@pytest.mark.parametrize("script", sorted(RUNS))
def test_benchmark_prints_its_table(script):
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *RUNS[script]], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("|")]
    assert len(rows) >= 3 and set(rows[1]) <= set("|-"), done.stdout  # a header, its rule, at least one row
    assert "torch " in done.stdout  # (the machine line names torch's version)
