"""Optional fused kernels for BatchNorm's training step: C++ for the CPU (compiled once per machine), Triton for CUDA.

Small inputs with renorm, ghost batches or a padding mask spend their time launching a dozen
small ATen operations, not on data (benchmarks/bench_op_floor.py). ``fused_batch_norm.cpp``
does the whole training step (statistics, renorm's r and d, normalization, every running
buffer) in one C++ call and its backward in another, with autograd in C++. It is compiled
for the machine it runs on (``-march=native``), which is what makes its loops as fast as
ATen's hand-vectorized ones; inputs over ``fused_max_numel()`` values keep ATen's
multi-threaded path. It takes renorm, ghost batches, padding masks and Keras' biased running
variance, and plain training of features-last inputs of rank 4/5 (docs/decisions.md, "How a
call executes").

Compiling takes about a minute and needs a C++ compiler, the Python headers and ``ninja``
(``pip install "normkit[fused]"``), so it never happens behind a user's back. Once built, the
build is cached per machine (CPU features, torch, Python and the kernel's source name it) and
every later ``import normkit`` on that machine loads it and uses it for CPU tensors, at no cost::

    normkit kernels build          # once per machine (or normkit.kernels.build() / enable())
    normkit kernels status         # what is built, where, and what is on

    import normkit.kernels
    normkit.kernels.enable()       # builds or loads the kernel now; raises if it cannot
    normkit.kernels.disable()      # every call on ATen's paths again

``NORMKIT_FUSED_KERNELS`` chooses at import: ``auto`` (the default, also when unset) loads a cached
CPU build when there is one and compiles nothing; ``1`` builds the CPU kernel if needed and turns on
the CUDA kernels too (a failed CPU build warns and leaves the CUDA kernels on); ``cuda`` the CUDA
kernels alone; ``0`` nothing.

On CUDA tensors the calls take ``triton_batch_norm.py``'s Triton kernels, only when asked for
(``enable()``, ``enable(cpu=False)``, ``NORMKIT_FUSED_KERNELS=1`` or ``cuda``): Triton comes with
CUDA builds of torch; without it CUDA calls keep ATen's path. Plain BatchNorm on a GPU always
keeps torch.nn's CUDA kernels (cuDNN's or ATen's). Both executions compute the same function
(tests/test_kernels.py compares them and the NumPy reference).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.autograd import forward_ad


_SOURCE = Path(__file__).with_name("fused_batch_norm.cpp")
_extension = None
_cpu_on = False   # CPU tensors take the C++ kernel
_cuda_on = False  # CUDA tensors take the Triton kernels


# -fno-trapping-math: the backward's selects (the padding rule) vectorize only when the compiler may compute a
# product that the select then discards (GCC's default forbids it, for FP traps, which nothing here enables); values
# are unchanged (no fast-math: NaN and inf keep their meaning).
_CFLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-trapping-math")


def _extension_name() -> str:
    """The build's name, which keys its cache folder: one per CPU feature set (as ``-march=native``
    needs), torch version, Python version, compiler flags and kernel source.

    (A build cached in a shared home directory by a machine with wider vector units must not be
    loaded on one without them, nor one built against another torch's ABI or an older source.)
    """
    # (Not the compiler: a finished build serves a machine whose $CXX names another one, or none at all.)
    key = f"{platform.machine()} torch {torch.__version__} python {sys.version_info[:2]} flags {' '.join(_CFLAGS)} "
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            key += next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        key += platform.processor()
    digest = hashlib.sha256(key.encode() + _SOURCE.read_bytes()).hexdigest()[:10]
    return "normkit_fused_batch_norm_" + digest


def build_directory() -> Path:
    """Where this machine's build lives: ``$TORCH_EXTENSIONS_DIR`` (else ``~/.cache/torch_extensions``)/<name>."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"
    return Path(root) / _extension_name()


def _library(folder: Path) -> Path:
    """The compiled module in a build folder (what torch's loader writes for a first version)."""
    return folder / (folder.name + (".pyd" if sys.platform == "win32" else ".so"))


# Written after a build succeeds: the library's size and SHA-256. Without it (a build killed while linking, a
# file cut short by a full disk) the library is never loaded: a truncated shared library passes the loader's
# header checks and then kills the process (SIGBUS) instead of raising.
_RECORD = "normkit-build.json"


def _verified_library(folder: Path) -> Path | None:
    """The folder's library when the record written after its build vouches for it (size and SHA-256), else None."""
    library = _library(folder)
    try:
        record = json.loads((folder / _RECORD).read_text())
        content = library.read_bytes()
    except (OSError, ValueError):
        return None
    if (not isinstance(record, dict) or record.get("library") != library.name or record.get("size") != len(content)
            or record.get("sha256") != hashlib.sha256(content).hexdigest()):
        return None
    return library


def _write_record(folder: Path) -> None:
    content = _library(folder).read_bytes()
    record = {"library": _library(folder).name, "size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    temporary = folder / f".{_RECORD}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(record))
    os.replace(temporary, folder / _RECORD)


def cached() -> bool:
    """Whether this machine has a finished, verified build of the CPU kernel that ``import normkit`` can load."""
    try:
        return _verified_library(build_directory()) is not None
    except (OSError, RuntimeError):  # (no home folder, an unreadable cache: nothing to load)
        return False


def _lock_age(folder: Path) -> float | None:
    """Seconds since the build folder's lock was taken; None without one."""
    try:
        return time.time() - (folder / "lock").stat().st_mtime
    except OSError:
        return None


def _build_in_progress(folder: Path) -> bool:
    """A fresh lock: another process is building (its library may be half written)."""
    age = _lock_age(folder)
    return age is not None and age < STALE_LOCK_SECONDS


# Measured (docs/benchmarks.md, 1 and 2 threads): the single-threaded fused kernel wins below about
# a million values; above, ATen's kernels (multi-threaded, one statistics pass) are as fast or faster.
# With more threads ATen's kernels speed up and the limit shrinks in proportion (a conservative
# rule, not measured beyond 2 threads: fused_max_numel()).
FUSED_MAX_NUMEL = 1 << 20


def fused_max_numel() -> int:
    """The largest input the fused CPU kernel takes with the current number of torch threads."""
    return FUSED_MAX_NUMEL // max(1, torch.get_num_threads() // 2)


def takes(x: torch.Tensor) -> bool:
    """Whether a training step on ``x`` may go to a fused kernel: the kernel of its device is on, no transform
    is running, and (on the CPU) it is within the kernel's size limit. The kernels decline the rest themselves;
    this is what lets the layers keep their own fast paths for it."""
    if not (_cpu_on or _cuda_on):
        return False  # (the common answer without a build, first: the checks below cost 2% of a small step)
    if not isinstance(x, torch.Tensor) or torch.compiler.is_compiling() or is_fake(x) or traced():
        return False  # (compiled graphs never call the kernels, and Dynamo refuses to trace is_fake)
    if x.is_cpu:
        return _cpu_on and x.numel() <= fused_max_numel() and not transforms_active()
    return _cuda_on and x.is_cuda and not transforms_active()


def traced() -> bool:
    """Whether torch.jit.trace is recording (the legacy ONNX exporter, ``torch.onnx.export(..., dynamo=False)``,
    traces with it): a trace records ATen's operations, and the kernels' autograd functions are opaque to it (the
    ONNX export of a training step failed, "IndexError: list index out of range"), so the layers keep ATen's paths.
    (Checked before any size: a traced size is a tensor, and comparing it warns.)"""
    return torch._C._get_tracing_state() is not None


def is_fake(x: torch.Tensor) -> bool:
    """A FakeTensorMode tensor (shape, memory and FLOP estimates): it has a device but no data for a kernel to read,
    and torch.nn's layers run on it, so the kernels decline it (a meta tensor's device they decline anyway)."""
    # (a plain tensor is not one, and the type test costs a tenth of is_fake on the small steps the kernel serves)
    return type(x) is not torch.Tensor and torch._subclasses.fake_tensor.is_fake(x)


def transforms_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, ...) or forward-mode AD (``torch.autograd.forward_ad``)
    is running: neither can see inside the kernels' autograd functions, so the layers keep ATen's paths there."""
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


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


def _clear_stale_lock(folder: Path) -> bool:
    """Wait for another process's build, or remove the lock a killed one left behind; True when it waited.

    torch's loader takes a lock file in the build folder even to load a cached build, and waits for
    it forever while it exists: a process killed during a build (or a load) would leave every later
    ``enable()`` hanging. A lock older than STALE_LOCK_SECONDS is removed, with a warning.
    """
    lock = folder / "lock"
    announced = False
    while True:
        age = _lock_age(folder)
        if age is None:
            return announced
        if age >= STALE_LOCK_SECONDS:
            warnings.warn(f"normkit.kernels: removing {lock}, a build lock {age / 60:.0f} minutes old (left by a "
                          "process that was killed while building or loading the kernel)")
            lock.unlink(missing_ok=True)
            return False
        if not announced:
            warnings.warn(f"normkit.kernels: waiting for another process's build of the fused kernel ({lock}; "
                          f"taken {age:.0f} s ago, presumed abandoned after {STALE_LOCK_SECONDS} s)")
            announced = True
        time.sleep(1.0)


# torch's loader drops the lock before the process that built imports its library and writes the record; a
# process that waited for that build gives it this long to finish rather than relinking the library under it.
RECORD_WAIT_SECONDS = 10.0


def _load_finished_build() -> bool:
    """After waiting for another process's build: load it once its record appears; False if it never does."""
    deadline = time.monotonic() + RECORD_WAIT_SECONDS
    while not load_cached(warn=False):
        if time.monotonic() > deadline:
            return False  # (that build failed: build here)
        time.sleep(0.2)
    return True


def _linked_within(folder: Path, seconds: float) -> bool:
    """Whether the folder's library was written less than ``seconds`` ago."""
    try:
        return time.time() - _library(folder).stat().st_mtime < seconds
    except OSError:
        return False


def _failure_reason(error: BaseException) -> str:
    """The line of a failed build that says why, for a one-line message.

    torch's error starts with ninja's command line (hundreds of characters of flags); the cause is a later
    line: the shell's ``c++: not found``, the compiler's ``error:``, ``Python.h: No such file or directory``.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    telling = [line for line in lines[1:] if not line.startswith(("FAILED:", "ninja:"))
               and re.search(r"error|not found|no such file|cannot|permission denied", line, re.IGNORECASE)]
    return (telling or lines or [type(error).__name__])[0][:300]


def build(verbose: bool = False):
    """Load this machine's finished build of the fused CPU kernel, or compile it; return the extension module.

    Builds into ``build_directory()``; later processes on this machine load that build at import
    (``NORMKIT_FUSED_KERNELS=auto``, the default). Raises RuntimeError, saying why, when it cannot.
    """
    global _extension
    if _extension is None and not load_cached(warn=False):  # a finished build: no compiler, ninja or lock needed
        folder = build_directory()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # No lock, and a library linked moments ago without its record: another process's build between
            # torch's dropping the lock and its record (it is importing that library now). Deleted and relinked
            # here, its import failed ("building the fused kernel failed"), or read a library half rewritten.
            just_linked = _lock_age(folder) is None and _linked_within(folder, RECORD_WAIT_SECONDS)
            waited = _clear_stale_lock(folder)
        except OSError as error:
            raise RuntimeError(f"normkit.kernels: cannot use the build folder {folder} ({error}); set "
                               "TORCH_EXTENSIONS_DIR to a folder you can write, or NORMKIT_FUSED_KERNELS=0") from None
        if (waited or just_linked) and _load_finished_build():  # that build is this one: load it, do not relink it
            return _extension
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        # A library its record does not vouch for (a link cut short) would look up to date to ninja: relink it.
        _library(folder).unlink(missing_ok=True)
        try:
            _extension = cpp_extension.load(name=folder.name, sources=[str(_SOURCE)], build_directory=str(folder),
                                            extra_cflags=list(_CFLAGS), verbose=verbose)
        except (RuntimeError, OSError, ImportError) as error:
            reason = _failure_reason(error)
            raise RuntimeError(
                f"normkit.kernels: building the fused kernel failed ({reason}). It needs a C++ compiler, the Python "
                "development headers and ninja (pip install ninja); `normkit kernels build --verbose` shows the "
                "compiler's output. normkit works without it (NORMKIT_FUSED_KERNELS=0 keeps it off).") from error
        try:
            _write_record(folder)
        except OSError as error:  # (this process has the kernel; later imports will not trust the build)
            warnings.warn(f"normkit.kernels: built, but its record could not be written ({error}): later imports "
                          "will not load this build", RuntimeWarning, stacklevel=2)
    return _extension


def load_cached(warn: bool = True) -> bool:
    """Load this machine's finished build, if there is one, compiling nothing; True when loaded.

    What ``import normkit`` does by default. The library is imported directly (no ninja, no
    compiler, no lock taken) once the record written after its build has vouched for it; one that
    is incomplete (a build interrupted) or fails to load is reported in a warning (``warn``) and
    left alone, and the calls keep ATen's paths.
    """
    global _extension
    if _extension is not None:
        return True
    folder = build_directory()
    library = _verified_library(folder)
    if library is None:
        if warn and _library(folder).is_file() and not _build_in_progress(folder):
            warnings.warn(f"normkit.kernels: the cached build {_library(folder)} is incomplete or changed since it "
                          "was built (a build interrupted?); rebuild it with `normkit kernels build`, or set "
                          "NORMKIT_FUSED_KERNELS=0", RuntimeWarning, stacklevel=2)
        return False
    try:
        spec = importlib.util.spec_from_file_location(folder.name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError) as error:
        if warn:
            warnings.warn(f"normkit.kernels: the cached build {library} does not load ({error}); rebuild it with "
                          "`normkit kernels build`, or set NORMKIT_FUSED_KERNELS=0", RuntimeWarning, stacklevel=2)
        return False
    _extension = module
    return True


def enable(verbose: bool = False, *, cpu: bool = True) -> None:
    """Route the calls the fused kernels take through them: the C++ kernel on the CPU (built or
    loaded now; raises if it cannot be) and the Triton kernels on CUDA (compiled per GPU on first use).

    ``cpu=False`` enables the CUDA kernels alone and compiles nothing now (a GPU machine need not
    wait for, or have a compiler for, the CPU kernel); CPU calls then keep ATen's paths.
    """
    global _cpu_on, _cuda_on
    if cpu:
        build(verbose)
    _cpu_on, _cuda_on = bool(cpu), True


def disable() -> None:
    """Route every call through ATen again (the build stays loaded)."""
    global _cpu_on, _cuda_on
    _cpu_on = _cuda_on = False


def enabled(device=None) -> bool:
    """Whether the fused kernels are on: for ``device``'s type ("cpu" or "cuda") when given, else for either."""
    if device is None:
        return _cpu_on or _cuda_on
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _cpu_on if kind == "cpu" else _cuda_on and kind == "cuda"


@contextlib.contextmanager
def switched(on: bool):
    """Within the block the fused path is on (``True``, both devices, building the CPU kernel if needed)
    or off; then as before."""
    global _cpu_on, _cuda_on
    if on:
        build()
    previous, (_cpu_on, _cuda_on) = (_cpu_on, _cuda_on), (on, on)
    try:
        yield
    finally:
        _cpu_on, _cuda_on = previous


def status() -> dict:
    """What is built, loaded and switched on, for ``normkit kernels status`` and bug reports."""
    try:
        folder = str(build_directory())
    except (OSError, RuntimeError) as error:  # (no home folder)
        folder = f"unknown ({error})"
    return {"mode": _MODE, "build_directory": folder, "cached": cached(), "loaded": _extension is not None,
            "cpu": _cpu_on, "cuda": _cuda_on}


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


def graph_backward(x, weight, valid, dims, eps, r, d, grad, needs):
    """The kernels' gradient with a graph of its own, for ``create_graph=True`` (gradient penalties, gradgradcheck).

    The kernels' backward loops write numbers, which autograd cannot differentiate again; here the training
    step's function of x and the weight is recomputed from the saved input by autograd, in the kernels' layout
    (x as (N, R, C, S); ghost group of sample n: n % G strided, n // (N / G) contiguous; the mask one flag per
    (n, r, s)) and differentiated with ``create_graph=True``::

        mean, var = moments of x over each group's valid (n, r, s), per feature   (a channel without any: 0, 0)
        y = (x - mean) / sqrt(var + eps) * (r * weight) + d * weight                (+ bias: its gradient is sum g)

    r and d (renorm's correction; 1 and 0 without it) are constants, as in the forward pass. Half-precision x
    computes in float32, as the kernels do. Called by both kernels' backward (the C++ one through pybind11);
    ``needs`` says which of (input, weight, bias) gradients to return, the rest are None.
    """
    from .. import functional  # (functional imports this module: the statistics core, by name at call time)

    n, rows, channels, positions, groups, strided = (int(v) for v in dims)
    need_input, need_weight, need_bias = needs
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    per_group = n // groups
    wanted = [t for t, need in ((x, need_input), (weight, need_weight)) if need]
    found = []
    if wanted:
        with torch.enable_grad():
            grouped_shape = (per_group, groups) if strided else (groups, per_group)
            xg = x.to(compute).reshape(*grouped_shape, rows, channels, positions)
            if strided:
                xg = xg.transpose(0, 1)  # (G, N / G, R, C, S) either way
            # (the kernels take a mask without ghost groups only; a group without valid values: mean 0, var 0)
            mask = None if valid is None else valid.reshape(1, n, rows, 1, positions)
            g = grad.to(compute).reshape(*grouped_shape, rows, channels, positions)
            g = g.transpose(0, 1) if strided else g
            if mask is not None:
                # The padding rule: a non-finite padded value whose gradient is 0 is read as 0 (its gradient is
                # 0 either way, and it adds nothing to the sums, where 0 * NaN would be NaN); finite values stay.
                xg = torch.where(~mask & (g == 0) & ~torch.isfinite(xg), 0.0, xg)
            _, mean, var = functional.moments(xg, (1, 2, 4), mask)
            per_feature = (1, 1, 1, channels, 1)
            scale, shift = r.to(compute).view(per_feature), d.to(compute).view(per_feature)
            if weight is not None:
                scale, shift = scale * weight.to(compute).view(per_feature), shift * weight.to(compute).view(per_feature)
            y = (xg - mean) * torch.rsqrt(var + eps) * scale + shift
            found = list(torch.autograd.grad(y, wanted, g, create_graph=True))
    grad_input = found.pop(0) if need_input else None
    grad_weight = found.pop(0) if need_weight else None
    grad_bias = None
    if need_bias:
        grad_bias = grad.to(compute).reshape(n * rows, channels, positions).sum((0, 2))
    return grad_input, grad_weight, grad_bias


def complete_state(running_mean, running_var, renorm_mean, renorm_stddev, moving_stddev, update) -> bool:
    """Whether the buffers a step reads and moves are all there: running_var with running_mean, renorm_stddev with
    renorm_mean, and moving_stddev for a renorm step that moves the running statistics.

    The kernels take an absent buffer's flag from another: the Triton kernels wrote running_var's (or
    moving_stddev's) update into their placeholder pointer, the statistics saved for the backward (silently wrong
    gradients), and read renorm_stddev from it; the C++ kernel raised its own error. ATen's paths refuse such a call
    (a TypeError); declined, it is refused the same way whichever kernel is on.
    """
    if running_mean is not None and running_var is None:
        return False
    return renorm_mean is None or (renorm_stddev is not None
                                   and (moving_stddev is not None or running_mean is None or not update))


def fused_batch_norm(x, weight, bias, valid, running_mean, running_var, renorm_mean, renorm_stddev,
                     moving_stddev, dims, settings):
    """The fused training step on x's device (C++ on the CPU, Triton on CUDA), or None where it does not apply.

    Declined under torch.func's transforms (grad, vmap, jacrev, ...) and forward-mode AD, which cannot see
    inside the kernels' autograd functions: ATen's paths compute the same function there; and where a buffer the
    step needs is missing (``complete_state``).
    """
    if transforms_active() or is_fake(x) or traced():
        return None
    if not complete_state(running_mean, running_var, renorm_mean, renorm_stddev, moving_stddev, settings[-1]):
        return None
    if x.is_cuda or _triton_on_cpu:
        module = _triton_kernels()
        if module is None:
            return None
        return module.fused_batch_norm(x, weight, bias, valid, running_mean, running_var, renorm_mean,
                                       renorm_stddev, moving_stddev, dims, settings)
    if not _cpu_on or _extension is None:
        return None
    return _extension.fused_batch_norm(x, weight, bias, valid, running_mean, running_var, renorm_mean,
                                       renorm_stddev, moving_stddev, dims, settings)


def fused_direct(x, weight, bias, running_mean, running_var, dims, settings, renorm_mean=None, renorm_stddev=None,
                 moving_stddev=None, valid=None):
    """``fused_batch_norm`` for a training step on the CPU, by a caller that ``takes(x)`` has answered (no transform,
    no fake tensor, the CPU kernel on) and that hands every buffer its step moves (running_mean and running_var; with
    renorm also renorm_mean, renorm_stddev and moving_stddev) and a padding mask, if any, as ``valid`` (booleans, one
    per position of the kernel's (N, R, S) order): the C++ kernel's call without the checks those answers hold. None
    where the kernel declines, or is not loaded, or the tests send CPU calls to the Triton kernels
    (``fused_batch_norm`` serves those, by the general path)."""
    if _extension is None or _triton_on_cpu:
        return None
    return _extension.fused_batch_norm(x, weight, bias, valid, running_mean, running_var, renorm_mean, renorm_stddev,
                                       moving_stddev, dims, settings)


def _mode_from_environment() -> str:
    text = os.environ.get("NORMKIT_FUSED_KERNELS", "").strip().lower()
    modes = {"": "auto", "auto": "auto", "0": "off", "off": "off", "false": "off", "no": "off",
             "1": "on", "on": "on", "true": "on", "yes": "on", "cuda": "cuda"}
    if text not in modes:
        warnings.warn(f"NORMKIT_FUSED_KERNELS={text!r} is not one of auto, 1, cuda, 0; using auto",
                      RuntimeWarning, stacklevel=3)
    return modes.get(text, "auto")


_MODE = _mode_from_environment()
if _MODE == "auto":
    try:
        _cpu_on = load_cached()
    except (OSError, RuntimeError) as error:  # no home folder, an unreadable cache: ATen's paths serve
        warnings.warn(f"normkit.kernels: the cached build cannot be looked up ({error}); set TORCH_EXTENSIONS_DIR "
                      "or NORMKIT_FUSED_KERNELS=0", RuntimeWarning, stacklevel=2)
elif _MODE in ("on", "cuda"):
    try:
        enable(cpu=_MODE == "on")
    except (RuntimeError, OSError) as error:  # importing normkit must not fail for an optional speed-up
        # (the CUDA kernels need no build: a failed CPU build leaves them on, as NORMKIT_FUSED_KERNELS=1 asks)
        warnings.warn(f"{error} (CPU calls keep ATen's paths; the CUDA kernels are on)", RuntimeWarning, stacklevel=2)
        enable(cpu=False)
