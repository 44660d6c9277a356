"""Which data a run's files name and `evaluate` reads: the folder the run trained on, and of it only the test split."""

import json
import shutil

import pytest

from normkit.cli import main
from normkit.lab.checkpoint import load_checkpoint
from normkit.lab.train import evaluate_checkpoint

from lab_testing import SHARED_MNIST, TINY, one_line_error, write_mnist


def evaluated(capsys, *arguments: str) -> dict:
    """The --json result of `normkit evaluate ARGUMENTS`, which must succeed."""
    capsys.readouterr()
    assert main(["evaluate", *arguments, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------------------ evaluate reads the test split only

@pytest.fixture(scope="module")
def mnist_run(mnist_split_dir, tmp_path_factory):
    """A dry run on the real MNIST sample split (8,000 train / 2,000 test images)."""
    out = tmp_path_factory.mktemp("mnist-run") / "run"
    assert main(["train", "--dataset", "mnist", "--data-dir", str(mnist_split_dir), "--dry-run", "--quiet",
                 "--no-tensorboard", "--out", str(out)]) == 0
    return out


def test_evaluate_needs_only_the_test_files(mnist_run, mnist_split_dir, tmp_path, capsys):
    full = evaluated(capsys, "--checkpoint", str(mnist_run), "--data-dir", str(mnist_split_dir))
    assert full["test_size"] == 2000
    only_test = tmp_path / "only-test"
    only_test.mkdir()
    for path in (mnist_split_dir / "mnist").glob("t10k-*"):
        shutil.copy(path, only_test / path.name)
    assert evaluated(capsys, "--checkpoint", str(mnist_run), "--data-dir", str(only_test)) == full
    # The shared sample itself: only the t10k files, all 10,000 test images (the fixture needs it, so it is there).
    assert not list(SHARED_MNIST.glob("train-*"))
    assert evaluated(capsys, "--checkpoint", str(mnist_run), "--data-dir", str(SHARED_MNIST))["test_size"] == 10000


def test_a_damaged_train_file_stops_training_not_evaluation(mnist_run, mnist_split_dir, tmp_path, capsys):
    full = evaluated(capsys, "--checkpoint", str(mnist_run))  # the folder the run trained on
    damaged = tmp_path / "damaged"
    shutil.copytree(mnist_split_dir / "mnist", damaged)
    (images,) = damaged.glob("train-images-idx3-ubyte*")  # (the fixture writes them uncompressed)
    images.write_bytes(images.read_bytes()[:-100])
    assert evaluated(capsys, "--checkpoint", str(mnist_run), "--data-dir", str(damaged)) == full
    # Training still checks both splits' files.
    assert main(["train", "--dataset", "mnist", "--data-dir", str(damaged), "--dry-run", "--quiet",
                 "--out", str(tmp_path / "run")]) == 2
    one_line_error(capsys, "train-images-idx3-ubyte", "truncated")
    (labels,) = damaged.glob("train-labels-idx1-ubyte*")
    labels.unlink()
    assert evaluated(capsys, "--checkpoint", str(mnist_run), "--data-dir", str(damaged)) == full
    assert main(["train", "--dataset", "mnist", "--data-dir", str(damaged), "--dry-run", "--quiet",
                 "--out", str(tmp_path / "run")]) == 2
    one_line_error(capsys, "missing file", "train-labels-idx1-ubyte")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ the folder a run records

def test_a_folder_from_normkit_data_is_recorded_and_evaluated(tmp_path, monkeypatch, capsys):
    write_mnist(tmp_path / "a" / "mnist", seed=1, test=40)
    write_mnist(tmp_path / "b" / "mnist", seed=2, test=30)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NORMKIT_DATA", "a")  # relative: recorded absolute
    assert main(["train", "--dataset", "mnist", "--dry-run", *TINY, "--out", "run"]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data_dir"] == str(tmp_path / "a")
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["config"]["data_dir"] == str(tmp_path / "a")

    expected = evaluated(capsys, "--checkpoint", "run", "--data-dir", str(tmp_path / "a"))
    assert expected["test_size"] == 40
    monkeypatch.setenv("NORMKIT_DATA", "")  # unset: the run's own folder
    assert evaluated(capsys, "--checkpoint", "run") == expected
    monkeypatch.setenv("NORMKIT_DATA", str(tmp_path / "b"))  # other files: still the run's own folder
    assert evaluated(capsys, "--checkpoint", "run") == expected
    assert evaluated(capsys, "--checkpoint", "run", "--data-dir", "b")["test_size"] == 30  # unless told otherwise

    # The embedded digits read no folder: NORMKIT_DATA is not theirs to record; an explicit --data-dir still is.
    assert main(["train", "--dry-run", *TINY, "--out", "digits"]) == 0
    assert json.loads((tmp_path / "digits" / "config.json").read_text())["data_dir"] is None
    assert main(["train", "--dry-run", *TINY, "--data-dir", "a", "--out", "digits"]) == 0
    assert json.loads((tmp_path / "digits" / "config.json").read_text())["data_dir"] == str(tmp_path / "a")


def test_resume_reads_the_folder_the_run_trained_on(tmp_path, monkeypatch, capsys):
    write_mnist(tmp_path / "a" / "mnist", seed=1)
    write_mnist(tmp_path / "b" / "mnist", seed=2)
    out = tmp_path / "run"
    monkeypatch.setenv("NORMKIT_DATA", str(tmp_path / "a"))
    assert main(["train", "--dataset", "mnist", "--epochs", "1", *TINY, "--out", str(out)]) == 0
    monkeypatch.setenv("NORMKIT_DATA", str(tmp_path / "b"))  # other data now: the run keeps reading its own
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--quiet"]) == 0, capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["data_dir"] == str(tmp_path / "a")
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    # --data-dir may still change on --resume (the same data moved elsewhere), and the new folder is recorded.
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3", "--quiet",
                 "--data-dir", str(tmp_path / "moved")]) == 0, capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["data_dir"] == str(tmp_path / "moved")
    assert load_checkpoint(out / "checkpoint.pt")["config"]["data_dir"] == str(tmp_path / "moved")
    # Other data behind an explicit --data-dir is still refused by the fingerprint.
    assert main(["train", "--out", str(out), "--resume", "--epochs", "4", "--quiet",
                 "--data-dir", str(tmp_path / "b")]) == 2
    one_line_error(capsys, "--resume", "trained on other data", str(tmp_path / "b"))


def test_a_data_folder_that_is_gone_is_named_by_where_it_came_from(tmp_path, monkeypatch, capsys):
    """The data folder moved after training: --resume and evaluate said only "data directory X does not exist", a
    folder the user never typed, without the flag that fixes it; now they name it, its origin and --data-dir."""
    write_mnist(tmp_path / "a" / "mnist", seed=1)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "a"), "--epochs", "1", *TINY,
                 "--out", str(out)]) == 0
    (tmp_path / "a").rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--quiet"]) == 2
    one_line_error(capsys, f"data directory {tmp_path / 'a'} does not exist", "pass --data-dir",
                   f"the one the run trained on, recorded in {out / 'checkpoint.pt'}")
    assert main(["evaluate", "--checkpoint", str(out)]) == 2
    one_line_error(capsys, f"data directory {tmp_path / 'a'} does not exist", "pass --data-dir",
                   f"the one the run trained on, recorded in {out / 'checkpoint.pt'}")
    # NORMKIT_DATA's folder, for a fresh run (train) and for compare, which reads it directly.
    monkeypatch.setenv("NORMKIT_DATA", str(tmp_path / "a"))
    assert main(["train", "--dataset", "mnist", *TINY, "--out", str(tmp_path / "fresh")]) == 2
    one_line_error(capsys, "does not exist", "pass --data-dir", "NORMKIT_DATA")
    assert main(["compare", "--dataset", "mnist", *TINY, "--out", str(tmp_path / "cmp")]) == 2
    one_line_error(capsys, "does not exist", "pass --data-dir", "NORMKIT_DATA")
    # The remedy works: --data-dir with the moved folder (the same data: its fingerprint matches).
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--quiet",
                 "--data-dir", str(tmp_path / "moved")]) == 0, capsys.readouterr().err


def test_evaluate_on_another_dataset_never_reads_the_run_s_own_files_under_its_name(tmp_path, capsys):
    """The IDX files of MNIST, Fashion-MNIST and KMNIST have the same names: `evaluate --dataset fashion-mnist` of an
    MNIST run must not read the run's MNIST folder and call the result Fashion-MNIST's."""
    flat = write_mnist(tmp_path / "flat", seed=1, test=40)  # MNIST files directly in the folder
    assert main(["train", "--dataset", "mnist", "--data-dir", str(flat), "--dry-run", *TINY,
                 "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--dataset", "fashion-mnist"]) == 2
    one_line_error(capsys, "--dataset fashion-mnist", str(flat), "--data-dir")
    fashion = write_mnist(tmp_path / "fashion", seed=2, test=30)
    result = evaluated(capsys, "--checkpoint", str(tmp_path / "run"), "--dataset", "fashion-mnist", "--data-dir",
                       str(fashion))
    assert result["dataset"] == "fashion-mnist" and result["test_size"] == 30

    # DIR/<dataset>/ folders side by side: the run's DIR serves the other dataset from its own subfolder.
    write_mnist(tmp_path / "root" / "mnist", seed=3, test=40)
    write_mnist(tmp_path / "root" / "fashion-mnist", seed=4, test=20)
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "root"), "--dry-run", *TINY,
                 "--out", str(tmp_path / "nested")]) == 0
    assert evaluated(capsys, "--checkpoint", str(tmp_path / "nested"), "--dataset", "fashion-mnist")["test_size"] == 20


def test_evaluate_refuses_an_empty_data_dir_as_train_does(tmp_path, monkeypatch, capsys):
    write_mnist(tmp_path / "data", seed=1)
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--dry-run", *TINY,
                 "--out", str(tmp_path / "run")]) == 0
    monkeypatch.chdir(tmp_path / "data")  # "" would read the current folder, which holds the files
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--data-dir", ""]) == 2
    refusal = "--data-dir '': give a folder path (an empty one would mean the current folder by accident); omit it"
    one_line_error(capsys, "normkit evaluate: error: " + refusal, "the folder the run trained on")
    assert main(["train", "--dataset", "mnist", "--data-dir", "", "--dry-run", *TINY, "--out", "run"]) == 2
    one_line_error(capsys, "normkit train: error: " + refusal)  # the same words as train's
    with pytest.raises(ValueError, match="--data-dir '': give a folder path"):
        evaluate_checkpoint(tmp_path / "run", data_dir="")
