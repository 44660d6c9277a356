"""User errors and failures of the machine cost one line and lose nothing already written.

User errors are one line naming the flag (exit 2, no traceback), found before anything is written;
earlier runs are never lost by accident; absent measurements are JSON null; a write the OS refuses
or a closed stdout stop the run cleanly. Each test runs in about a second."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

try:
    import resource
except ImportError:  # not on Windows
    resource = None

import numpy as np
import pytest
import torch

from normkit.cli import main
from normkit.lab import data
from normkit.lab.checkpoint import CheckpointError, load_checkpoint
from normkit.lab.config import TrainConfig
from normkit.lab.data import DataError, load_dataset, write_idx
from normkit.lab.train import RunInterrupted, evaluate_checkpoint, run

from lab_testing import TINY, one_line_error, snapshot, strict_json


def exit_code(argv: list[str]) -> int:
    """main's exit code, also for errors argparse reports (it exits rather than returns)."""
    try:
        return main(argv)
    except SystemExit as exit_info:
        return exit_info.code


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 1-epoch run with TensorBoard events (5 steps)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--epochs", "1", "--out", str(out), *TINY[:-1]]) == 0
    return out


# ------------------------------------------------------------------------------ 1, 12: --out that cannot be a folder

def test_out_that_is_a_file_or_under_one(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for command in ("train", "compare"):
        assert main([command, "--dry-run", *TINY, "--out", str(afile)]) == 2
        one_line_error(capsys, "--out", "is a file")
    assert main(["train", "--dry-run", *TINY, "--out", str(afile / "run")]) == 2
    one_line_error(capsys, "--out", "is a file")
    assert afile.read_text() == "keep me"


def test_empty_out_and_seeds_are_refused_by_compare_as_by_train(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in ("train", "compare"):
        assert main([command, "--dry-run", *TINY, "--out", ""]) == 2
        one_line_error(capsys, "--out", "current folder")
    assert main(["compare", "--dry-run", *TINY, "--seeds", "", "--out", "c"]) == 2
    one_line_error(capsys, "--seeds", "comma-separated")
    monkeypatch.setenv("NORMKIT_DATA", str(tmp_path / "elsewhere"))
    assert main(["download", "mnist", "--data-dir", ""]) == 2  # (not the current folder, nor $NORMKIT_DATA)
    one_line_error(capsys, "--data-dir", "current folder")
    assert main(["evaluate", "--checkpoint", ""]) == 2  # (not ./checkpoint.pt)
    one_line_error(capsys, "--checkpoint", "current folder")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not sys.platform.startswith("linux") or not Path("/sys").is_dir(), reason="needs Linux's /sys")
def test_out_where_folders_cannot_be_made(capsys):
    assert main(["train", "--dry-run", *TINY, "--out", "/sys/normkit-run"]) == 2
    one_line_error(capsys, "--out /sys/normkit-run", "cannot write")


def test_failed_runs_create_no_folder(tmp_path, capsys):
    for arguments in (["--seed", "-5"], ["--dataset", "mnist", "--data-dir", str(tmp_path / "absent")],
                      ["--train-limit", "50", "--batch-size", "64", "--drop-last"]):
        out = tmp_path / "never"
        assert main(["train", "--dry-run", *TINY, *arguments, "--out", str(out)]) == 2
        one_line_error(capsys)
        assert not out.exists(), arguments


# ------------------------------------------------------------------------------ 2: nothing deleted before validation

@pytest.mark.parametrize("bad", [["--seed", "-5"], ["--dataset", "mnist", "--data-dir", "/nonexistent-normkit"]])
def test_failed_fresh_run_leaves_the_existing_run_alone(finished, bad, capsys):
    before = snapshot(finished)
    assert any(name.startswith("events.out.tfevents.") for name in before)
    assert main(["train", "--epochs", "1", "--out", str(finished), *TINY[:-1], *bad]) == 2
    one_line_error(capsys)
    assert snapshot(finished) == before


# ------------------------------------------------------------------------------ 3: damaged gzip

def test_damaged_gzip_stream_is_a_data_error(tmp_path, capsys):
    images = np.zeros((20, 28, 28), dtype=np.uint8)
    images[:, 10:18, 10:18] = np.arange(64, dtype=np.uint8).reshape(8, 8)  # compressible: Huffman-coded blocks
    for part, count in (("train", 20), ("test", 10)):
        write_idx(tmp_path / (data.IDX_FILES[part][0] + ".gz"), images[:count])
        write_idx(tmp_path / (data.IDX_FILES[part][1] + ".gz"), np.arange(count, dtype=np.uint8) % 10)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte mid-stream: zlib.error, not a CRC mismatch
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: cannot be read as gzip .*malformed"):
        load_dataset("mnist", tmp_path)
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--dry-run", "--quiet",
                 "--out", str(tmp_path / "run")]) == 2
    one_line_error(capsys, "train-images-idx3-ubyte.gz", "malformed")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ 4: no NaN in JSON

def test_no_validation_split_writes_null_not_nan(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--val-split", "0", *TINY, "--out", str(out)]) == 0
    (record,) = strict_json(out / "metrics.json")["history"]
    assert record["val_loss"] is None and record["val_accuracy"] is None
    assert record["loss"] > 0
    compared = tmp_path / "compare"
    assert main(["compare", "--dry-run", "--val-split", "0", *TINY, "--out", str(compared)]) == 0
    assert strict_json(compared / "comparison.json")["batch"]["0"]["history"][0]["val_accuracy"] is None
    table = (compared / "comparison.md").read_text()
    assert "nan" not in table and "| n/a |" in table


def test_a_model_without_norm_layers_has_a_null_first_norm_layer(tmp_path):
    """metrics.json lists first_norm_layer for every run; --norm none has no such layer: null, as every absent value."""
    out = tmp_path / "run"
    assert main(["train", "--norm", "none", "--dry-run", *TINY, "--out", str(out)]) == 0
    metrics = strict_json(out / "metrics.json")
    assert "first_norm_layer" in metrics and metrics["first_norm_layer"] is None


def test_a_diverging_run_with_tensorboard_completes(tmp_path):
    """Weights and losses become NaN: TensorBoard cannot histogram them, and the run must still finish."""
    out = tmp_path / "run"
    assert main(["train", "--optimizer", "sgd", "--lr", "1e6", "--activation", "relu", "--train-limit", "600",
                 "--epochs", "2", "--batch-size", "32", "--quiet", "--tensorboard", "--out", str(out)]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    metrics = strict_json(out / "metrics.json")
    assert metrics["history"][-1]["loss"] is None and metrics["test_loss"] is None

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out), size_guidance={"scalars": 0}).Reload()
    assert [event.step for event in events.Scalars("step/loss")] == list(range(1, 31))


def test_the_epoch_line_tells_a_diverged_validation_loss_from_an_absent_one(tmp_path, capsys):
    """metrics.json holds null for both (strict JSON has no NaN); the per-epoch line said n/a for both."""
    diverging = ["--optimizer", "sgd", "--lr", "1e6", "--activation", "relu", "--train-limit", "600", "--epochs", "1",
                 "--batch-size", "32", "--no-tensorboard"]
    assert main(["train", *diverging, "--out", str(tmp_path / "diverged")]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1/1"))
    assert "loss nan" in line and "val_loss nan" in line, line
    assert strict_json(tmp_path / "diverged" / "metrics.json")["history"][0]["val_loss"] is None
    assert main(["train", "--train-limit", "200", "--epochs", "1", "--batch-size", "32", "--no-tensorboard",
                 "--val-split", "0", "--out", str(tmp_path / "absent")]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1/1"))
    assert "val_loss n/a" in line and "val_accuracy n/a" in line, line


def test_a_comparison_of_diverging_runs_is_written_with_n_a(tmp_path):
    """A NaN test loss is null in metrics.json; the comparison's table says n/a where a mean is undefined."""
    out = tmp_path / "compare"
    assert main(["compare", "--norms", "batch,none", "--seeds", "0,1", "--optimizer", "sgd", "--lr", "1e6",
                 "--activation", "relu", "--train-limit", "600", "--epochs", "1", "--batch-size", "32", "--quiet",
                 "--no-tensorboard", "--out", str(out)]) == 0
    summary = strict_json(out / "comparison.json")
    assert summary["batch"]["0"]["test_loss"] is None and summary["batch"]["1"]["test_loss"] is None
    row = next(line for line in (out / "comparison.md").read_text().splitlines() if line.startswith("| batch |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[4] == "n/a"  # (norm, test accuracy, seed 0, seed 1, test loss, ...)
    assert "±" in cells[1] and all(0.0 <= float(cell) <= 1.0 for cell in cells[2:4] + cells[5:])
    assert (out / "comparison.png").stat().st_size > 0


def test_histograms_keep_only_finite_values(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from normkit.lab.models import build_model
    from normkit.lab.board import Board

    model = build_model("lenet", "batch")
    with torch.no_grad():
        model[1].weight[:2] = float("nan")  # the first norm layer (6 channels): 4 finite values left
        model[1].bias[:] = float("inf")  # none left: no histogram
        model[5].weight[:] = 3e29  # diverged through TensorBoard's largest bucket (about 1e20): drawn at the edge
        model[5].bias[:] = torch.tensor([-1e30, 1.0] * 8)
    board = Board(tmp_path, True, None)
    board.epoch(5, {"loss": 1.0, "accuracy": 0.5, "val_loss": None, "val_accuracy": None}, model,
                torch.rand(8, 1, 28, 28))
    board.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0}).Reload()
    assert events.Histograms("norm/1.weight")[0].histogram_value.num == 4
    assert "norm/1.bias" not in events.Tags()["histograms"]
    huge = events.Histograms("norm/5.weight")[0].histogram_value
    assert huge.num == 16 and sum(huge.bucket) == 16
    assert sum(events.Histograms("norm/5.bias")[0].histogram_value.bucket) == 16


# ------------------------------------------------------------------------------ 5, 11: settings refused up front

@pytest.mark.parametrize("arguments, flags", [
    (["--epochs", "1", "--train-limit", "20", "--norm", "ghost"], ["--batch-size", "--train-limit", "--drop-last"]),
    (["--train-limit", "50", "--batch-size", "64", "--drop-last"], ["--batch-size", "--train-limit", "--drop-last"]),
    (["--norm", "ghost", "--no-drop-last", "--train-limit", "90"], ["--no-drop-last", "--norm ghost"]),
    (["--lr", "-1"], ["--lr"]),
    (["--optimizer", "sgd", "--lr", "-1"], ["--lr"]),
    (["--lr", "nan"], ["--lr", "finite"]),
    (["--lr", "0"], ["--lr", "> 0"]),
    (["--lr", "1e-50"], ["--lr", "> 0, also in float32"]),  # (a 0 for the float32 weights: no step moves them)
    (["--optimizer", "sgd", "--momentum", "-1"], ["--momentum"]),
    (["--seed", "-5"], ["--seed"]),
    (["--seed", str(2**64)], ["--seed"]),
    (["--batch-size", "1"], ["--batch-size", "at least 2"]),
    (["--batch-size", "1", "--norm", "ghost"], ["--batch-size"]),
    (["--rho", "1"], ["--rho"]),
    (["--norm", "instance", "--recalibrate", "-1"], ["--recalibrate", "'instance' has none"]),
    # (settings the optimizer never reads: silently ignored, yet saved as the run's)
    (["--optimizer", "adam", "--momentum", "0.9"], ["--momentum 0.9", "--optimizer adam", "only sgd"]),
    (["--optimizer", "sgd", "--rho", "0.5"], ["--rho 0.5", "--optimizer sgd"]),
    (["--optimizer", "sgd", "--eps", "0.001"], ["--eps 0.001", "--optimizer sgd"]),
    (["--momentum", "0.5"], ["--momentum 0.5", "--optimizer rmsprop"]),
    (["--eps", "-1"], ["--eps"]),
    # (0 trained a whole run into NaN weights, with rmsprop and adam alike: test_eps_zero_makes_nan_weights)
    (["--eps", "0"], ["--eps", "> 0"]),
    (["--optimizer", "adam", "--eps", "0"], ["--eps", "> 0"]),
    (["--eps", "1e-50"], ["--eps", "> 0, also in float32"]),  # (0 in the float32 weights' arithmetic)
    (["--val-split", "nan"], ["--val-split"]),
    (["--train-limit", "300", "--val-split", "0.995"], ["only 1 training images", "--val-split 0.995 of 300"]),
    # (the value given, not rounded to 6 digits: "--val-split 1" would name a value the check refuses)
    (["--train-limit", "300", "--val-split", "0.9999999"], ["only 0 training images", "--val-split 0.9999999 of 300"]),
    (["--threads", "-1"], ["--threads"]),
    (["--seed", "x"], ["--seed"]),
    (["--resume", "--overwrite"], ["--resume", "--overwrite"]),
])
def test_bad_settings_are_one_line_errors_naming_the_flag(tmp_path, capsys, arguments, flags):
    out = tmp_path / "run"
    # TINY's batch size first: the arguments under test come later and win.
    assert exit_code(["train", "--dry-run", *TINY, *arguments, "--out", str(out)]) == 2
    one_line_error(capsys, *flags)
    assert not out.exists()


@pytest.mark.parametrize("optimizer", ["rmsprop", "adam"])
def test_eps_zero_makes_nan_weights(optimizer):
    """Why --eps 0 is refused: the bias of a dense layer before BN gets a gradient of 0 (BN subtracts the batch
    mean), exactly 0 in many of its elements, and both optimizers then divide 0 by 0 there."""
    from normkit.lab.models import build_model
    from normkit.lab.optim import build_optimizer

    torch.manual_seed(0)
    model = build_model("lenet", "batch")  # the lab's default network
    torch.nn.functional.cross_entropy(model(torch.rand(8, 1, 28, 28)), torch.arange(8)).backward()
    bias = model[9].bias  # Linear(256, 120), then BN
    zero = bias.grad == 0
    assert zero.any()
    build_optimizer(optimizer, model.parameters(), eps=0.0).step()
    assert torch.isnan(bias[zero]).all() and not torch.isnan(bias[~zero]).any()


@pytest.mark.parametrize("norm", ["none", "layer", "instance", "group"])  # (lab.md: the norms without batch statistics)
def test_batch_size_one_is_fine_without_batch_statistics(tmp_path, norm):
    metrics = run(TrainConfig(norm=norm, batch_size=1, train_limit=20, dry_run=True, quiet=True, tensorboard=False,
                              out=str(tmp_path)))
    assert metrics["steps"] == 1


def test_invalid_threads_leave_torch_alone(tmp_path):
    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match="--threads"):
        run(TrainConfig(threads=-1, dry_run=True, out=str(tmp_path / "run")))
    assert torch.get_num_threads() == threads and not (tmp_path / "run").exists()



@pytest.mark.parametrize("switch", ["tensorboard", "dry_run", "quiet", "compile", "drop_last", "resume", "overwrite"])
def test_switches_that_are_not_booleans_are_refused_before_training(tmp_path, switch):
    """From Python, tensorboard=0 used to train the whole run and write a checkpoint that evaluate and --resume
    then refused as edited ("not true or false"): refused up front, naming the flag, as every other setting."""
    with pytest.raises(ValueError, match="--" + switch.replace("_", "-")):
        run(TrainConfig(**{"train_limit": 20, "dry_run": True, "quiet": True, switch: 0}, out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_numpy_numbers_from_python_give_a_checkpoint_that_loads(tmp_path):
    """np.float64 passes as a float (a sweep over np.logspace), but a checkpoint holding one was refused by
    torch.load(weights_only=True): the run trained, then evaluate and --resume called it not a lab checkpoint."""
    out = tmp_path / "run"
    cfg = TrainConfig(lr=np.float64(2e-3), val_split=np.float64(0.25), rho=np.float64(0.8),
                      norm_options={"momentum": np.float64(0.5)}, train_limit=40, dry_run=True, quiet=True,
                      tensorboard=False, out=str(out))
    run(cfg)
    settings = load_checkpoint(out / "checkpoint.pt")["config"]
    assert settings["lr"] == 2e-3 and settings["val_split"] == 0.25 and settings["norm_options"] == {"momentum": 0.5}
    assert evaluate_checkpoint(out)["test_size"] == 360


def test_numpy_integers_and_float32_from_python_train_as_plain_numbers(tmp_path):
    """A sweep over np.arange (np.int64) or a float32 array: refused with messages that contradicted themselves
    ("--epochs=2 must be at least 1"); they train as the plain numbers they are, and the checkpoint loads."""
    out = tmp_path / "run"
    cfg = TrainConfig(epochs=np.arange(1, 4)[1], batch_size=np.int32(32), train_limit=np.int64(200), seed=np.uint32(3),
                      lr=np.float32(2e-3), val_split=np.float32(0.25), recalibrate=np.int64(1), threads=np.int64(1),
                      quiet=True, tensorboard=False, out=str(out))
    metrics = run(cfg)
    assert metrics["steps"] == 2 * 5 and metrics["train_size"] == 150
    settings = load_checkpoint(out / "checkpoint.pt")["config"]
    assert settings["epochs"] == 2 and type(settings["epochs"]) is int and type(settings["seed"]) is int
    assert settings["lr"] == float(np.float32(2e-3)) and type(settings["lr"]) is float
    assert strict_json(out / "config.json")["batch_size"] == 32
    assert evaluate_checkpoint(out)["test_accuracy"] == metrics["test_accuracy"]


def test_numpy_values_of_norm_options_are_plain_json(tmp_path):
    """--norm-option values from a sweep (np.arange's np.int64, a NumPy bool) were refused as "values must be numbers,
    strings, true/false ..."; they are the JSON values they hold."""
    out = tmp_path / "run"
    options = {"virtual_batch_size": np.arange(8, 9)[0], "affine": np.bool_(True), "momentum": np.float32(0.5)}
    run(TrainConfig(norm="ghost", norm_options=options, train_limit=40, batch_size=16, dry_run=True, quiet=True,
                    tensorboard=False, out=str(out)))
    assert strict_json(out / "config.json")["norm_options"] == {"virtual_batch_size": 8, "affine": True, "momentum": 0.5}
    assert evaluate_checkpoint(out)["test_size"] == 360


def test_a_whole_number_setting_of_another_type_says_so(tmp_path):
    for settings, phrase in (({"epochs": 2.0}, "--epochs=2.0 must be a whole number"),
                             ({"val_split": "0.1"}, "--val-split='0.1' must be in [0, 1)")):
        with pytest.raises(ValueError) as error:
            run(TrainConfig(**settings, quiet=True, out=str(tmp_path / "run")))
        assert phrase in str(error.value)
    assert not (tmp_path / "run").exists()


def test_evaluate_on_cuda_without_cuda(finished, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["evaluate", "--checkpoint", str(finished / "checkpoint.pt"), "--device", "cuda"]) == 2
    error = one_line_error(capsys, "--device cuda", "CUDA is not available")
    assert "corrupt" not in error


# ------------------------------------------------------------------------------ 6: resume across dry and real runs

def test_real_resume_of_a_dry_run_starts_from_the_beginning(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dry-run", *TINY, "--out", str(out)]) == 0
    assert main(["train", "--resume", "--epochs", "2", *TINY[:-2], "--no-tensorboard", "--out", str(out)]) == 0
    assert "dry run's (one batch); starting the real run from the beginning" in capsys.readouterr().out
    payload = load_checkpoint(out / "checkpoint.pt")
    assert payload["epoch"] == 2 and payload["step"] == 10 and payload["config"]["dry_run"] is False
    assert [r["step"] for r in strict_json(out / "metrics.json")["history"]] == [5, 10]  # two whole epochs


def test_real_resume_of_a_dry_run_keeps_the_dry_run_s_settings(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dry-run", "--lr", "0.005", "--norm", "torch", "--epochs", "2", *TINY, "--out", str(out)]) == 0
    before = snapshot(out)
    # Given options that differ are refused as on any resume; the dry run is left as it was.
    assert main(["train", "--resume", "--lr", "0.01", "--quiet", "--out", str(out)]) == 2
    one_line_error(capsys, "a resumed run keeps its settings", "--lr 0.01 (dry run: 0.005)", "Drop --resume")
    assert main(["train", "--resume", "--norm", "batch", "--epochs", "2", "--quiet", "--out", str(out)]) == 2
    one_line_error(capsys, "--norm 'batch' (dry run: 'torch')")
    assert snapshot(out) == before
    # Those not given come from the dry run (--tensorboard too), except --dry-run itself; --threads may differ.
    assert main(["train", "--resume", "--threads", "1", "--out", str(out)]) == 0
    assert "dry run's (one batch); starting the real run from the beginning with its settings" in capsys.readouterr().out
    config = strict_json(out / "config.json")
    assert (config["norm"], config["lr"], config["epochs"], config["train_limit"], config["batch_size"]) == (
        "torch", 0.005, 2, 200, 32)
    assert config["dry_run"] is False and config["tensorboard"] is False and config["quiet"] is False
    assert not list(out.glob("events.out.tfevents.*"))
    payload = load_checkpoint(out / "checkpoint.pt")
    assert payload["config"] == config and payload["epoch"] == 2 and payload["step"] == 10  # two whole epochs


def test_dry_resume_of_a_real_run_is_refused(finished, capsys):
    before = snapshot(finished)
    assert main(["train", "--resume", "--dry-run", "--quiet", "--out", str(finished)]) == 2
    one_line_error(capsys, "--dry-run", "real run")
    assert snapshot(finished) == before


# ------------------------------------------------------------------------------ 7: a fresh run into an earlier run

def test_rerun_with_the_same_settings_replaces_the_finished_run(tmp_path, capsys):
    out = tmp_path / "run"
    command = ["train", "--epochs", "1", *TINY[:-2], "--tensorboard", "--out", str(out)]
    assert main(command) == 0
    first = strict_json(out / "metrics.json")
    capsys.readouterr()
    assert main(command + ["--threads", "1"]) == 0  # how it runs is not what it computes
    assert "replacing the finished run" in capsys.readouterr().out
    assert strict_json(out / "metrics.json")["test_accuracy"] == first["test_accuracy"]
    assert len(list(out.glob("events.out.tfevents.*"))) == 1  # the earlier run's curves are gone, not mixed in


def test_fresh_run_refuses_to_replace_other_work(finished, tmp_path, capsys):
    before = snapshot(finished)
    base = ["train", "--epochs", "1", *TINY, "--out", str(finished)]
    assert main(base + ["--lr", "0.01"]) == 2
    one_line_error(capsys, f"--out {finished}", "--lr 0.001 there, 0.01 here", "--overwrite")
    assert main(base + ["--epochs", "2"]) == 2
    one_line_error(capsys, "--overwrite", "--resume --epochs 2")
    assert main(base + ["--dry-run"]) == 2
    one_line_error(capsys, "--dry-run", "--overwrite")
    assert snapshot(finished) == before

    unfinished = tmp_path / "unfinished"
    assert main(["train", "--epochs", "2", *TINY, "--out", str(unfinished)]) == 0
    payload = load_checkpoint(unfinished / "checkpoint.pt")
    payload["config"]["epochs"] = 3  # as if killed after epoch 2 of 3
    torch.save(payload, unfinished / "checkpoint.pt")
    assert main(["train", "--epochs", "3", *TINY, "--out", str(unfinished)]) == 2
    one_line_error(capsys, "unfinished run", "epoch 2 of 3", "--resume", "--overwrite")

    assert main(["train", "--epochs", "1", *TINY, "--overwrite", "--out", str(unfinished)]) == 0
    assert load_checkpoint(unfinished / "checkpoint.pt")["config"]["epochs"] == 1


def test_a_dry_run_is_replaced_without_asking(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--dry-run", *TINY, "--out", str(out)]) == 0
    assert main(["train", "--epochs", "1", *TINY, "--out", str(out)]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 5


# ------------------------------------------------------------------------------ 8, 13: compare checks everything first

def test_compare_validates_every_run_before_training(tmp_path, capsys):
    out = tmp_path / "compare"
    assert main(["compare", "--norms", "batch,instance", "--model", "mlp", "--dry-run", *TINY, "--out", str(out)]) == 2
    one_line_error(capsys, "instance", "mlp")
    assert not out.exists()  # batch was not trained first


@pytest.mark.parametrize("arguments, flags", [
    (["--seeds", "0,x"], ["--seeds", "'x'"]),
    (["--seeds", "0,0"], ["--seeds", "more than once"]),
    (["--norms", "batch,batch"], ["--norms", "more than once"]),
    (["--seeds", "0,-1"], ["--seed"]),
])
def test_compare_list_errors(tmp_path, capsys, arguments, flags):
    assert main(["compare", "--dry-run", *TINY, *arguments, "--out", str(tmp_path / "c")]) == 2
    one_line_error(capsys, *flags)
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------ 10: checkpoints that do not fit

def test_checkpoint_whose_config_does_not_fit_its_weights(finished, tmp_path, capsys):
    payload = load_checkpoint(finished / "checkpoint.pt")
    payload["config"]["model"] = "mlp"
    path = tmp_path / "run" / "checkpoint.pt"
    path.parent.mkdir()
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="its weights do not fit the model its config describes"):
        evaluate_checkpoint(path)
    assert main(["evaluate", "--checkpoint", str(path)]) == 2
    one_line_error(capsys, str(path), "do not fit")
    before = snapshot(path.parent)
    assert main(["train", "--resume", "--epochs", "2", "--quiet", "--no-tensorboard", "--out", str(path.parent)]) == 2
    one_line_error(capsys, str(path), "do not fit")
    assert snapshot(path.parent) == before


def test_checkpoint_with_an_unknown_setting(finished, tmp_path, capsys):
    payload = load_checkpoint(finished / "checkpoint.pt")
    payload["config"]["colour"] = "red"
    path = tmp_path / "checkpoint.pt"
    torch.save(payload, path)
    assert main(["evaluate", "--checkpoint", str(path)]) == 2
    one_line_error(capsys, str(path), "colour")
    assert main(["train", "--resume", "--quiet", "--out", str(tmp_path)]) == 2
    one_line_error(capsys, str(path), "colour")


# ------------------------------------------------------------------------------ 13: messages that match

def test_resume_cannot_shrink_epochs(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "2", *TINY, "--out", str(out)]) == 0
    before = snapshot(out)
    assert main(["train", "--resume", "--epochs", "1", "--quiet", "--out", str(out)]) == 2
    one_line_error(capsys, "--epochs 1", "already trained 2 epochs")
    assert snapshot(out) == before


@pytest.mark.skipif(not hasattr(os, "kill") or sys.platform == "win32", reason="needs POSIX signals")
def test_ctrl_c_waits_until_the_optimizer_is_built():
    """The first optimizer imports torch._dynamo/Triton, where a KeyboardInterrupt aborts the process: held back."""
    from normkit.lab.train import _interrupts_held

    reached = []
    # Python's own Ctrl-C handler for the test: a process started with SIGINT ignored (a background job of a
    # non-interactive shell) keeps ignoring it, and the lab respects that, as every Python program does.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with _interrupts_held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # (an unheld SIGINT raises here)
                reached.append("end of the block")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert reached == ["end of the block"]


def test_a_ctrl_c_before_training_starts_says_nothing_was_written(tmp_path, monkeypatch, capsys):
    """While the run's data and folder are checked: the line spoke of "finished runs", which a train has none of."""
    from normkit.lab import train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "plan_run", interrupted)
    out = tmp_path / "run"
    assert main(["train", "--epochs", "3", *TINY, "--out", str(out)]) == 130
    error = capsys.readouterr().err
    assert "before training started: nothing was written" in error and "finished runs" not in error, error
    assert not out.exists()


def test_interrupt_messages_say_what_is_saved(tmp_path, monkeypatch, capsys):
    from normkit.lab import train

    calls = {"count": 0}
    real_evaluate = train.evaluate

    def interrupt_on(call):
        def evaluate(*args, **kwargs):  # the end of each epoch evaluates on the validation images
            calls["count"] += 1
            if calls["count"] == call:
                raise KeyboardInterrupt
            return real_evaluate(*args, **kwargs)
        return evaluate

    out = tmp_path / "run"
    monkeypatch.setattr(train, "evaluate", interrupt_on(1))
    assert main(["train", "--epochs", "3", *TINY, "--out", str(out)]) == 130
    error = capsys.readouterr().err
    assert "before the first checkpoint: nothing to resume" in error and not (out / "checkpoint.pt").exists()

    calls["count"] = 0
    monkeypatch.setattr(train, "evaluate", interrupt_on(2))
    assert main(["train", "--epochs", "3", *TINY, "--out", str(out)]) == 130
    error = capsys.readouterr().err
    assert "holds epoch 1 of 3" in error and f"normkit train --out {out} --resume" in error

    def stop(step, model):
        if step == 3:
            raise KeyboardInterrupt
    with pytest.raises(RunInterrupted, match="before the first checkpoint"):
        run(TrainConfig(train_limit=200, batch_size=32, quiet=True, tensorboard=False, out=str(tmp_path / "api")),
            on_step=stop)


def test_help_texts(capsys):
    for command, expected in (("evaluate", ["--checkpoint FILE", "checkpoint.pt", "digits,mnist"]),
                              ("compare", ["comparison.json", "comparison.md"]),
                              ("train", ["--overwrite", "--norm-option virtual_batch_size"])):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        for phrase in expected:
            assert phrase in text, (command, phrase)


def test_argparse_errors_are_one_line(capsys):
    assert exit_code(["train", "--batch-size", "0"]) == 2
    one_line_error(capsys, "--batch-size")


def test_a_misspelled_option_is_reported_by_its_command(capsys):
    # `normkit train --help` lists train's options; `normkit --help` lists only the commands.
    for command, *rest in (("train",), ("compare",), ("evaluate", "--checkpoint", "run"), ("kernels", "status")):
        assert exit_code([command, *rest, "--nrom", "batch"]) == 2
        one_line_error(capsys, f"normkit {command}: error", "--nrom batch", f"`normkit {command} --help`")


# ------------------------------------------------------------------------------ the operating system says no

def normkit_process(argv: list[str], max_file_bytes: int | None = None, stdout=subprocess.PIPE):
    """The real `normkit` command in a child process; ``max_file_bytes`` makes the OS refuse larger files (EFBIG),
    as a full disk would (ENOSPC): the same failed write() for the program."""
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
    return subprocess.Popen([sys.executable, "-m", "normkit.cli", *argv], stdout=stdout, stderr=subprocess.PIPE,
                            text=True, preexec_fn=limit_file_size if max_file_bytes else None)


@pytest.mark.skipif(resource is None, reason="needs POSIX resource limits")
def test_a_write_the_disk_refuses_loses_nothing(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = snapshot(out)
    assert len(before["checkpoint.pt"]) > 100_000
    child = normkit_process(["train", "--out", str(out), "--resume", "--epochs", "2", *TINY], max_file_bytes=100_000)
    _, error = child.communicate(timeout=300)
    assert child.returncode == 1, error
    lines = error.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in error, error
    assert "normkit train: error:" in lines[0] and "File too large" in lines[0]
    assert str(out / "checkpoint.pt") in lines[0] and "previous checkpoint.pt, if any, is unchanged" in lines[0]
    # The epoch-1 checkpoint and metrics are intact and no temporary file is left (config.json records the
    # new --epochs and --no-tensorboard, as any resume does): --resume still works.
    after = snapshot(out)
    assert sorted(after) == sorted(before)
    for name in ("checkpoint.pt", "metrics.json"):
        assert after[name] == before[name], name
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", *TINY]) == 0
    assert [r["epoch"] for r in strict_json(out / "metrics.json")["history"]] == [1, 2]


@pytest.mark.skipif(resource is None, reason="needs POSIX pipes and signals")
def test_a_closed_pipe_stops_quietly(tmp_path):
    """`normkit train | head -1`: the reader leaves; the program stops as Unix tools do (status 141, no traceback)."""
    reader, writer = os.pipe()
    child = normkit_process(["train", "--dry-run", "--no-tensorboard", "--out", str(tmp_path / "run")], stdout=writer)
    os.close(writer)
    os.close(reader)  # before the child has printed anything (it is still importing torch)
    _, error = child.communicate(timeout=300)
    assert child.returncode == 141, error
    assert error == "", error


def normkit_without(packages: list[str], argv: list[str]) -> subprocess.CompletedProcess:
    """The real `normkit` command in a child process where ``packages`` cannot be imported, as on a machine that
    installed normkit without its lab extras (``sys.modules[name] = None`` makes Python's import refuse it)."""
    code = (f"import sys\nfor name in {packages!r}: sys.modules[name] = None\n"
            "from normkit.cli import main\nsys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("package, argv, phrases", [
    # matplotlib is first imported for curves.png, after the last epoch: the whole training ended in a traceback.
    ("matplotlib", [], ["curves.png", "matplotlib", 'pip install "normkit[lab]"']),
    ("tensorboard", ["--tensorboard"], ["--tensorboard", "tensorboard", 'pip install "normkit[lab]"',
                                        "--no-tensorboard"]),
    ("sklearn", [], ["--dataset digits", "scikit-learn", 'pip install "normkit[lab]"']),
])
def test_a_missing_lab_extra_is_one_line_before_anything_is_written(tmp_path, package, argv, phrases):
    out = tmp_path / "run"
    result = normkit_without([package], ["train", "--out", str(out), *TINY, *argv])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    assert not out.exists()  # refused before the run folder was made


def test_a_missing_lab_extra_is_named_by_compare_and_evaluate(tmp_path, finished):
    result = normkit_without(["matplotlib"], ["compare", "--norms", "batch", "--out", str(tmp_path / "cmp"), *TINY])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "curves.png" in result.stderr and not (tmp_path / "cmp").exists()
    result = normkit_without(["sklearn"], ["evaluate", "--checkpoint", str(finished)])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "scikit-learn" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_tensorboard_is_not_needed_with_no_tensorboard(tmp_path):
    out = tmp_path / "run"
    result = normkit_without(["tensorboard"], ["train", "--out", str(out), "--epochs", "1", *TINY])
    assert result.returncode == 0, result.stderr
    assert (out / "curves.png").is_file() and not list(out.glob("events.out.tfevents.*"))


def test_compile_without_a_working_compiler_is_refused_before_the_folder_changes(finished, tmp_path):
    """--compile on a CPU without a C++ compiler (torch.compile's inductor needs one): a traceback at the first step,
    after the fresh run had deleted the finished run with the same settings it replaces; now one line, nothing lost."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = snapshot(out)
    # A compiler that does not exist, and an empty kernel cache (a cached kernel needs no compiler).
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "normkit.cli", "train", "--epochs", "1", "--out", str(out),
                             *TINY[:-1], "--compile"], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "--compile" in lines[0] and "C++ compiler" in lines[0] and "drop --compile" in lines[0], lines[0]
    assert snapshot(out) == before


def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path, capsys):
    """SIGTERM (a job scheduler's stop, `timeout`, `kill PID`) ended the process on the spot, silently, exit status
    -15; now it is reported as Ctrl-C is (what checkpoint.pt holds, the command that continues it), status 143."""
    out = tmp_path / "run"
    # The real command; a thread of its own sends the real signal once the first checkpoint is there.
    code = ("import os, signal, sys, threading, time\nfrom normkit.cli import main\n"
            f"checkpoint = {str(out / 'checkpoint.pt')!r}\n"
            "def stop():\n    while not os.path.exists(checkpoint): time.sleep(0.005)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "threading.Thread(target=stop, daemon=True).start()\nsys.exit(main(sys.argv[1:]))")
    argv = ["train", "--epochs", "40", "--out", str(out), *TINY]
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == 143, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("normkit train: terminated (SIGTERM) in epoch "), lines[0]
    assert f"`normkit train --out {out} --resume --epochs 40`" in lines[0]
    saved = load_checkpoint(out / "checkpoint.pt")["epoch"]
    assert 1 <= saved < 40 and f"holds epoch {saved} of 40" in lines[0]
    assert main(["train", "--out", str(out), "--resume", "--epochs", "40", "--quiet"]) == 0  # the hint works
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 40


def test_sigterm_during_a_comparison_names_compare_resume(tmp_path):
    out = tmp_path / "compare"
    code = ("import os, signal, sys, threading, time\nfrom normkit.cli import main\n"
            f"checkpoint = {str(out / 'none-seed0' / 'checkpoint.pt')!r}\n"
            "def stop():\n    while not os.path.exists(checkpoint): time.sleep(0.005)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "threading.Thread(target=stop, daemon=True).start()\nsys.exit(main(sys.argv[1:]))")
    argv = ["compare", "--norms", "batch,none", "--epochs", "40", "--out", str(out), *TINY]
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == 143, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "run none, seed 0: terminated (SIGTERM)" in lines[0] and "compare command with --resume" in lines[0]


# A second Ctrl-C while the first was handled raised a KeyboardInterrupt of its own: during the report it replaced the
# run's line by "interrupted before training started: nothing was written" (the checkpoint held an epoch), and during
# the interpreter's exit it printed a traceback ("Exception ignored in: <module 'threading'>"). The harness sends the
# real signals at chosen points of the real command: "report", the first in epoch 2's evaluation, the second while
# the report is composed, a third as the command returns; "write", two while epoch 2's checkpoint is being written
# (after its bytes are written, before the rename).
DOUBLE_CTRL_C = """
import os, signal, sys
from normkit.cli import main
from normkit.lab import checkpoint, train
where, sys.argv = sys.argv[1], ["normkit", *sys.argv[2:]]  # (main() reads them, as the normkit command does)
signal.signal(signal.SIGINT, signal.default_int_handler)  # (Python's own, as in a terminal)
def ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)
if where == "report":
    evaluate, message, calls = train.evaluate, train._interrupted_message, []
    def evaluate_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            ctrl_c()
        return evaluate(*args, **kwargs)
    def message_again(*args, **kwargs):
        ctrl_c()
        return message(*args, **kwargs)
    train.evaluate, train._interrupted_message = evaluate_then_stop, message_again
else:
    write, fsync, writing = checkpoint.atomic_write_bytes, os.fsync, []
    def counted_write(path, payload):
        writing.append(path)
        try:
            return write(path, payload)
        finally:
            writing.pop()
    def fsync_then_stop(fd):
        fsync(fd)
        if writing and os.path.exists(writing[0]):  # (epoch 2's checkpoint: epoch 1's is there)
            ctrl_c()
            ctrl_c()
    checkpoint.atomic_write_bytes, os.fsync = counted_write, fsync_then_stop
status = main()
ctrl_c()  # (one more as the command returns: the interpreter's exit)
sys.exit(status)
"""


@pytest.mark.skipif(not hasattr(os, "kill") or sys.platform == "win32", reason="needs POSIX signals")
@pytest.mark.parametrize("where", ["report", "write"])
def test_a_second_ctrl_c_while_the_first_is_handled_changes_nothing(tmp_path, where):
    out = tmp_path / "run"
    argv = ["train", "--epochs", "3", "--out", str(out), *TINY]
    result = subprocess.run([sys.executable, "-c", DOUBLE_CTRL_C, where, *argv], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 130, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr and "Exception" not in result.stderr, result.stderr
    # The report is the run's, and true: the checkpoint is whole and holds the epoch it names.
    saved = load_checkpoint(out / "checkpoint.pt")["epoch"]
    # ("write": the interrupt waits for the save, so epoch 2 is saved and the run stopped before epoch 3)
    assert lines[0].startswith(f"normkit train: interrupted in epoch {saved + 1}: ") and saved in (1, 2), lines[0]
    assert f"holds epoch {saved} of 3" in lines[0], lines[0]
    assert len(strict_json(out / "metrics.json")["history"]) == saved
    assert sorted(path.name for path in out.iterdir() if path.name.endswith(".tmp")) == []
    assert f"`normkit train --out {out} --resume --epochs 3`" in lines[0]
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3", "--quiet"]) == 0  # the hint works
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 3


@pytest.mark.skipif(not hasattr(os, "kill") or sys.platform == "win32", reason="needs POSIX signals")
def test_two_quick_ctrl_c_from_outside_give_one_line(tmp_path):
    """Two real SIGINTs a moment apart, as a user pressing Ctrl-C twice: one line, status 130, whatever the moment."""
    for attempt, gap in enumerate((0.0, 0.0005, 0.002)):
        out = tmp_path / f"run{attempt}"
        child = subprocess.Popen([sys.executable, "-m", "normkit.cli", "train", "--epochs", "400", "--out", str(out),
                                  *TINY], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 # (SIGINT's default action in the child, as in a terminal: see the compare test)
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        child.send_signal(signal.SIGINT)
        time.sleep(gap)
        child.send_signal(signal.SIGINT)
        _, error = child.communicate(timeout=120)
        assert child.returncode == 130, error
        lines = error.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in error and "Exception" not in error, error
        saved = load_checkpoint(out / "checkpoint.pt")["epoch"]
        assert lines[0].startswith("normkit train: interrupted in epoch ") and f"holds epoch {saved} of 400" in lines[0]


def test_a_program_s_own_sigterm_handler_is_left_alone(tmp_path):
    """From Python, a program that handles SIGTERM itself (a graceful shutdown of its own) keeps its handler during
    run(): only the default action, which ended the process silently, is replaced."""
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        def terminate(step, model):
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
        metrics = run(TrainConfig(train_limit=200, batch_size=32, epochs=1, quiet=True, tensorboard=False,
                                  out=str(tmp_path / "run")), on_step=terminate)
        assert received == [signal.SIGTERM] and metrics["steps"] == 5
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # (the program's, still)
    finally:
        signal.signal(signal.SIGTERM, previous)
    # With the default action, the same signal stops the run as Ctrl-C does (exit status 143 from the command).
    def terminate_default(step, model):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(RunInterrupted, match=r"^terminated \(SIGTERM\) in epoch 1, before the first checkpoint") as info:
        run(TrainConfig(train_limit=200, batch_size=32, epochs=1, quiet=True, tensorboard=False,
                        out=str(tmp_path / "other")), on_step=terminate_default)
    assert info.value.exit_status == 143 and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.parametrize("norm", ["batch", "torch"])
def test_bn_without_running_statistics_evaluates_a_split_of_1001_images(tmp_path, norm):
    """BN with track_running_stats=false evaluates with batch statistics: 1,001 validation images made batches of
    1,000 and 1, and the run died at its first validation ("Expected more than 1 value per channel"), unsaved."""
    out = tmp_path / "run"
    # 1,437 digits: --val-split 0.69624 leaves 436 training and 1,001 validation images.
    assert main(["train", "--norm", norm, "--norm-option", "track_running_stats=false", "--val-split", "0.69624",
                 "--epochs", "1", "--quiet", "--no-tensorboard", "--out", str(out)]) == 0
    metrics = strict_json(out / "metrics.json")
    assert metrics["val_size"] == 1001 and 0 <= metrics["history"][0]["val_accuracy"] <= 1


def test_a_last_evaluation_batch_of_one_image_changes_nothing_for_running_statistics():
    """The one image joins the batch before it; in eval mode with running statistics every image is on its own, so
    the accuracy is that of one image at a time, the loss the same up to float rounding."""
    from normkit.lab.models import build_model
    from normkit.lab.train import evaluate

    torch.manual_seed(0)
    model = build_model("lenet", "batch")
    model.train()
    model(torch.rand(64, 1, 28, 28))  # running statistics other than the initial ones
    images, labels = torch.rand(1001, 1, 28, 28), torch.randint(0, 10, (1001,))
    merged, single = evaluate(model, images, labels), evaluate(model, images, labels, batch_size=1)
    assert merged[1] == single[1] and merged[0] == pytest.approx(single[0], rel=1e-5)
    assert model.training  # (evaluate restores the mode)


def test_a_validation_split_of_one_image_is_refused_for_bn_without_running_statistics(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--norm", "torch", "--norm-option", "track_running_stats=false", "--train-limit", "10",
                 "--val-split", "0.1", "--batch-size", "3", "--quiet", "--no-tensorboard", "--out", str(out)]) == 2
    one_line_error(capsys, "validation split holds 1 image", "track_running_stats=false", "--val-split")
    assert not out.exists()
    # Running statistics evaluate one image as well as any.
    assert main(["train", "--norm", "torch", "--train-limit", "10", "--val-split", "0.1", "--batch-size", "3",
                 "--epochs", "1", "--quiet", "--no-tensorboard", "--out", str(out)]) == 0


def test_resume_from_a_damaged_checkpoint_says_how_to_go_on(finished, tmp_path, capsys):
    """--resume on a cut checkpoint.pt said what is wrong with the file ("truncated or corrupt") but neither the flag
    nor what to do, which the fresh run's refusal of the same file did say (--overwrite)."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "checkpoint.pt").write_bytes((finished / "checkpoint.pt").read_bytes()[:100_000])
    before = snapshot(out)
    assert main(["train", "--resume", "--epochs", "2", "--quiet", "--out", str(out)]) == 2
    one_line_error(capsys, str(out / "checkpoint.pt"), "truncated or corrupt", "--resume cannot continue from it",
                   "restore checkpoint.pt from a copy", "--overwrite instead of --resume")
    assert snapshot(out) == before
    # Weights that do not fit (another model's): the same remedy.
    payload = load_checkpoint(finished / "checkpoint.pt")
    payload["model"] = {"weight": torch.zeros(3)}
    torch.save(payload, out / "checkpoint.pt")
    assert main(["train", "--resume", "--epochs", "2", "--quiet", "--out", str(out)]) == 2
    one_line_error(capsys, "do not fit", "--overwrite instead of --resume")
    # The remedy works.
    assert main(["train", "--overwrite", "--epochs", "1", "--out", str(out), *TINY[:-1]]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
