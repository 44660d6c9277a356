"""A run killed mid-epoch and resumed ends with exactly the weights of an uninterrupted run (CPU, same seed)."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from normkit.lab.checkpoint import load_checkpoint

# 240 training images / batch 32 = 8 steps per epoch (the last batch has 16); 3 epochs = 24 steps.
RUN = ["--train-limit", "300", "--batch-size", "32", "--epochs", "3", "--quiet", "--no-tensorboard"]


def normkit(*arguments):
    # A fixed thread count: float sums are reproducible for a given number of threads.
    environment = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "normkit.cli", *arguments], capture_output=True, text=True,
                          env=environment)


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert normkit("train", "--out", str(straight), *RUN).returncode == 0

    # Killed at step 13, in the middle of epoch 2: no cleanup runs, the last checkpoint is epoch 1's.
    # TensorBoard on for this one: the resumed run must purge the steps the killed run logged after its checkpoint.
    died = normkit("train", "--out", str(killed), "--stop-after-steps", "13", *RUN, "--tensorboard")
    assert died.returncode == 75, died.stderr
    assert load_checkpoint(killed / "checkpoint.pt")["epoch"] == 1

    resumed = normkit("train", "--out", str(killed), "--resume", *RUN, "--tensorboard")
    assert resumed.returncode == 0, resumed.stderr

    expected, actual = (load_checkpoint(path / "checkpoint.pt") for path in (straight, killed))
    assert actual["epoch"] == expected["epoch"] == 3 and actual["step"] == expected["step"] == 24
    for name, tensor in expected["model"].items():
        assert torch.equal(actual["model"][name], tensor), name
    for index, state in expected["optimizer"]["state"].items():
        assert torch.equal(actual["optimizer"]["state"][index]["velocity"], state["velocity"])
    assert torch.equal(actual["rng"]["shuffle"], expected["rng"]["shuffle"])
    straight_metrics, killed_metrics = (json.loads((p / "metrics.json").read_text()) for p in (straight, killed))
    assert killed_metrics["test_accuracy"] == straight_metrics["test_accuracy"]
    assert [r["loss"] for r in killed_metrics["history"]] == [r["loss"] for r in straight_metrics["history"]]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(killed), size_guidance={"scalars": 0}).Reload()
    assert [event.step for event in events.Scalars("step/loss")] == list(range(1, 25))
    assert [event.step for event in events.Scalars("epoch/loss")] == [8, 16, 24]  # the step ending each epoch


# Run normkit, SIGKILLed at the first file it opens once checkpoint.pt has been renamed into place: the moment
# right after an epoch's checkpoint is saved, which a kill or Ctrl-C can hit as well as any other.
KILLED_AFTER_CHECKPOINT = """
import os, signal, sys
from normkit.cli import main
saved = []
def hook(event, arguments):
    if event == "os.rename" and str(arguments[1]).endswith("checkpoint.pt"):
        saved.append(True)
    elif saved and event == "open":
        os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_right_after_a_checkpoint_keeps_that_epoch_in_tensorboard(tmp_path):
    """Whatever checkpoint.pt holds is in the event files too: a run killed just after saving epoch 1 and resumed has
    the TensorBoard scalars and histograms of an uninterrupted run (epoch 1's were once lost for good: the resumed
    run keeps the events up to the checkpoint's step and starts logging after it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = ["--train-limit", "300", "--batch-size", "32", "--epochs", "2", "--quiet", "--tensorboard"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert normkit("train", "--out", str(straight), *run).returncode == 0
    died = subprocess.run([sys.executable, "-c", KILLED_AFTER_CHECKPOINT, "train", "--out", str(killed), *run],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert load_checkpoint(killed / "checkpoint.pt")["epoch"] == 1
    resumed = normkit("train", "--out", str(killed), "--resume", *run)
    assert resumed.returncode == 0, resumed.stderr

    expected, actual = (EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0}).Reload()
                        for path in (straight, killed))
    assert sorted(actual.Tags()["scalars"]) == sorted(expected.Tags()["scalars"])
    for tag in expected.Tags()["scalars"]:
        assert [(e.step, e.value) for e in actual.Scalars(tag)] == [(e.step, e.value) for e in expected.Scalars(tag)], tag
    assert [e.step for e in actual.Scalars("epoch/loss")] == [8, 16]  # the step ending each epoch
    assert sorted(actual.Tags()["histograms"]) == sorted(expected.Tags()["histograms"])
    for tag in expected.Tags()["histograms"]:
        assert [e.step for e in actual.Histograms(tag)] == [e.step for e in expected.Histograms(tag)] == [8, 16], tag


def test_resume_refuses_changed_settings_and_extends_epochs(tmp_path, capsys):
    from normkit.cli import main

    out = str(tmp_path)
    base = ["train", "--out", out, "--train-limit", "100", "--epochs", "1", "--quiet", "--no-tensorboard"]
    assert main(base) == 0
    assert main(base[:-4] + ["--quiet", "--no-tensorboard", "--resume", "--lr", "0.5"]) == 2
    assert "--lr 0.5 (checkpoint: 0.001)" in capsys.readouterr().err
    assert main(["train", "--out", out, "--resume", "--epochs", "2", "--quiet"]) == 0
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    assert payload["epoch"] == 2 and payload["config"]["train_limit"] == 100  # settings come from the checkpoint


def test_resume_without_checkpoint_starts_fresh(tmp_path, capsys):
    from normkit.cli import main

    assert main(["train", "--out", str(tmp_path), "--resume", "--dry-run", "--no-tensorboard"]) == 0
    assert "no checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize("norm", ["torch", "renorm"])
def test_resume_other_norms_in_process(tmp_path, norm):
    """Same property without subprocesses, for layers with extra state (renorm's statistics)."""
    from normkit.lab.config import TrainConfig
    from normkit.lab.train import run

    settings = dict(norm=norm, train_limit=200, batch_size=32, epochs=2, quiet=True, tensorboard=False)
    run(TrainConfig(out=str(tmp_path / "a"), **settings))
    run(TrainConfig(out=str(tmp_path / "b"), **{**settings, "epochs": 1}))
    run(TrainConfig(out=str(tmp_path / "b"), resume=True, **settings), given={"epochs"})
    expected, actual = (load_checkpoint(tmp_path / p / "checkpoint.pt")["model"] for p in ("a", "b"))
    assert all(torch.equal(actual[name], tensor) for name, tensor in expected.items())


def test_a_resume_from_python_takes_the_settings_it_is_given(tmp_path):
    """From Python no flag is typed: a resumed run(TrainConfig(resume=True, epochs=3)) silently kept the checkpoint's
    1 epoch, and a conflicting lr, or adam with a momentum it never reads, went through unrefused."""
    from normkit.lab.config import TrainConfig
    from normkit.lab.train import run

    settings = dict(train_limit=200, batch_size=32, quiet=True, tensorboard=False, out=str(tmp_path / "run"))
    run(TrainConfig(epochs=1, **settings))
    metrics = run(TrainConfig(epochs=3, resume=True, **settings))
    assert len(metrics["history"]) == 3 and load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 3
    with pytest.raises(ValueError, match=r"--lr 0\.5 \(checkpoint: 0\.001\)"):
        run(TrainConfig(epochs=3, resume=True, lr=0.5, **settings))
    with pytest.raises(ValueError, match="--momentum 0.9: --optimizer adam does not use it"):
        run(TrainConfig(optimizer="adam", momentum=0.9, **{**settings, "out": str(tmp_path / "adam")}))
    assert not (tmp_path / "adam").exists()
