"""Every benchmark script still runs and prints its table (smoke runs; timings are never asserted in tests).

The scripts are not imported by anything else, so without this a change in normkit could break one
unnoticed until the next measurement."""

import subprocess
import sys

import pytest
import torch

import normkit

from benchmark_scripts import BENCHMARKS, load_script as _load

RUNS = {
    "bench_batchnorm.py": ["--quick", "--only", "(64,120)"],
    "bench_sample_norms.py": ["--quick", "--only", "LayerNorm(120)"],
    "bench_variants.py": ["--quick", "--no-keras", "--only", "(64,120)"],
    "bench_op_floor.py": ["--budget", "0.3", "--no-fused"],
    "bench_compile.py": ["--budget", "0.3", "--shapes", "64,120"],
    "bench_lab.py": ["--rounds", "1", "--steps", "2", "--threads", "1"],
    "bench_memory.py": ["--only", "renorm"],
}


# --only as docs/benchmarks.md writes it: a shape with or without spaces.
SPACED = {
    "bench_sample_norms.py": ["--quick", "--only", "LayerNorm(120) (64, 120)"],
    "bench_batchnorm.py": ["--quick", "--only", "(64, 120)"],
}


def test_every_script_has_a_smoke_run():
    assert sorted(RUNS) == sorted(path.name for path in BENCHMARKS.glob("bench_*.py"))


@pytest.mark.parametrize("script, arguments", sorted(RUNS.items()) + [
    pytest.param(script, arguments, id=f"{script}-spaced") for script, arguments in sorted(SPACED.items())])
def test_benchmark_prints_its_table(script, arguments):
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *arguments], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("|")]
    assert len(rows) >= 3 and set(rows[1]) <= set("|-"), done.stdout  # a header, its rule, at least one row
    assert "torch " in done.stdout  # (the machine line names torch's version)


@pytest.mark.parametrize("flags", [["--no-fused"], []])
def test_op_floor_s_normkit_rows_run_without_the_kernel_whatever_the_default(cpp_kernel, flags):
    """A cached build turns the fused kernel on at import: the ``normkit_*`` rows must still be ATen's paths
    (with --no-fused they used to run the kernel under the name of normkit without it)."""
    floor = _load("bench_op_floor.py")
    contenders = floor.build_contenders(floor.parse_arguments(["--shape", "16,3", "--virtual", "4", *flags]))
    seen = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: seen.append(cpp_kernel.enabled("cpu")) if isinstance(module, normkit.BatchNorm) else None)
    try:
        for name, step in contenders.items():
            seen.clear()
            step()
            assert seen == ([] if not name.startswith("normkit") else [name.endswith("_fused")]), name
    finally:
        hook.remove()
    assert cpp_kernel.enabled("cpu")  # (the process default, back after each step)
    assert sorted(name for name in contenders if name.endswith("_fused")) == (
        [] if flags else ["normkit_ghost_fused", "normkit_renorm_fused"])
