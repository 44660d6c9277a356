#!/usr/bin/env python
"""Compile normkit's Triton kernels for a GPU architecture on a machine without one (Triton's compiler and ptxas need no GPU).

    python tools/triton_compile_check.py [--arch 90] [--all]

The interpreter (TRITON_INTERPRET=1, how the tests run the kernels without a GPU) accepts code
that the compiler rejects (types that do not unify, constexpr misuse); this catches those. By
default a set of variants that together use every branch; ``--all`` compiles every combination
of flags for each dtype pairing (about 700 variants, several minutes).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import warnings

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("tools/triton_compile_check.py compiles the kernels: unset TRITON_INTERPRET")

try:
    import triton  # noqa: E402
except ImportError as error:
    sys.exit(f"tools/triton_compile_check.py needs Triton ({error}): pip install -e \".[dev]\" (Linux)")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
from normkit.kernels import triton_batch_norm as kernels  # noqa: E402

DTYPES = [("fp32", "fp32"), ("fp64", "fp64"), ("fp16", "fp32"), ("bf16", "fp32")]
FORWARD_FLAGS = ["STRIDED", "HAS_MASK", "HAS_WEIGHT", "HAS_BIAS", "RENORM", "UPDATE", "UNBIASED"]
BACKWARD_FLAGS = ["STRIDED", "HAS_MASK", "HAS_WEIGHT", "NEED_INPUT", "NEED_WEIGHT", "NEED_BIAS"]
SETTINGS = ["factor", "renorm_factor", "rmin", "rmax", "dmax", "eps"]


def forward_signature(x, p):
    signature = {"x_ptr": f"*{x}", "y_ptr": f"*{x}", "valid_ptr": "*i1", "weight_ptr": f"*{p}", "bias_ptr": f"*{p}",
                 "running_mean_ptr": f"*{p}", "running_var_ptr": f"*{p}", "renorm_mean_ptr": f"*{p}",
                 "renorm_stddev_ptr": f"*{p}", "moving_stddev_ptr": f"*{p}", "stats_ptr": "*fp64", "rd_ptr": "*fp64",
                 "G": "i32", "NG": "i32", "R": "i32", "C": "i32", "S": "i32"}
    for name in SETTINGS:
        signature[name] = signature[f"{name}_lo"] = "fp32"
    return signature


def backward_signature(x, p):
    return {"x_ptr": f"*{x}", "grad_ptr": f"*{x}", "valid_ptr": "*i1", "weight_ptr": f"*{p}", "stats_ptr": "*fp64",
            "rd_ptr": "*fp64", "grad_input_ptr": f"*{x}", "grad_weight_ptr": f"*{p}", "grad_bias_ptr": f"*{p}",
            "G": "i32", "NG": "i32", "R": "i32", "C": "i32", "S": "i32"}


def variants(flags, every):
    if every:
        return list(itertools.product([0, 1], repeat=len(flags)))
    # All on, all off, and each flag alone off: every branch compiled both ways.
    return [tuple([1] * len(flags)), tuple([0] * len(flags))] + [
        tuple(0 if i == j else 1 for i in range(len(flags))) for j in range(len(flags))]


def compile_all(arch: int, every: bool) -> int:
    target = GPUTarget("cuda", arch, 32)
    count = 0
    for (x, p), (kernel, signature, flags) in itertools.product(DTYPES, [
            (kernels._forward_kernel, forward_signature, FORWARD_FLAGS),
            (kernels._backward_kernel, backward_signature, BACKWARD_FLAGS)]):
        for values in variants(flags, every):
            constants = dict(zip(flags, values), BLOCK=kernels.BLOCK)
            full = {**signature(x, p), **{name: "constexpr" for name in constants}}
            triton.compile(ASTSource(fn=kernel, signature=full, constexprs=constants), target=target)
            count += 1
    return count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90: Hopper)")
    parser.add_argument("--all", action="store_true", help="every flag combination, not only the covering set")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    count = compile_all(args.arch, args.all)
    print(f"compiled {count} kernel variants for sm_{args.arch} with Triton {triton.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
