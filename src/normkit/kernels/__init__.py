"""Optional fused kernels for BatchNorm's training step: C++ for the CPU (compiled on first use), Triton for CUDA.

Small inputs with renorm, ghost batches or a padding mask spend their time launching a dozen
small ATen operations, not on data (benchmarks/bench_op_floor.py). ``fused_batch_norm.cpp``
does the whole training step (statistics, renorm's r and d, normalization, every running
buffer) in one C++ call and its backward in another, with autograd in C++. It is compiled
for the machine it runs on (``-march=native``), which is what makes its loops as fast as
ATen's hand-vectorized ones; inputs over ``functional.fused_max_numel()`` values keep ATen's
multi-threaded path. It takes renorm, ghost batches, padding masks and Keras' biased running
variance, and plain training of features-last inputs of rank 4/5 (docs/decisions.md, "How a
call executes").

It is opt-in because it compiles C++ (about a minute, once; cached by torch in
``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) and needs a C++ compiler,
the Python headers and ``ninja`` (``pip install "normkit[fused]"``)::

    import normkit.kernels
    normkit.kernels.enable()      # builds or loads the kernel; raises if it cannot
    ...                           # those calls on CPU now take the fused path
    normkit.kernels.disable()

On CUDA tensors the same calls take ``triton_batch_norm.py``'s Triton kernels instead (Triton comes
with CUDA builds of torch; without it CUDA calls keep ATen's path). Plain BatchNorm on a GPU always
keeps torch.nn's CUDA kernels (cuDNN's or ATen's).

``enable(cpu=False)`` switches on the CUDA kernels alone, compiling nothing up front.
``NORMKIT_FUSED_KERNELS=1`` in the environment enables the kernels when normkit is imported, and
``NORMKIT_FUSED_KERNELS=cuda`` the CUDA kernels alone (a build failure then warns instead of
raising). Without it every path is ATen's, as before; both compute the same function
(tests/test_kernels.py compares them and the NumPy reference).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import warnings
from pathlib import Path

import torch


_SOURCE = Path(__file__).with_name("fused_batch_norm.cpp")
_extension = None
_enabled = False
_cpu = True  # whether the CPU kernel is part of what is enabled (enable(cpu=False): CUDA only)

def _extension_name() -> str:
    """The build's name, which keys torch's cache: one per CPU feature set, as ``-march=native`` needs.

    (A build cached in a shared home directory by a machine with wider vector units must not be
    loaded on one without them.)
    """
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags += next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags += platform.processor()
    return "normkit_fused_batch_norm_" + hashlib.sha256(flags.encode()).hexdigest()[:10]


def _put_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; the pip package's binary is not there unless its venv is active."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


# A build takes about a minute; a lock this old was left by a process killed while it held it.
STALE_LOCK_SECONDS = 600


def _clear_stale_lock(cpp_extension, name: str) -> None:
    """Wait for another process's build, or remove the lock a killed one left behind.

    torch's loader takes a lock file in the build folder even to load a cached build, and waits for
    it forever while it exists: a process killed during a build (or a load) would leave every later
    ``enable()`` hanging. A lock older than STALE_LOCK_SECONDS is removed, with a warning.
    """
    import time

    lock = Path(cpp_extension._get_build_directory(name, False)) / "lock"
    announced = False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age >= STALE_LOCK_SECONDS:
            warnings.warn(f"normkit.kernels: removing {lock}, a build lock {age / 60:.0f} minutes old (left by a "
                          "process that was killed while building or loading the kernel)")
            lock.unlink(missing_ok=True)
            return
        if not announced:
            warnings.warn(f"normkit.kernels: waiting for another process's build of the fused kernel ({lock}; "
                          f"taken {age:.0f} s ago, presumed abandoned after {STALE_LOCK_SECONDS} s)")
            announced = True
        time.sleep(1.0)


def build(verbose: bool = False):
    """Compile (or load the cached build of) the fused kernel and return the extension module."""
    global _extension
    if _extension is None:
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        _clear_stale_lock(cpp_extension, _extension_name())

        try:
            _extension = cpp_extension.load(name=_extension_name(), sources=[str(_SOURCE)],
                                            extra_cflags=["-O3", "-march=native", "-fopenmp-simd"], verbose=verbose)
        except (RuntimeError, OSError, ImportError) as error:
            raise RuntimeError(
                f"normkit.kernels: building the fused kernel failed ({type(error).__name__}; the compiler's "
                "output is in the chained exception above). It needs a C++ compiler, the "
                "Python development headers and ninja (pip install ninja); normkit works without it "
                "(call normkit.kernels.disable() or unset NORMKIT_FUSED_KERNELS).") from error
    return _extension


def enable(verbose: bool = False, *, cpu: bool = True) -> None:
    """Route the calls the fused kernels take through them: the C++ kernel on the CPU (built or
    loaded now; raises if it cannot be) and the Triton kernels on CUDA (compiled per GPU on first use).

    ``cpu=False`` enables the CUDA kernels alone and compiles nothing now (a GPU machine need not
    wait for, or have a compiler for, the CPU kernel); CPU calls then keep ATen's paths.
    """
    global _enabled, _cpu
    if cpu:
        build(verbose)
    _enabled, _cpu = True, bool(cpu)


def disable() -> None:
    """Route every call through ATen again (the build stays loaded)."""
    global _enabled
    _enabled = False


def enabled(device=None) -> bool:
    """Whether the fused kernels are on (for ``device``'s type, "cpu" or "cuda", when given)."""
    if not _enabled or device is None:
        return _enabled
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _cpu if kind == "cpu" else kind == "cuda"


@contextlib.contextmanager
def switched(on: bool):
    """Within the block the fused path is on (``True``, both devices, building the CPU kernel if needed)
    or off; then as before."""
    global _enabled, _cpu
    if on:
        build()
    previous, _enabled, _cpu = (_enabled, _cpu), on, True
    try:
        yield
    finally:
        _enabled, _cpu = previous


_triton_module = None
_triton_failure = None
# Tests only: send CPU tensors to the Triton kernels too (run by Triton's interpreter, TRITON_INTERPRET=1).
_triton_on_cpu = False


def _triton_kernels():
    """normkit.kernels.triton_batch_norm, imported on the first CUDA call; None where Triton is missing."""
    global _triton_module, _triton_failure
    if _triton_module is None and _triton_failure is None:
        try:
            from . import triton_batch_norm
            _triton_module = triton_batch_norm
        except ImportError as error:  # CUDA builds of torch bring Triton; without it ATen's path serves
            _triton_failure = error
            warnings.warn(f"normkit.kernels: Triton is not importable ({error}); CUDA tensors keep ATen's path",
                          RuntimeWarning, stacklevel=3)
    return _triton_module


def fused_batch_norm(x, weight, bias, valid, running_mean, running_var, renorm_mean, renorm_stddev,
                     moving_stddev, dims, settings):
    """The fused training step on x's device (C++ on the CPU, Triton on CUDA), or None where it does not apply."""
    if x.is_cuda or _triton_on_cpu:
        module = _triton_kernels()
        if module is None:
            return None
        return module.fused_batch_norm(x, weight, bias, valid, running_mean, running_var, renorm_mean,
                                       renorm_stddev, moving_stddev, dims, settings)
    if not _cpu or _extension is None:
        return None
    return _extension.fused_batch_norm(x, weight, bias, valid, running_mean, running_var, renorm_mean,
                                       renorm_stddev, moving_stddev, dims, settings)


if os.environ.get("NORMKIT_FUSED_KERNELS", "") not in ("", "0"):
    try:
        enable(cpu=os.environ["NORMKIT_FUSED_KERNELS"].lower() != "cuda")
    except RuntimeError as error:  # importing normkit must not fail for an optional speed-up
        warnings.warn(str(error), RuntimeWarning, stacklevel=2)
