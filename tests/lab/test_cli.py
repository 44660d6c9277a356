"""Smoke tests of every `normkit` command and the contents of a run directory (config, metrics, checkpoint, events)."""

import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile

import pytest
import torch

from normkit.cli import main
from normkit.lab.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from normkit.lab.config import TrainConfig
from normkit.lab.models import build_model
from normkit.lab.train import run
from normkit.registry import NORM_NAMES

TINY = ["--train-limit", "200", "--batch-size", "32"]


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "normkit.cli", "train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for option in ("--dataset", "--data-dir", "--model", "--norm", "--activation", "--optimizer", "--lr",
                   "--batch-size", "--epochs", "--val-split", "--seed", "--train-limit", "--out", "--resume",
                   "--device", "--tensorboard", "--no-tensorboard", "--dry-run", "--recalibrate"):
        assert option in result.stdout, option


def test_train_help_states_the_defaults_the_run_uses():
    # A learner reads the defaults in `normkit train --help`, which restates them (TrainConfig holds them, cli.py
    # passes none): every literal "default: VALUE" there must be TrainConfig's. --norm keras's momentum must be said
    # as the layer holds it, the weight of the new batch (its help said "momentum 0.99", Keras' weight of the old
    # value, for a normkit.BatchNorm whose momentum is 0.01), and --drop-last's one-image rule holds without the flag.
    import re

    from normkit.cli import build_parser
    from normkit.lab.batches import training_batch_sizes
    from normkit.registry import create_norm

    train = build_parser().commands["train"]
    defaults = vars(TrainConfig())
    not_literal = {"data_dir", "lr", "drop_last", "batch_classes", "out"}  # ($NORMKIT_DATA, per optimizer, rules)
    checked = []
    for action in train._actions:
        match = re.search(r"default: ([^\s,;)]+)", action.help or "")
        if match is None or action.dest in not_literal:
            continue
        text = match.group(1)
        try:
            quoted = {"on": True, "off": False}[text] if text in ("on", "off") else json.loads(text)
        except ValueError:
            quoted = text
        assert quoted == defaults[action.dest], (action.dest, text)
        checked.append(action.dest)
    assert len(checked) >= 15 and {"batch_size", "epochs", "norm", "recalibrate", "threads"} <= set(checked)

    help_text = next(a.help for a in train._actions if a.dest == "norm")
    layer = create_norm("keras", 6, rank=4)
    assert float(re.search(r"keras = [^;]*?([\d.]+) on the new batch", help_text).group(1)) == layer.momentum
    assert float(re.search(r"epsilon ([\d.e-]+)", help_text).group(1)) == layer.eps
    assert "biased" in help_text and not layer.unbiased_running_var

    drop_help = next(a.help for a in train._actions if a.dest == "drop_last")
    assert "a last batch of 1 image is always dropped" in drop_help
    assert training_batch_sizes(129, TrainConfig(drop_last=False).resolved()) == [64, 64]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "dry"
    assert main(["train", "--dry-run", "--out", str(out)]) == 0
    return out


def test_train_dry_run_writes_everything(dry_run, capsys):
    names = {p.name for p in dry_run.iterdir()}
    assert {"config.json", "metrics.json", "checkpoint.pt", "curves.png"} <= names
    assert any(name.startswith("events.out.tfevents.") for name in names)
    assert not any(name.endswith(".tmp") for name in names)  # atomic writes leave no temporaries
    assert (dry_run / "config.json").stat().st_mode & 0o044  # readable by others, as a plain open() would make it


def test_config_json_is_every_setting_resolved(dry_run):
    config = json.loads((dry_run / "config.json").read_text())
    expected = TrainConfig(dry_run=True, out=str(dry_run)).resolved().to_dict()
    assert config == expected
    assert config["lr"] == 1e-3 and config["rho"] == 0.9 and config["eps"] == 1e-7  # Keras' RMSprop
    assert config["batch_size"] == 64 and config["epochs"] == 5 and config["val_split"] == 0.2


def test_metrics_json(dry_run):
    metrics = json.loads((dry_run / "metrics.json").read_text())
    assert set(metrics) >= {"history", "test_accuracy", "test_loss", "first_norm_layer"}
    (record,) = metrics["history"]
    assert set(record) >= {"epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds"}
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert len(metrics["first_norm_layer"]["weight"]) == 6  # LeNet's first norm follows conv(6)


def test_tensorboard_scalars_and_histograms(dry_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(dry_run), size_guidance={"histograms": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    assert {"step/loss", "step/accuracy", "epoch/loss", "epoch/val_accuracy"} <= set(tags["scalars"])
    histograms = set(tags["histograms"])
    assert {"norm/1.weight", "norm/1.bias", "norm/1.running_mean", "norm/1.running_var"} <= histograms
    assert sum(tag.startswith("preactivation/") for tag in histograms) == 4  # one per activation of LeNet


def test_checkpoint_round_trip(dry_run):
    payload = load_checkpoint(dry_run / "checkpoint.pt")  # weights_only=True inside
    model, cfg = model_from_checkpoint(payload)
    assert cfg.norm == "batch" and payload["epoch"] == 1
    images = torch.rand(8, 1, 28, 28)
    fresh = build_model(cfg.model, cfg.norm, cfg.activation, cfg.init)
    fresh.load_state_dict(torch.load(dry_run / "checkpoint.pt", weights_only=True)["model"])
    assert torch.equal(model.eval()(images), fresh.eval()(images))


def test_evaluate_command(dry_run, capsys):
    assert main(["evaluate", "--checkpoint", str(dry_run / "checkpoint.pt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dataset"] == "digits" and result["test_size"] == 360
    assert 0.0 <= result["test_accuracy"] <= 1.0


@pytest.mark.parametrize("content, message", [
    (b"", "no zip archive header"),
    (b"not a checkpoint at all", "no zip archive header"),
])
def test_foreign_files_are_clear_errors(tmp_path, capsys, content, message):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
    assert main(["evaluate", "--checkpoint", str(path)]) == 2
    assert str(path) in capsys.readouterr().err


def test_truncated_checkpoint(dry_run, tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes((dry_run / "checkpoint.pt").read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="truncated or corrupt checkpoint"):
        load_checkpoint(path)


def flip_a_tensor_byte(path):
    """Flip one bit in the middle of a tensor's stored bytes, keeping the zip archive's structure valid."""
    with zipfile.ZipFile(path) as archive:
        entry = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        assert entry.compress_type == zipfile.ZIP_STORED  # torch.save stores tensors uncompressed
    raw = bytearray(path.read_bytes())
    # A local file header is 30 bytes, then the name and the extra field, then the data.
    name_length, extra_length = struct.unpack("<HH", raw[entry.header_offset + 26:entry.header_offset + 30])
    raw[entry.header_offset + 30 + name_length + extra_length + entry.file_size // 2] ^= 0x40
    path.write_bytes(bytes(raw))
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() and archive.testzip() == entry.filename  # readable, but its CRC fails
    return entry.filename


def test_a_checkpoint_with_flipped_bits_is_refused(dry_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(dry_run, out)
    path = out / "checkpoint.pt"
    damaged_entry = flip_a_tensor_byte(path)
    with pytest.raises(CheckpointError, match=f"{path}: damaged.*{damaged_entry}"):
        load_checkpoint(path)
    assert main(["evaluate", "--checkpoint", str(path)]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and str(path) in error and "damaged" in error
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["train", "--resume", "--quiet", "--out", str(out)]) == 2
    assert "damaged" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_evaluate_json_is_strict_and_takes_a_run_folder(dry_run, tmp_path, capsys):
    payload = load_checkpoint(dry_run / "checkpoint.pt")
    payload["model"]["0.weight"][0, 0, 0, 0] = float("nan")  # a diverged model: NaN logits, NaN loss
    (tmp_path / "run").mkdir()
    torch.save(payload, tmp_path / "run" / "checkpoint.pt")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--json"]) == 0

    def refuse(constant):
        raise AssertionError(f"evaluate --json printed {constant}")
    result = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert result["test_loss"] is None and result["checkpoint"] == str(tmp_path / "run" / "checkpoint.pt")
    assert main(["evaluate", "--checkpoint", str(tmp_path)]) == 2  # a folder without checkpoint.pt
    assert str(tmp_path / "checkpoint.pt") in capsys.readouterr().err


def test_other_torch_file(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.ones(3)}, path)
    with pytest.raises(CheckpointError, match="not a normkit lab checkpoint"):
        load_checkpoint(path)


def test_a_checkpoint_of_another_version_is_refused(dry_run, tmp_path):
    payload = load_checkpoint(dry_run / "checkpoint.pt")
    payload["version"] = 2  # (a later format: its fields may mean something else)
    path = tmp_path / "checkpoint.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="checkpoint version 2, this normkit reads version 1"):
        load_checkpoint(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.pt")


def test_evaluate_a_folder_that_is_not_a_run_folder(dry_run, tmp_path, capsys):
    # `normkit evaluate --checkpoint runs`: the folder above the runs names them; a folder without any says what to pass.
    assert main(["evaluate", "--checkpoint", str(dry_run.parent)]) == 2
    one_line_naming(capsys, dry_run.parent, "not a run folder", f"run folders in it: {dry_run}")
    assert main(["evaluate", "--checkpoint", str(tmp_path)]) == 2
    one_line_naming(capsys, tmp_path, "not a run folder", "DIR/checkpoint.pt")


def one_line_naming(capsys, path, *phrases: str) -> str:
    """The stderr of a refused command: one line, no traceback or terminal escapes, naming ``path`` and ``phrases``."""
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error and "\x1b" not in error, error
    for phrase in (str(path), *phrases):
        assert phrase in error, (phrase, error)
    return error


def edited_checkpoint(dry_run, folder, edit):
    """``folder``/checkpoint.pt: the dry run's checkpoint with its dict changed by ``edit``, saved by torch.save."""
    payload = load_checkpoint(dry_run / "checkpoint.pt")
    edit(payload)
    folder.mkdir()
    torch.save(payload, folder / "checkpoint.pt")
    return folder / "checkpoint.pt"


def opened(path):
    """What evaluate does with a checkpoint before it loads any data: load it, rebuild its config and model."""
    return model_from_checkpoint(load_checkpoint(path), path)


@pytest.mark.parametrize("edit, problem", [
    (lambda p: p["rng"].pop("shuffle"), "its rng entry lacks ['shuffle']"),
    (lambda p: p["rng"].update(shuffle=torch.zeros(3, dtype=torch.uint8)),
     "its rng entry 'shuffle' is not a valid generator state (Expected a CPUGeneratorImplState of size"),
    (lambda p: p["rng"].update(torch=p["rng"]["torch"].float()), "its rng entry 'torch' is not a valid generator state"),
    (lambda p: p["rng"]["numpy"].update(keys=torch.zeros(3, dtype=torch.int64)),
     "its rng entry 'numpy' is not a valid generator state"),
    (lambda p: p["rng"]["python"].update(state=[1, 2, 3]), "its rng entry 'python' is not a valid generator state"),
    (lambda p: p["rng"].update(cuda="none"), "its rng entry 'cuda' is not a valid generator state"),
    (lambda p: p.update(rng=None), "its rng entry is None, not a dict"),
    (lambda p: p.update(epoch="1"), "its epoch is '1', not a whole number >= 0"),
    (lambda p: p.update(epoch=-1), "its epoch is -1, not a whole number >= 0"),
    (lambda p: p.update(step=None), "its step is None, not a whole number >= 0"),
    (lambda p: p.update(history=None), "its history is None, not a list of per-epoch records"),
    (lambda p: p.update(history=[1]), "its history is [1], not a list of per-epoch records"),
    # (records without their keys: a resumed finished run drew its curves from them, a KeyError traceback)
    (lambda p: p.update(history=[{"epoch": 1}]), "its history is [{'epoch': 1}], not a list of per-epoch records"),
    (lambda p: p["history"][0].update(loss="low"), "its history is a list, not a list of per-epoch records"),
    (lambda p: p.update(model=None), "its model is None, not a state_dict"),
    (lambda p: p.update(optimizer=[]), "its optimizer is [], not an optimizer's state_dict"),
    (lambda p: p.update(data_sha256=5), "its data_sha256 is 5"),
    (lambda p: p.update(recalibration={"batches": 2}), "its recalibration entry is {'batches': 2}"),
    (lambda p: p["config"].update(norm_options="abc"), "its stored settings are invalid (--norm-option"),
    (lambda p: p["config"].update(dataset="cifar"), "its stored settings are invalid (--dataset 'cifar'"),
    (lambda p: p["config"].update(momentum=2.0), "its stored settings are invalid (--momentum=2.0 must be in [0, 1]"),
    (lambda p: p["config"].update(norm_options={"momentum": "fast"}), "its stored settings are invalid (--norm-option"),
    (lambda p: p["config"].update(dry_run="false"), "its config has dry_run 'false', not true or false"),
])
def test_malformed_entries_are_one_line_errors_naming_the_file(dry_run, tmp_path, capsys, edit, problem):
    path = edited_checkpoint(dry_run, tmp_path / "run", edit)
    with pytest.raises(CheckpointError) as refusal:
        opened(path)
    assert str(refusal.value).startswith(f"{path}: {problem}"), str(refusal.value)
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    assert main(["evaluate", "--checkpoint", str(path)]) == 2
    one_line_naming(capsys, path, problem)
    # --dry-run resumes the dry run (restoring its RNG states); without it the real run would start over.
    for resume in (["--dry-run"], []):
        assert main(["train", "--resume", *resume, "--quiet", "--no-tensorboard", "--out", str(path.parent)]) == 2
        one_line_naming(capsys, path, problem)
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == before


def test_rng_states_that_cannot_be_restored_name_the_file(dry_run, tmp_path, capsys, monkeypatch):
    # CUDA's states are only tried when they are restored (trying them earlier would start CUDA for a CPU run):
    # a checkpoint of a machine with more GPUs than this one.
    path = edited_checkpoint(dry_run, tmp_path / "run", lambda p: p["rng"].update(
        cuda=[torch.zeros(16, dtype=torch.uint8)] * 2))

    def two_states_one_gpu(states):
        raise RuntimeError("CUDA error: invalid device ordinal\nCUDA kernel errors might be reported later")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", two_states_one_gpu)
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    assert main(["train", "--resume", "--dry-run", "--quiet", "--no-tensorboard", "--out", str(path.parent)]) == 2
    one_line_naming(capsys, path, "its RNG states cannot be restored: CUDA error: invalid device ordinal")
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == before


def test_a_pickled_module_is_not_a_normkit_checkpoint(tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # the whole module pickled, not its state_dict
    with pytest.raises(CheckpointError, match="not a normkit lab checkpoint"):
        load_checkpoint(path)
    assert main(["evaluate", "--checkpoint", str(path)]) == 2
    error = one_line_naming(capsys, path, "not a normkit lab checkpoint",
                            "unsupported global torch.nn.modules.linear.Linear", "weights_only=True")
    assert "(1)" not in error  # torch's numbered advice, cut off after its first line


class _RunsACommand:
    """Unpickles as a call of os.system: the payload a crafted checkpoint.pt would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_carrying_a_pickle_payload_is_refused_naming_it(tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "ran"
    run(TrainConfig(dry_run=True, quiet=True, tensorboard=False, train_limit=100, out=str(out)))
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.save({**payload, "model": {**payload["model"], "x": _RunsACommand(marker)}}, out / "checkpoint.pt")
    assert main(["evaluate", "--checkpoint", str(out)]) == 2
    # torch blocks the module outright ("whose module posix is blocked"): the line names the global it refused.
    one_line_naming(capsys, out / "checkpoint.pt", "not a normkit lab checkpoint",
                    f"unsupported global {os.system.__module__}.system")
    assert main(["train", "--out", str(out), "--resume", "--dry-run", "--train-limit", "100"]) == 2
    one_line_naming(capsys, "unsupported global", "--resume cannot continue")
    assert not marker.exists()


def test_a_zip_file_that_is_not_a_torch_checkpoint(tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")
    with pytest.raises(CheckpointError, match="a zip archive but not a torch checkpoint"):
        load_checkpoint(path)
    assert main(["evaluate", "--checkpoint", str(path)]) == 2
    error = one_line_naming(capsys, path, "not a torch checkpoint", "notes.txt")
    assert "enforce fail" not in error and "corrupt" not in error


@pytest.mark.parametrize("norm", NORM_NAMES)
@pytest.mark.parametrize("model", ["lenet", "mlp"])
def test_every_norm_and_model_trains(tmp_path, norm, model):
    if norm == "instance" and model == "mlp":
        with pytest.raises(ValueError, match="needs spatial axes and the mlp has none"):
            run(TrainConfig(model=model, norm=norm, dry_run=True, quiet=True, tensorboard=False, out=str(tmp_path)))
        return
    metrics = run(TrainConfig(model=model, norm=norm, dry_run=True, quiet=True, tensorboard=False,
                              train_limit=100, out=str(tmp_path)))
    assert len(metrics["history"]) == 1 and metrics["steps"] == 1


def test_a_train_limit_above_the_dataset_uses_it_all_and_says_so(tmp_path, capsys):
    """--train-limit is a ceiling: above the training set's size the run takes every image, as without it, and its
    first lines say how many there were (it was accepted without a word, so a typo'd limit went unnoticed)."""
    from normkit.lab.data import load_dataset
    from normkit.lab.runfolder import plan_run

    count = len(load_dataset("digits").train[1])
    plan = plan_run(TrainConfig(train_limit=count + 1, out=str(tmp_path / "a")))
    unlimited = plan_run(TrainConfig(out=str(tmp_path / "b")))
    assert plan.data.fingerprint == unlimited.data.fingerprint
    assert f"--train-limit {count + 1}: --dataset digits has {count} training images; using all of them" in plan.notes
    assert not any("--train-limit" in note for note in plan_run(TrainConfig(train_limit=count,
                                                                              out=str(tmp_path / "c"))).notes)
    assert main(["train", "--dry-run", "--no-tensorboard", "--train-limit", "99999", "--out", str(tmp_path / "d")]) == 0
    assert f"--train-limit 99999: --dataset digits has {count} training images" in capsys.readouterr().out


def test_on_step_sees_every_step_and_leaves_the_run_unchanged(tmp_path):
    """run(on_step=...) is called after each optimizer step with the model; a measurement that leaves the
    model as it found it (preactivations: eval mode, restored) gives the same weights as a run without it."""
    from normkit.lab.board import preactivations

    settings = dict(norm="batch", epochs=2, train_limit=160, batch_size=32, quiet=True, tensorboard=False)
    seen = []

    def measure(step, model):
        seen.append((step, model.training))
        preactivations(model, torch.zeros(4, 1, 28, 28))

    measured = run(TrainConfig(**settings, out=str(tmp_path / "measured")), on_step=measure)
    plain = run(TrainConfig(**settings, out=str(tmp_path / "plain")))
    assert [step for step, _ in seen] == list(range(1, measured["steps"] + 1)) and all(t for _, t in seen)
    assert measured["history"] == [{**record, "seconds": m["seconds"], "images_per_second": m["images_per_second"]}
                                   for record, m in zip(plain["history"], measured["history"])]
    first, second = (load_checkpoint(tmp_path / name / "checkpoint.pt")["model"] for name in ("measured", "plain"))
    for key, value in second.items():
        torch.testing.assert_close(first[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_other_optimizers_and_relu(tmp_path, optimizer):
    assert main(["train", "--dry-run", "--quiet", "--no-tensorboard", "--optimizer", optimizer, "--activation",
                 "relu", "--out", str(tmp_path)] + TINY) == 0
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == {"sgd": 1e-2, "adam": 1e-3}[optimizer]


def test_compare_command(tmp_path, capsys):
    assert main(["compare", "--norms", "batch,none", "--seeds", "0,1", "--dry-run", "--no-tensorboard",
                 "--out", str(tmp_path)] + TINY) == 0
    table = (tmp_path / "comparison.md").read_text()
    assert table.startswith("| norm | test accuracy | seed 0 | seed 1 |")
    assert "| batch |" in table and "| none |" in table
    assert (tmp_path / "comparison.png").stat().st_size > 0
    assert {p.name for p in tmp_path.iterdir() if p.is_dir()} == {"batch-seed0", "batch-seed1", "none-seed0",
                                                                 "none-seed1"}


def test_download_command_offline(tmp_path, monkeypatch, capsys):
    import socket

    from normkit.lab import data

    with socket.socket() as probe:  # a port nobody listens on: the connection is really refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setitem(data.DOWNLOADS, "mnist", dict(data.DOWNLOADS["mnist"], mirrors=(f"http://127.0.0.1:{port}/",)))
    assert main(["download", "mnist", "--data-dir", str(tmp_path)]) == 2
    assert "copy the canonical files" in capsys.readouterr().err


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "absent"), "--out", str(tmp_path)]) == 2
    assert "data directory" in capsys.readouterr().err
    assert main(["train", "--norm", "ghost", "--batch-size", "20", "--out", str(tmp_path)]) == 2
    assert "multiple of 16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--norm", "bogus"])


def test_mnist_dry_run_on_real_sample(mnist_split_dir, tmp_path):
    metrics = run(TrainConfig(dataset="mnist", data_dir=str(mnist_split_dir), dry_run=True, quiet=True,
                              out=str(tmp_path)))
    assert metrics["train_size"] == 6400 and metrics["val_size"] == 1600 and metrics["test_size"] == 2000


def test_keras_norm_has_keras_batchnormalization_defaults(tmp_path):
    from normkit import BatchNorm
    from normkit.registry import create_norm
    layer = create_norm("keras", 6, rank=4)
    assert isinstance(layer, BatchNorm)
    assert (layer.momentum, layer.eps, layer.unbiased_running_var) == (0.01, 1e-3, False)  # Keras: 1 - 0.99, 1e-3
    assert create_norm("keras", 6, rank=2, eps=1e-5).eps == 1e-5  # explicit settings win
    assert main(["train", "--norm", "keras", "--dry-run", "--quiet", "--no-tensorboard", "--out", str(tmp_path)]
                + TINY) == 0
    assert json.loads((tmp_path / "config.json").read_text())["norm"] == "keras"


def test_recalibrate_reports_both_accuracies_and_saves_the_recalibrated_model(tmp_path, capsys):
    out = tmp_path / "recal"
    assert main(["train", "--recalibrate", "-1", "--epochs", "1", "--quiet", "--no-tensorboard", "--out", str(out)]
                + TINY) == 0
    config = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert config["recalibrate"] == -1
    assert {"test_accuracy", "test_accuracy_before_recalibration", "test_loss_before_recalibration"} <= set(metrics)
    assert metrics["recalibration"] == {"batches": 5, "images": 160}  # 200 images, 160 after the split, batches of 32
    assert metrics["test_accuracy"] != metrics["test_accuracy_before_recalibration"]
    # The checkpoint is the recalibrated model: evaluating it gives the reported (recalibrated) test accuracy.
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == metrics["test_accuracy"]
    # Same weights as the run without recalibration (it changes no training step), other running statistics.
    plain = tmp_path / "plain"
    assert main(["train", "--epochs", "1", "--quiet", "--no-tensorboard", "--out", str(plain)] + TINY) == 0
    plain_metrics = json.loads((plain / "metrics.json").read_text())
    assert plain_metrics["test_accuracy"] == plain_metrics["test_accuracy_before_recalibration"] \
        == metrics["test_accuracy_before_recalibration"]
    assert plain_metrics["recalibration"] is None
    recalibrated, saved = load_checkpoint(out / "checkpoint.pt"), load_checkpoint(plain / "checkpoint.pt")
    for key, value in saved["model"].items():
        same = torch.equal(recalibrated["model"][key], value)
        assert same if "running" not in key else not same, key
    assert recalibrated["epoch"] == saved["epoch"] == 1 and recalibrated["step"] == saved["step"]


def test_resuming_a_finished_recalibrated_run_keeps_its_checkpoint_and_first_measurement(tmp_path):
    out = tmp_path / "run"
    arguments = ["train", "--epochs", "1", "--no-tensorboard", "--out", str(out)] + TINY
    assert main(arguments + ["--recalibrate", "-1"]) == 0
    checkpoint, metrics = (out / "checkpoint.pt").read_bytes(), json.loads((out / "metrics.json").read_text())
    assert load_checkpoint(out / "checkpoint.pt")["recalibration"]["recalibrate"] == -1
    # Resumed with the same recalibration: evaluated again, the checkpoint untouched, the same report.
    assert main(arguments + ["--recalibrate", "-1", "--resume"]) == 0
    assert (out / "checkpoint.pt").read_bytes() == checkpoint
    assert json.loads((out / "metrics.json").read_text()) == metrics
    # Another batch count: recalibrated again from the same weights; "before" is still training's statistics'.
    assert main(arguments + ["--recalibrate", "2", "--resume"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["recalibration"]["batches"] == 2 and load_checkpoint(out / "checkpoint.pt")["recalibration"][
        "recalibrate"] == 2
    for key in ("test_accuracy_before_recalibration", "test_loss_before_recalibration"):
        assert again[key] == metrics[key]
    # Trained further (without recalibrating at the end): the new epoch's checkpoint is not a recalibrated one.
    assert main(["train", "--epochs", "2", "--recalibrate", "0", "--no-tensorboard", "--out", str(out), "--resume"]
                + TINY) == 0
    assert "recalibration" not in load_checkpoint(out / "checkpoint.pt")
    assert json.loads((out / "metrics.json").read_text())["recalibration"] is None


def test_a_recalibrated_checkpoint_from_before_the_record_keeps_its_first_measurement(tmp_path):
    """Checkpoints written before they recorded their recalibration: the run's metrics.json says what it was."""
    out = tmp_path / "run"
    arguments = ["train", "--epochs", "1", "--recalibrate", "-1", "--no-tensorboard", "--out", str(out)] + TINY
    assert main(arguments) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    del payload["recalibration"]  # (as the previous normkit wrote it)
    torch.save(payload, out / "checkpoint.pt")
    older = (out / "checkpoint.pt").read_bytes()
    assert main(arguments + ["--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert (out / "checkpoint.pt").read_bytes() == older  # (same recalibration: not redone, not rewritten)


def test_recalibrate_dry_run_and_errors(tmp_path, capsys):
    out = tmp_path / "dry"
    assert main(["train", "--dry-run", "--recalibrate", "3", "--no-tensorboard", "--out", str(out)] + TINY) == 0
    assert "recalibrated BN running statistics over 1 training batch (32 images)" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["recalibration"]["batches"] == 1
    assert main(["train", "--dry-run", "--norm", "none", "--recalibrate", "2", "--out", str(tmp_path / "x")]) == 2
    assert "norm 'none' has none" in capsys.readouterr().err
    # Layers built without running statistics: refused before anything trains or is written.
    for norm in ("torch", "batch"):
        refused = tmp_path / f"no-stats-{norm}"
        assert main(["train", "--norm", norm, "--norm-option", "track_running_stats=false", "--recalibrate", "-1",
                     "--out", str(refused)] + TINY) == 2
        assert "track_running_stats=false keeps none" in capsys.readouterr().err and not refused.exists()
    # The same option given on --resume of such a run: refused, saying the options given now are part of it.
    stateless = tmp_path / "stateless"
    assert main(["train", "--dry-run", "--norm", "torch", "--norm-option", "track_running_stats=false",
                 "--no-tensorboard", "--out", str(stateless)] + TINY) == 0
    saved = (stateless / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--out", str(stateless), "--resume", "--recalibrate", "2"]) == 2
    error = capsys.readouterr().err
    assert "resumed with the options given now" in error and "--recalibrate=2" in error, error
    assert (stateless / "checkpoint.pt").read_bytes() == saved
    with pytest.raises(SystemExit):
        main(["train", "--recalibrate", "-2"])
    with pytest.raises(ValueError, match="recalibrate=-3"):
        TrainConfig(recalibrate=-3).resolved()


def test_a_checkpoint_whose_run_settings_a_later_check_refuses_still_evaluates(tmp_path, capsys):
    """An older normkit wrote epoch checkpoints of a run with --recalibrate and layers without running statistics
    (refused up front today): the model is fine, and evaluating it is not refused as an edited file."""
    out = tmp_path / "run"
    assert main(["train", "--dry-run", "--norm", "torch", "--norm-option", "track_running_stats=false",
                 "--no-tensorboard", "--out", str(out)] + TINY) == 0
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    payload["config"]["recalibrate"] = 5
    torch.save(payload, out / "checkpoint.pt")
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out)]) == 0, capsys.readouterr().err


def test_recalibration_batches_follow_training_batching():
    from normkit.lab.batches import recalibration_batches
    images = torch.arange(100.0).view(100, 1)
    cfg = TrainConfig(batch_size=32).resolved()
    assert [len(b) for b in recalibration_batches(images, cfg, -1)] == [32, 32, 32, 4]
    assert [len(b) for b in recalibration_batches(images, cfg, 2)] == [32, 32]
    assert torch.equal(recalibration_batches(images, cfg, 1)[0], images[:32])  # in the split's order
    ghost = TrainConfig(batch_size=32, norm="ghost").resolved()
    assert [len(b) for b in recalibration_batches(images, ghost, -1)] == [32, 32, 32]  # whole virtual batches
    assert [len(b) for b in recalibration_batches(images[:97], cfg, -1)] == [32, 32, 32]  # one image: no variance


@pytest.mark.slow
def test_compiled_training_follows_eager_training(tmp_path):
    """--compile trains the same model (up to float32 rounding): same losses, weights and accuracy."""
    settings = dict(train_limit=320, epochs=1, quiet=True, tensorboard=False)  # 256 training images: 4 full batches
    eager = run(TrainConfig(out=str(tmp_path / "eager"), **settings))
    assert main(["train", "--compile", "--quiet", "--no-tensorboard", "--train-limit", "320", "--epochs", "1",
                 "--out", str(tmp_path / "compiled")]) == 0
    compiled = json.loads((tmp_path / "compiled" / "metrics.json").read_text())
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["compile"] is True
    for key in ("loss", "val_loss"):
        assert compiled["history"][0][key] == pytest.approx(eager["history"][0][key], rel=1e-4)
    assert compiled["test_accuracy"] == pytest.approx(eager["test_accuracy"], abs=2 / 360)
    weights = [torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["model"] for name in ("eager", "compiled")]
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-3, atol=1e-5, msg=key)
