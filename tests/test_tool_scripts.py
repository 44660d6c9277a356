"""The scripts in tools/: those that need what the test environment lacks (Keras, a GPU) say so in one message, not a
traceback, and the profiler of a training step runs here as it does on a GPU.

The Keras tools record the real Keras and the GPU checks run elsewhere; here only their refusal is checked, with
Keras hidden behind a package that cannot be imported (so an environment that has Keras never records anything).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parent.parent / "tools"
RECORDINGS = TOOLS / "keras_recordings"  # (the scripts that record what the real Keras computes)


@pytest.fixture
def without_keras(tmp_path):
    """An environment whose ``import keras`` (and tensorflow, tf_keras) raises ImportError, as where they are missing."""
    hidden = tmp_path / "hidden"
    for name in ("keras", "tensorflow", "tf_keras"):
        (hidden / name).mkdir(parents=True)
        (hidden / name / "__init__.py").write_text(f"raise ImportError(\"No module named '{name}'\")\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(hidden), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.parametrize("tool, arguments, needs", [
    ("keras_configs.py", ["{out}"], "needs Keras"),
    ("keras_model_file.py", [], "needs Keras"),
    ("keras_nested_model_file.py", [], "needs Keras"),
    ("keras_unnamed_weights_file.py", [], "needs Keras"),
    ("keras_legacy_model_files.py", [], "needs Keras 3"),
    ("keras_legacy_model_files.py", ["--tf-keras"], "needs TensorFlow"),
    ("keras_input_shape_file.py", [], "needs TensorFlow"),
    ("tfkeras_configs.py", [], "needs TensorFlow"),
    ("tfkeras_sync_file.py", [], "needs TensorFlow"),
    ("keras_bfloat16_legacy_file.py", [], "needs Keras"),
    ("keras_custom_layer_file.py", [], "needs Keras"),
    ("keras_custom_layer_file.py", ["--tf-keras"], "needs TensorFlow"),
    ("keras_golden.py", ["--out", "{out}"], "needs Keras 3"),
    ("keras_golden.py", ["--out", "{out}", "--part", "tfk"], "needs TensorFlow"),
])
def test_keras_tools_say_they_need_keras(without_keras, tmp_path, tool, arguments, needs):
    out = tmp_path / "recorded"
    done = subprocess.run([sys.executable, str(RECORDINGS / tool), *(a.format(out=out) for a in arguments)],
                          env=without_keras, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert needs in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not out.exists()


def test_the_keras_fuzzer_says_it_needs_keras(without_keras):
    """tools/fuzz_keras.py compares with the real Keras: without it, one line saying so, not a traceback."""
    done = subprocess.run([sys.executable, str(TOOLS / "fuzz_keras.py"), "--seeds", "0", "1"], env=without_keras,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "needs Keras 3" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_keras_configs_help_is_not_an_output_path(without_keras, tmp_path):
    done = subprocess.run([sys.executable, str(RECORDINGS / "keras_configs.py"), "--help"], env=without_keras,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0 and "usage" in done.stdout, done.stderr
    assert [path.name for path in tmp_path.iterdir()] == ["hidden"]  # (no file named --help)


def test_renorm_rate_help_is_not_a_run(tmp_path):
    # (without --help handling it trained 18 runs, about 2 minutes)
    done = subprocess.run([sys.executable, str(TOOLS / "renorm_rate.py"), "--help"], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert done.returncode == 0 and "usage" in done.stdout and "renorm_momentum" in done.stdout, done.stderr
    assert list(tmp_path.iterdir()) == []


def test_triton_compile_check_says_it_needs_triton(tmp_path):
    hidden = tmp_path / "hidden" / "triton"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError(\"No module named 'triton'\")\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hidden.parent), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, str(TOOLS / "triton_compile_check.py")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    assert "needs Triton" in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.skipif(shutil.which("bash") is None, reason="a bash script")
def test_device_check_stops_at_once_without_a_gpu(tmp_path):
    """Before anything is installed or run: every stage would fail, the benchmarks' reasons hidden in /dev/null."""
    # (the script's python3: this environment's, whose torch has no CUDA here)
    env = dict(os.environ, OUT=str(tmp_path / "out"),
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
    done = subprocess.run(["bash", str(TOOLS / "device_check.sh")], env=env, capture_output=True, text=True,
                          timeout=120, cwd=TOOLS.parent)
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr and "GPU tests" not in done.stdout, done.stdout + done.stderr


def _profile_step(*arguments):
    return subprocess.run([sys.executable, str(TOOLS / "profile_step.py"), *arguments], capture_output=True,
                          text=True, timeout=300, cwd=TOOLS.parent)


def test_profile_step_times_and_profiles_each_variant():
    done = _profile_step("--variants", "renorm,mask", "--steps", "3", "--top", "5")
    assert done.returncode == 0, done.stderr
    for heading in ("=== renorm (64, 16, 8, 8) on cpu", "=== mask (64, 50, 120) on cpu"):
        assert heading in done.stdout
    for label in ("torch.nn plain", "normkit (kernels off)", "normkit (kernels on)"):
        assert done.stdout.count(label) == 2, done.stdout
    # cProfile's table of the kernels-on steps: the layer's forward is among the calls it lists
    assert done.stdout.count("Ordered by: internal time") == 2 and "modules.py" in done.stdout


@pytest.mark.parametrize("arguments, message", [
    (["--variants", "renorm,ghosts"], "--variants: unknown ['ghosts']"),
    pytest.param(["--device", "cuda"], "--device cuda: this torch sees no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")),
])
def test_profile_step_refuses_what_it_cannot_run(arguments, message):
    done = _profile_step(*arguments)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
