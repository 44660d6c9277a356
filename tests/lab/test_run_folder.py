"""A run never deletes another run's files by accident, in the folder it trains in.

It tells data apart by its fingerprint, restarts an epoch-1 run with that run's settings, and
compare continues where it stopped."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from normkit.cli import main
from normkit.lab import data
from normkit.lab.checkpoint import load_checkpoint
from normkit.lab.config import TrainConfig
from normkit.lab.train import RunInterrupted, run

from lab_testing import TINY, one_line_error, snapshot, write_mnist


def killed_in_epoch_one(out: Path, **settings) -> None:
    """A run interrupted (Ctrl-C) at its 3rd step: config.json is written, checkpoint.pt not yet."""
    def stop(step, model):
        if step == 3:
            raise KeyboardInterrupt
    with pytest.raises(RunInterrupted, match="before the first checkpoint"):
        run(TrainConfig(out=str(out), quiet=True, **settings), on_step=stop)
    assert (out / "config.json").is_file() and not (out / "checkpoint.pt").exists()


# ------------------------------------------------------------------------------ a folder without checkpoint.pt

def test_a_finished_run_without_its_checkpoint_is_not_wiped(tmp_path, capsys):
    out = tmp_path / "run"
    command = ["train", "--epochs", "1", *TINY[:-1], "--out", str(out)]  # with TensorBoard events
    assert main(command) == 0
    (out / "checkpoint.pt").unlink()
    before = snapshot(out)
    assert main(command) == 2
    one_line_error(capsys, f"--out {out}", "metrics.json", "curves.png", "no checkpoint.pt", "--overwrite")
    assert main(command + ["--resume"]) == 2  # nothing to continue, and --resume must not wipe it either
    one_line_error(capsys, "metrics.json", "no checkpoint.pt", "--overwrite")
    assert snapshot(out) == before
    assert main(command + ["--overwrite"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1


def test_someone_elses_files_are_not_wiped(tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "metrics.json").write_text('{"mine": 1}')
    assert main(["train", "--dry-run", *TINY, "--out", str(out)]) == 2
    one_line_error(capsys, "metrics.json", "--overwrite")
    assert (out / "metrics.json").read_text() == '{"mine": 1}'

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "events.out.tfevents.1.host.1.0").write_bytes(b"someone's curves")
    assert main(["train", "--dry-run", *TINY, "--out", str(logs)]) == 2
    one_line_error(capsys, "event files", "--overwrite")
    assert (logs / "events.out.tfevents.1.host.1.0").read_bytes() == b"someone's curves"
    # --resume too (job scripts pass it always): it found no checkpoint, started over and deleted them.
    assert main(["train", "--dry-run", *TINY, "--out", str(logs), "--resume"]) == 2
    one_line_error(capsys, "--resume", "event files", "nothing to continue", "--overwrite")
    assert [p.name for p in logs.iterdir()] == ["events.out.tfevents.1.host.1.0"]
    assert (logs / "events.out.tfevents.1.host.1.0").read_bytes() == b"someone's curves"


def test_a_run_stopped_before_its_first_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    settings = dict(train_limit=200, batch_size=32, epochs=2)
    killed_in_epoch_one(out, **settings, tensorboard=True)
    before = snapshot(out)
    command = ["train", "--train-limit", "200", "--batch-size", "32", "--epochs", "2", "--out", str(out)]
    # Other settings: refused, listing them; the folder is untouched.
    assert main(command + ["--lr", "0.01", "--quiet"]) == 2
    one_line_error(capsys, f"--out {out}", "epoch 1", "--lr 0.001 there, 0.01 here", "--overwrite")
    assert snapshot(out) == before
    # The same command again, as the Ctrl-C message says: starts over.
    capsys.readouterr()
    assert main(command) == 0
    assert "stopped in epoch 1" in capsys.readouterr().out
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 10
    assert len(list(out.glob("events.out.tfevents.*"))) == 1  # the killed run's events are gone

    damaged = tmp_path / "damaged"
    killed_in_epoch_one(damaged, **settings, tensorboard=False)
    (damaged / "config.json").write_text("{ not json")
    assert main(command[:-1] + [str(damaged), "--quiet"]) == 2
    one_line_error(capsys, "config.json", "cannot be read", "--overwrite")
    assert (damaged / "config.json").read_text() == "{ not json"


# ------------------------------------------------------------------------------ --resume without checkpoint.pt

def test_resume_before_the_first_checkpoint_keeps_the_runs_settings(tmp_path, capsys):
    out = tmp_path / "run"
    killed_in_epoch_one(out, train_limit=300, batch_size=32, epochs=2, tensorboard=False)
    assert main(["train", "--out", str(out), "--resume", "--lr", "0.5", "--quiet"]) == 2
    one_line_error(capsys, "--lr 0.5", "config.json")
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert "starting from the beginning with the settings in" in capsys.readouterr().out
    payload = load_checkpoint(out / "checkpoint.pt")
    config = payload["config"]
    assert (config["train_limit"], config["batch_size"], config["epochs"], config["tensorboard"]) == (300, 32, 2, False)
    assert payload["epoch"] == 2 and payload["step"] == 16  # 240 images in batches of 32: 8 steps per epoch
    assert json.loads((out / "config.json").read_text())["train_limit"] == 300

    (out / "checkpoint.pt").unlink()
    (out / "metrics.json").unlink()
    (out / "curves.png").unlink()
    (out / "config.json").write_bytes(b"\xff\xfe")
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 2
    one_line_error(capsys, "config.json", "cannot be read")


# ------------------------------------------------------------------------------ the data fingerprint

def test_runs_on_other_data_are_told_apart(tmp_path, capsys):
    first, other = write_mnist(tmp_path / "first", seed=1), write_mnist(tmp_path / "other", seed=2)
    out = tmp_path / "run"
    command = ["train", "--dataset", "mnist", "--epochs", "1", *TINY, "--out", str(out)]
    assert main(command + ["--data-dir", str(first)]) == 0
    fingerprint = load_checkpoint(out / "checkpoint.pt")["data_sha256"]
    assert len(fingerprint) == 64 and json.loads((out / "metrics.json").read_text())["data_sha256"] == fingerprint
    before = snapshot(out)

    assert main(command + ["--data-dir", str(other)]) == 2
    one_line_error(capsys, f"--out {out}", "trained on other data", "--overwrite")
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--data-dir", str(other), "--quiet"]) == 2
    one_line_error(capsys, "--resume", "other data", "--data-dir")
    assert snapshot(out) == before

    moved = shutil.copytree(first, tmp_path / "moved")  # the same files elsewhere: the same data
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--data-dir", str(moved), "--quiet"]) == 0
    payload = load_checkpoint(out / "checkpoint.pt")
    assert payload["epoch"] == 2 and payload["data_sha256"] == fingerprint


def test_checkpoints_without_a_fingerprint_still_load_and_are_not_compared(tmp_path, capsys):
    first, other = write_mnist(tmp_path / "first", seed=1), write_mnist(tmp_path / "other", seed=2)
    out = tmp_path / "run"
    command = ["train", "--dataset", "mnist", "--epochs", "1", *TINY, "--out", str(out)]
    assert main(command + ["--data-dir", str(first)]) == 0
    payload = load_checkpoint(out / "checkpoint.pt")
    del payload["data_sha256"]  # as written before fingerprints existed
    torch.save(payload, out / "checkpoint.pt")
    assert "data_sha256" not in load_checkpoint(out / "checkpoint.pt")
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt")]) == 0
    assert main(command + ["--data-dir", str(other)]) == 0  # nothing to compare with: replaced as before


def test_the_fingerprint_covers_the_prepared_splits():
    from normkit.lab.batches import prepare_data

    splits = data.load_dataset("digits")
    base = prepare_data(TrainConfig(train_limit=200).resolved(), splits).fingerprint
    assert prepare_data(TrainConfig(train_limit=200, out="x").resolved(), data.load_dataset("digits")).fingerprint == base
    assert prepare_data(TrainConfig(train_limit=201).resolved(), splits).fingerprint != base
    assert prepare_data(TrainConfig(train_limit=200, val_split=0.3).resolved(), splits).fingerprint != base
    relabelled = data.Splits(train=splits.train, test=(splits.test[0], splits.test[1].roll(1)), sources=splits.sources)
    assert prepare_data(TrainConfig(train_limit=200).resolved(), relabelled).fingerprint != base


# ------------------------------------------------------------------------------ compare --resume

def test_compare_resumes_where_it_stopped(tmp_path, capsys):
    out = tmp_path / "compare"
    settings = ["--epochs", "2", *TINY]
    # As a compare interrupted during its second run: batch finished, none stopped in epoch 2.
    assert main(["train", "--norm", "batch", "--out", str(out / "batch-seed0"), *settings]) == 0

    def stop(step, model):
        if step == 7:
            raise KeyboardInterrupt
    with pytest.raises(RunInterrupted, match="holds epoch 1 of 2"):
        run(TrainConfig(norm="none", epochs=2, train_limit=200, batch_size=32, quiet=True, tensorboard=False,
                        out=str(out / "none-seed0")), on_step=stop)
    finished = snapshot(out / "batch-seed0")

    command = ["compare", "--norms", "batch,none", *settings, "--out", str(out)]
    assert main(command) == 2
    error = one_line_error(capsys, "run none, seed 0", "unfinished", "compare command with --resume")
    assert "normkit train" not in error
    assert main(command + ["--resume"]) == 0
    assert (out / "batch-seed0" / "checkpoint.pt").read_bytes() == finished["checkpoint.pt"]  # not trained again
    payload = load_checkpoint(out / "none-seed0" / "checkpoint.pt")
    assert payload["epoch"] == 2 and payload["step"] == 10
    summary = json.loads((out / "comparison.json").read_text())
    assert [len(summary[norm]["0"]["history"]) for norm in ("batch", "none")] == [2, 2]



def test_an_interrupted_compare_leaves_no_earlier_table_beside_its_runs(tmp_path, monkeypatch):
    """A smoke-test compare, then the real one stopped in its second run: comparison.md showed the dry runs' numbers
    beside real runs. The table goes when training starts, and --resume writes the uninterrupted comparison's."""
    from normkit.lab import compare as compare_module
    out, command = tmp_path / "compare", ["compare", "--norms", "batch,none", "--epochs", "1", *TINY]
    assert main(command + ["--dry-run", "--out", str(out)]) == 0
    assert (out / "comparison.md").exists()
    real_run, calls = compare_module.run, []

    def stopped_in_the_second_run(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run(*args, **kwargs)
    monkeypatch.setattr(compare_module, "run", stopped_in_the_second_run)
    assert main(command + ["--out", str(out)]) == 130
    assert not any((out / name).exists() for name in ("comparison.md", "comparison.json", "comparison.png"))
    monkeypatch.setattr(compare_module, "run", real_run)
    assert main(command + ["--out", str(out), "--resume"]) == 0
    assert main(command + ["--out", str(tmp_path / "uninterrupted")]) == 0
    assert (out / "comparison.md").read_text() == (tmp_path / "uninterrupted" / "comparison.md").read_text()


def test_compare_with_more_epochs_hints_compare_resume_not_a_lone_train(tmp_path, capsys):
    """A finished comparison run again with more --epochs: the hint was `normkit train --out RUN --resume --epochs N`
    for one run, which trains that run alone, and a later compare without --resume retrained it from scratch."""
    out = tmp_path / "compare"
    command = ["compare", "--norms", "batch,none", *TINY, "--out", str(out)]
    assert main(command + ["--epochs", "1"]) == 0
    capsys.readouterr()
    assert main(command + ["--epochs", "2"]) == 2
    error = one_line_error(capsys, "run batch, seed 0", "--epochs 1 there, 2 here",
                           "re-run the same compare command with --resume", "--epochs 2")
    assert "normkit train" not in error
    assert main(command + ["--epochs", "2", "--resume"]) == 0  # the hint works: every run trained on to epoch 2
    assert [load_checkpoint(out / run / "checkpoint.pt")["epoch"] for run in ("batch-seed0", "none-seed0")] == [2, 2]


def test_a_ctrl_c_between_runs_or_while_writing_the_comparison_says_compare_resume(tmp_path, monkeypatch, capsys):
    """Outside a run's training (the next run's checks, or comparison.md/.png being written) no run is training,
    but the comparison is still unfinished: its Ctrl-C message gives the compare --resume hint, as inside a run."""
    from normkit.lab import compare, train

    out = tmp_path / "compare"
    command = ["compare", "--norms", "batch,none", "--epochs", "1", *TINY, "--out", str(out)]
    real_plan = train.plan_run

    def plan_run(cfg, *args, **kwargs):  # the second run's checks, after the first run finished
        if cfg.norm == "none":
            raise KeyboardInterrupt
        return real_plan(cfg, *args, **kwargs)
    monkeypatch.setattr(train, "plan_run", plan_run)
    assert main(command) == 130
    error = capsys.readouterr().err
    assert "1 of 2 runs" in error and "compare command with --resume" in error, error
    monkeypatch.undo()

    def plot_curves(*args, **kwargs):  # comparison.png
        raise KeyboardInterrupt
    monkeypatch.setattr(compare, "plot_curves", plot_curves)
    assert main(command + ["--resume"]) == 130
    error = capsys.readouterr().err
    assert "2 of 2 runs" in error and "compare command with --resume" in error, error


def test_compare_resume_refuses_to_mix_the_checkpoints_settings_with_other_ones(tmp_path, capsys):
    """A resumed run keeps its checkpoint's --lr while a run that starts now takes the command's: a compare --resume
    without the interrupted command's options compared runs of different settings, silently. Norms whose
    drop_last defaults differ (ghost) are no mix."""
    out = tmp_path / "compare"
    command = ["compare", "--norms", "batch,none,ghost", "--epochs", "1", *TINY, "--out", str(out)]
    assert main(command + ["--lr", "0.01"]) == 0
    shutil.rmtree(out / "none-seed0")  # (as if killed before it started)
    capsys.readouterr()
    assert main(command + ["--resume"]) == 2
    one_line_error(capsys, "run none, seed 0 has --lr 0.001", "run batch, seed 0 has 0.01", "options of the interrupted")
    assert not (out / "none-seed0").exists()
    assert main(command + ["--resume", "--lr", "0.01"]) == 0, capsys.readouterr().err
    assert json.loads((out / "none-seed0" / "config.json").read_text())["lr"] == 0.01

# ------------------------------------------------------------------------------ paths and leftovers

def test_relative_paths_are_stored_absolute(tmp_path, monkeypatch, capsys):
    write_mnist(tmp_path / "work" / "idx", seed=1)
    monkeypatch.chdir(tmp_path / "work")
    assert main(["train", "--dataset", "mnist", "--data-dir", "idx", "--dry-run", *TINY, "--out", "run"]) == 0
    config = json.loads((tmp_path / "work" / "run" / "config.json").read_text())
    assert config["out"] == str(tmp_path / "work" / "run") and config["data_dir"] == str(tmp_path / "work" / "idx")
    monkeypatch.chdir(tmp_path)  # elsewhere: the checkpoint still finds its data
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", "work/run", "--json"]) == 0  # a run folder is taken as its checkpoint
    result = json.loads(capsys.readouterr().out)
    assert result["test_size"] == 40 and result["checkpoint"] == str(Path("work/run/checkpoint.pt"))

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert main(["train", "--dry-run", *TINY, "--out", "~/run"]) == 0
    assert (tmp_path / "home" / "run" / "checkpoint.pt").is_file() and not Path("~").exists()

    assert main(["train", "--dry-run", *TINY, "--data-dir", "", "--out", "empty"]) == 2
    one_line_error(capsys, "--data-dir")


def test_compare_puts_its_table_beside_its_runs_under_a_tilde_out(tmp_path, monkeypatch):
    """`--out=~/cmp` (no shell expands a tilde after `=`): the runs went to $HOME/cmp while comparison.md, .json and
    .png went to a folder named `~` in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--norms", "batch,none", "--dry-run", *TINY, "--out=~/cmp"]) == 0
    out = tmp_path / "home" / "cmp"
    assert {p.name for p in out.iterdir()} == {"batch-seed0", "none-seed0", "comparison.md", "comparison.json",
                                              "comparison.png"}
    assert not Path("~").exists()


def test_evaluate_expands_a_tilde_as_train_does(tmp_path, monkeypatch, capsys):
    """train --out=~/run writes $HOME/run; evaluate --checkpoint=~/run looked for a folder named `~`."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--dry-run", *TINY, "--out=~/run"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint=~/run", "--json"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(tmp_path / "home" / "run" / "checkpoint.pt")


def test_leftover_temporaries_are_removed_when_a_run_starts(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    leftovers = []
    for name in ("checkpoint.pt", "metrics.json", "config.json", "curves.png"):
        # The names atomic_write_bytes gives its temporaries, as a SIGKILL mid-write leaves them.
        handle, path = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
        os.write(handle, b"half a file")
        os.close(handle)
        leftovers.append(Path(path))
    kept = [out / "notes.tmp", out / ".checkpoint.pt.mine.tmp", out / ".checkpoint.pt.abcdefgh.tmp.keep"]
    for path in kept:
        path.write_text("not the lab's")
    assert main(["train", "--dry-run", *TINY, "--out", str(out)]) == 0
    assert not any(path.exists() for path in leftovers)
    assert all(path.read_text() == "not the lab's" for path in kept)


def test_an_interrupted_compare_says_how_to_continue(tmp_path):
    """Ctrl-C (a real SIGINT) during a comparison: the message names the compare --resume that continues it."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "compare"
    child = subprocess.Popen([sys.executable, "-m", "normkit.cli", "compare", "--norms", "batch,none", "--epochs",
                              "400", *TINY, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True,
                             # (SIGINT's default action in the child: one started from a background job of a
                             # non-interactive shell inherits it ignored, and rightly ignores the Ctrl-C then)
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (out / "batch-seed0" / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    child.send_signal(signal.SIGINT)
    _, error = child.communicate(timeout=120)
    assert child.returncode == 130, error
    assert "run batch, seed 0: interrupted in epoch" in error and "compare command with --resume" in error, error


# ------------------------------------------------------------------------------ resumed runs: hints and records

def test_the_hint_of_a_run_interrupted_while_training_longer_continues_it(tmp_path, capsys):
    """A finished 1-epoch run resumed with --epochs 2 and interrupted in epoch 2: its checkpoint's settings still
    say 1 epoch, so the printed command must carry --epochs 2, and following it trains epoch 2."""
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", *TINY, "--out", str(out)]) == 0

    def stop(step, model):
        if step == 7:  # (epoch 2 of 5 steps each)
            raise KeyboardInterrupt
    with pytest.raises(RunInterrupted) as interrupted:
        run(TrainConfig(out=str(out), resume=True, epochs=2, quiet=True, train_limit=200, batch_size=32,
                        tensorboard=False), given={"out", "resume", "epochs", "quiet"}, on_step=stop)
    hint = str(interrupted.value).split("continue with `")[1].rstrip("`")
    assert hint.endswith("--resume --epochs 2"), hint
    assert main([*hint.split()[1:], "--quiet"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2


def test_a_finished_run_resumed_from_a_moved_data_folder_records_it_in_its_checkpoint(tmp_path, capsys):
    data = write_mnist(tmp_path / "data", seed=0)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "mnist", "--data-dir", str(data), "--epochs", "1", *TINY,
                 "--out", str(out)]) == 0
    moved = data.rename(tmp_path / "moved")
    assert main(["train", "--out", str(out), "--resume", "--data-dir", str(moved), "--quiet"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["config"]["data_dir"] == str(moved)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out)]) == 0, capsys.readouterr().err  # (the moved folder)
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0


def test_compare_resume_reads_the_folder_its_runs_trained_on(tmp_path, monkeypatch, capsys):
    """As `normkit train --resume`: NORMKIT_DATA unset, or pointing at other data, changes nothing."""
    data, other = write_mnist(tmp_path / "data", seed=0), write_mnist(tmp_path / "other", seed=1)
    out = tmp_path / "compare"
    command = ["compare", "--norms", "batch,none", "--dataset", "mnist", "--epochs", "1", *TINY, "--out", str(out)]
    monkeypatch.setenv("NORMKIT_DATA", str(data))
    assert main(command) == 0
    table = (out / "comparison.md").read_text()
    for environment in (None, str(other)):
        if environment is None:
            monkeypatch.delenv("NORMKIT_DATA")
        else:
            monkeypatch.setenv("NORMKIT_DATA", environment)
        capsys.readouterr()
        assert main(command + ["--resume"]) == 0, capsys.readouterr().err
        assert (out / "comparison.md").read_text() == table


def test_compare_resume_records_the_folder_it_read_in_runs_that_start_now(tmp_path, monkeypatch, capsys):
    """A comparison killed before its second run started: resumed with NORMKIT_DATA unset (or pointing elsewhere),
    that run trains on the recorded folder's data and must say so in config.json and its checkpoint, or evaluate
    and `train --resume` of it look for data in no folder (null) or in the wrong one."""
    data, other = write_mnist(tmp_path / "data", seed=0), write_mnist(tmp_path / "other", seed=1)
    out = tmp_path / "compare"
    command = ["compare", "--norms", "batch,none", "--dataset", "mnist", "--epochs", "1", *TINY, "--out", str(out)]
    monkeypatch.setenv("NORMKIT_DATA", str(data))
    assert main(command) == 0
    for environment in (None, str(other)):
        shutil.rmtree(out / "none-seed0")  # (as if killed before it started)
        if environment is None:
            monkeypatch.delenv("NORMKIT_DATA", raising=False)
        else:
            monkeypatch.setenv("NORMKIT_DATA", environment)
        capsys.readouterr()
        assert main(command + ["--resume"]) == 0, capsys.readouterr().err
        assert json.loads((out / "none-seed0" / "config.json").read_text())["data_dir"] == str(data)
        assert load_checkpoint(out / "none-seed0" / "checkpoint.pt")["config"]["data_dir"] == str(data)
        assert main(["evaluate", "--checkpoint", str(out / "none-seed0")]) == 0, capsys.readouterr().err
        assert main(["train", "--out", str(out / "none-seed0"), "--resume", "--quiet"]) == 0, capsys.readouterr().err


# ------------------------------------------------------------------------------ two runs into one folder at once

SMALL = dict(train_limit=200, batch_size=32, quiet=True, tensorboard=False)


@pytest.mark.parametrize("existing", [False, True], ids=["new folder", "folder of a finished run"])
def test_a_second_run_into_a_folder_in_use_is_refused_and_changes_nothing(tmp_path, capsys, existing):
    """While one run trains, a second into the same folder (another shell's `normkit train`, a compare) deleted the
    first's temporaries mid-write, or its checkpoint as a fresh run's stale files. It is refused, by the folder's
    lock, before it reads or writes anything; the first run ends as it would alone."""
    out = tmp_path / "run"
    if existing:
        run(TrainConfig(out=str(out), epochs=1, **SMALL))
    seen = {}

    def second_run(step, model):
        if step == 7:  # (epoch 2: the first checkpoint is written)
            seen["files"] = snapshot(out)
            for attempt in ("python", "command"):
                try:
                    if attempt == "python":
                        run(TrainConfig(out=str(out), epochs=1, overwrite=True, **SMALL))
                    else:
                        seen["status"] = main(["train", "--out", str(out), "--overwrite", "--epochs", "1", *TINY])
                        seen["error"] = capsys.readouterr().err
                except ValueError as error:
                    seen[attempt] = error
            seen["after"] = snapshot(out)

    first = run(TrainConfig(out=str(out), epochs=3, resume=existing, **SMALL), on_step=second_run)
    assert "another normkit run is writing to this folder now" in str(seen["python"])
    assert seen["status"] == 2 and "another normkit run is writing to this folder now" in seen["error"]
    assert seen["after"] == seen["files"]  # (nothing read or written by the refused runs)
    # The first run is the run it would have been alone (a resumed run equals an uninterrupted one: test_resume).
    alone = run(TrainConfig(out=str(tmp_path / "alone"), epochs=3, **SMALL))
    assert first["test_accuracy"] == alone["test_accuracy"]
    ours, theirs = (load_checkpoint(folder / "checkpoint.pt") for folder in (out, tmp_path / "alone"))
    assert ours["epoch"] == theirs["epoch"] == 3
    for key, value in theirs["model"].items():
        assert torch.equal(ours["model"][key], value), key
    # Once it has ended, the folder is free again.
    assert run(TrainConfig(out=str(out), epochs=4, resume=True, **SMALL))["history"][-1]["epoch"] == 4


def test_a_run_planned_before_another_made_its_folder_changes_nothing(tmp_path):
    """The one moment the lock cannot cover: this run's plan found no folder, and another run made it, wrote its
    files and ended before this one made it. Taken as fresh, this run deleted that run's files; it is refused."""
    import contextlib

    from normkit.lab import train
    from normkit.lab.runfolder import folder_lock
    out = tmp_path / "run"
    plan = train.plan_run(TrainConfig(out=str(out), epochs=1, **SMALL))
    run(TrainConfig(out=str(out), epochs=1, **SMALL))  # the other run, from start to end
    files = snapshot(out)
    with contextlib.ExitStack() as locks:
        with pytest.raises(ValueError, match="another normkit run created this folder and wrote to it"):
            train._run(plan, None, lambda folder: locks.enter_context(folder_lock(folder)))
    assert snapshot(out) == files
