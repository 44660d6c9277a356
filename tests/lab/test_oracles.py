"""The lab's pieces against oracles of their own: torch.optim, torch.nn networks written out by hand, scikit-learn's
digits split, NumPy's reading of IDX files, TensorBoard's reader of the event files, and hand arithmetic.

Each test would fail on a plausible slip that the rest of the suite lets through (found by mutation testing):
the split taking the wrong end, evaluation measuring a part of the test set or in training mode, histograms of
the wrong tensors, a mislabelled comparison table."""

import gzip
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normkit.lab import data
from normkit.lab.batches import prepare_data, training_batch_sizes, training_batches
from normkit.lab.checkpoint import load_checkpoint, restore_rng_states, save_checkpoint
from normkit.lab.compare import comparison_table
from normkit.lab.config import TrainConfig
from normkit.lab.data import DataError, read_idx
from normkit.lab.models import build_model
from normkit.lab.optim import build_optimizer
from normkit.lab.train import evaluate_checkpoint, run

from lab_testing import write_mnist


def events_of(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0}).Reload()


def numpy_idx(path):
    """An IDX file as NumPy reads it: big-endian uint32 sizes after the 4-byte magic, then uint8 data."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    shape = tuple(int(size) for size in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


# ------------------------------------------------------------------------------ optimizers

def test_adam_and_sgd_are_torch_optims_with_the_configured_eps_and_momentum():
    """Adam takes --eps (Keras' 1e-7, not torch's 1e-8) and SGD --momentum: the same steps as torch.optim's."""
    rng = np.random.default_rng(1)
    start = rng.normal(size=6)
    gradients = [rng.normal(size=6) * 1e-7 for _ in range(3)]  # tiny: Adam's steps depend on eps
    for name, settings, reference in (
            ("adam", dict(eps=1e-7), lambda p: torch.optim.Adam(p, lr=1e-3, eps=1e-7)),
            ("sgd", dict(momentum=0.9), lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9))):
        ours, theirs = (torch.nn.Parameter(torch.tensor(start)) for _ in range(2))
        optimizers = build_optimizer(name, [ours], **settings), reference([theirs])
        for gradient in gradients:
            for parameter, optimizer in zip((ours, theirs), optimizers):
                parameter.grad = torch.tensor(gradient)
                optimizer.step()
            torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------ data

def test_read_idx_refuses_other_element_types(tmp_path):
    """Only uint8 IDX files (type byte 0x08): an int8 file (0x09) of the right size is refused, not read as uint8."""
    path = tmp_path / "signed"
    path.write_bytes(bytes([0, 0, 0x09, 1]) + (4).to_bytes(4, "big") + bytes([1, 2, 3, 255]))
    with pytest.raises(DataError, match="magic number 0x00000901 is not an IDX uint8 file"):
        read_idx(path)


def raw_idx(path, array):
    """``array`` as an uncompressed IDX file, written byte by byte (not with the lab's write_idx)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    path.write_bytes(bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes() + array.tobytes())


@pytest.mark.parametrize("images_shape, labels, problem", [
    ((3, 28, 28), [1, 10, 2], r"label 10 is outside 0\.\.9"),
    ((3, 28, 20), [1, 2, 3], "images are 28x20, the lab's models expect 28x28"),
    ((3, 20, 28), [1, 2, 3], "images are 20x28, the lab's models expect 28x28"),
])
def test_idx_files_the_models_cannot_take_are_refused(tmp_path, images_shape, labels, problem):
    """Labels beyond the ten classes and images other than 28x28 are refused by name, not trained on."""
    for part in ("train", "test"):
        raw_idx(tmp_path / data.IDX_FILES[part][0], np.zeros(images_shape, dtype=np.uint8))
        raw_idx(tmp_path / data.IDX_FILES[part][1], np.array(labels))
    with pytest.raises(DataError, match=problem):
        data.load_dataset("mnist", tmp_path)


def test_the_digits_split_is_scikit_learns_stratified_split_with_seed_0():
    """docs/lab.md: 1,437 train / 360 test, stratified, 20% test, random_state 0, in that order."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    train_index, test_index = train_test_split(np.arange(len(bunch.target)), test_size=0.2, random_state=0,
                                               stratify=bunch.target)
    splits = data.load_digits_28()
    for (images, labels), source, index in zip((splits.train, splits.test), splits.sources,
                                               (train_index, test_index)):
        np.testing.assert_array_equal(labels.numpy(), bunch.target[index])
        np.testing.assert_array_equal(source, bunch.images[index])
        # The float images are the same digits: each one's mean is its 8x8 source's mean / 16, up to the resize.
        np.testing.assert_allclose(images.mean(dim=(1, 2, 3)).numpy(), bunch.images[index].mean(axis=(1, 2)) / 16,
                                   atol=0.02)
    assert torch.equal(data.load_test_split("digits")[1], torch.from_numpy(bunch.target[test_index]))


def test_the_validation_split_is_the_last_fraction_after_the_train_limit():
    """Keras' validation_split: the first floor(n * (1 - split)) images train, the rest validate; --train-limit
    keeps the first N images before that; the test split is untouched."""
    count = 60
    images = torch.arange(count, dtype=torch.float32).view(count, 1, 1, 1).expand(count, 1, 28, 28).contiguous()
    labels = torch.arange(count) % 10
    test = (images[:5] + 100, labels[:5])
    splits = data.Splits(train=(images, labels), test=test)
    prepared = prepare_data(TrainConfig(train_limit=37, val_split=0.3).resolved(), splits)
    cut = math.floor(37 * 0.7)  # 25
    assert prepared.train[0][:, 0, 0, 0].tolist() == list(range(cut))
    assert prepared.val[0][:, 0, 0, 0].tolist() == list(range(cut, 37))
    assert prepared.train[1].tolist() == [i % 10 for i in range(cut)]
    assert prepared.val[1].tolist() == [i % 10 for i in range(cut, 37)]
    assert torch.equal(prepared.test[0], test[0]) and torch.equal(prepared.test[1], test[1])


# ------------------------------------------------------------------------------ batches and epoch metrics

def test_drop_last_drops_the_partial_batch_of_every_epoch(tmp_path):
    """--drop-last: 160 training images in batches of 48 make 3 steps an epoch (144 images), not 4."""
    cfg = TrainConfig(batch_size=48, drop_last=True).resolved()
    batches = training_batches(160, cfg, torch.Generator().manual_seed(0))
    assert [len(batch) for batch in batches] == [48, 48, 48]
    assert len(torch.cat(batches).unique()) == 144
    metrics = run(TrainConfig(train_limit=200, batch_size=48, drop_last=True, epochs=2, quiet=True,
                              out=str(tmp_path)))
    assert metrics["steps"] == 6 and [r["step"] for r in metrics["history"]] == [3, 6]
    events = events_of(tmp_path)
    step_accuracy = [event.value for event in events.Scalars("step/accuracy")]
    assert len(step_accuracy) == 6
    for epoch, record in enumerate(metrics["history"]):
        correct = [round(accuracy * 48) for accuracy in step_accuracy[3 * epoch:3 * epoch + 3]]
        assert record["accuracy"] == pytest.approx(sum(correct) / 144, abs=1e-6)  # over the 144 images seen


def test_batch_size_one_trains_on_every_image(tmp_path):
    """--batch-size 1 (norms without batch statistics): 10 training images are 10 whole batches of one, so an epoch
    is 10 steps over all 10 images; only a one-image *partial* batch is dropped."""
    cfg = TrainConfig(norm="none", batch_size=1).resolved()
    batches = training_batches(10, cfg, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    metrics = run(TrainConfig(norm="group", batch_size=1, train_limit=10, val_split=0.0, epochs=2, quiet=True,
                              tensorboard=False, out=str(tmp_path)))
    assert metrics["steps"] == 20 and [r["step"] for r in metrics["history"]] == [10, 20]


def _most_class_pure_batches(chunks, k):
    """The largest R such that R batches of K distinct classes fit in per-class chunk counts ``chunks``: a class
    can serve at most min(its chunks, R) of them, so R fits exactly when sum(min(q, R)) >= K R."""
    return max(r for r in range(sum(chunks) // k + 1) if sum(min(q, r) for q in chunks) >= k * r)


@pytest.mark.parametrize("k,batch_size", [(1, 8), (2, 8), (3, 12), (10, 20)])
def test_class_pure_batches_hold_k_classes_in_equal_parts(k, batch_size):
    """--batch-classes K: every batch has batch_size / K images of each of K classes, no image twice in an epoch,
    as many batches as the class counts allow (an independent count), the same ones from the same generator state,
    other ones in the next epoch; the step count known before shuffling agrees."""
    labels = torch.tensor([c for c, n in enumerate([23, 5, 17, 40, 9, 12, 3, 30, 8, 16]) for _ in range(n)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    cfg = TrainConfig(norm="none" if k == 10 else "batch", batch_size=batch_size, batch_classes=k).resolved()
    generator = torch.Generator().manual_seed(0)
    first = training_batches(len(labels), cfg, generator, labels)
    per_class = batch_size // k
    expected_count = _most_class_pure_batches([int(n) // per_class for n in torch.bincount(labels)], k)
    assert len(first) == expected_count == len(training_batch_sizes(len(labels), cfg, labels))
    for batch in first:
        classes, counts = labels[batch].unique(return_counts=True)
        assert len(classes) == k and counts.tolist() == [per_class] * k
    everything = torch.cat(first)
    assert len(everything.unique()) == len(everything)
    again = training_batches(len(labels), cfg, torch.Generator().manual_seed(0), labels)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    second = training_batches(len(labels), cfg, generator, labels)
    assert not all(torch.equal(a, b) for a, b in zip(first, second))


def test_class_pure_batches_resume_as_an_uninterrupted_run(tmp_path):
    """A run with --batch-classes stopped after an epoch and resumed ends with the uninterrupted run's weights
    (the batches come from the checkpointed generator)."""
    settings = dict(train_limit=300, batch_size=32, batch_classes=2, epochs=2, quiet=True, tensorboard=False)
    whole = run(TrainConfig(out=str(tmp_path / "a"), **settings))
    run(TrainConfig(out=str(tmp_path / "b"), **{**settings, "epochs": 1}))
    resumed = run(TrainConfig(out=str(tmp_path / "b"), resume=True, **settings), given={"epochs"})
    expected, actual = (load_checkpoint(tmp_path / p / "checkpoint.pt")["model"] for p in ("a", "b"))
    assert all(torch.equal(actual[name], tensor) for name, tensor in expected.items())
    assert whole["history"] == [{**r, "seconds": w["seconds"], "images_per_second": w["images_per_second"]}
                                for r, w in zip(resumed["history"], whole["history"], strict=True)]


def test_batch_classes_are_refused_where_they_cannot_hold():
    with pytest.raises(ValueError, match=r"--batch-size=64 is not a multiple of 3"):
        TrainConfig(batch_classes=3).resolved()
    with pytest.raises(ValueError, match=r"--batch-classes=11 must be a number of classes from 1 to 10"):
        TrainConfig(batch_classes=11).resolved()


def test_epoch_scalars_are_the_step_values_weighted_by_batch_size(tmp_path):
    """160 training images in batches of 48: 48, 48, 48 and 16. The epoch's loss and accuracy are the image-weighted
    means of the steps' (as Keras reports them), and TensorBoard's epoch scalars are metrics.json's history."""
    metrics = run(TrainConfig(train_limit=200, batch_size=48, epochs=1, quiet=True, out=str(tmp_path)))
    events = events_of(tmp_path)
    sizes = np.array([48, 48, 48, 16])
    losses = np.array([event.value for event in events.Scalars("step/loss")])
    accuracies = np.array([event.value for event in events.Scalars("step/accuracy")])
    assert [event.step for event in events.Scalars("step/accuracy")] == [1, 2, 3, 4]
    correct = accuracies * sizes
    np.testing.assert_allclose(correct, np.round(correct), atol=1e-4)  # a fraction of each batch's images
    (record,) = metrics["history"]
    assert record["loss"] == pytest.approx(float((losses * sizes).sum() / 160), rel=1e-5)
    assert record["accuracy"] == pytest.approx(float(np.round(correct).sum() / 160), abs=1e-6)
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        (scalar,) = events.Scalars(f"epoch/{key}")
        assert scalar.step == 4 and scalar.value == pytest.approx(record[key], rel=1e-6), key
    # The batches were drawn by a generator of their own, seeded with --seed: one permutation of the 160 images.
    shuffle = torch.Generator().manual_seed(0)
    torch.randperm(160, generator=shuffle)
    assert torch.equal(load_checkpoint(tmp_path / "checkpoint.pt")["rng"]["shuffle"], shuffle.get_state())


def test_validation_and_test_metrics_cover_every_image_in_eval_mode(tmp_path):
    """1,200 training images with --val-split 0.875: 150 train, the last 1,050 validate; 1,100 test images. Both
    are more than one evaluation batch (1,000). The reported numbers are those of the checkpoint's model in eval
    mode on all of those images, computed here in one pass from NumPy's reading of the files."""
    folder = write_mnist(tmp_path / "mnist", seed=3, train=1200, test=1100)
    out = tmp_path / "run"
    metrics = run(TrainConfig(dataset="mnist", data_dir=str(folder), val_split=0.875, batch_size=50, epochs=1,
                              quiet=True, tensorboard=False, out=str(out)))
    assert (metrics["train_size"], metrics["val_size"], metrics["test_size"]) == (150, 1050, 1100)
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    model = build_model("lenet", "batch")
    model.load_state_dict(payload["model"])
    model.eval()

    def measured(images_file, labels_file, rows):
        images = torch.from_numpy(numpy_idx(folder / images_file)[rows].astype(np.float32) / 255.0).unsqueeze(1)
        labels = torch.from_numpy(numpy_idx(folder / labels_file)[rows].astype(np.int64))
        with torch.no_grad():
            logits = model(images)
        return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).double().mean().item()

    val_loss, val_accuracy = measured("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", slice(150, None))
    test_loss, test_accuracy = measured("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", slice(None))
    (record,) = metrics["history"]
    assert record["val_loss"] == pytest.approx(val_loss, rel=1e-5)
    assert record["val_accuracy"] == pytest.approx(val_accuracy, abs=1e-12)
    assert metrics["test_loss"] == pytest.approx(test_loss, rel=1e-5)
    assert metrics["test_accuracy"] == pytest.approx(test_accuracy, abs=1e-12)
    evaluated = evaluate_checkpoint(out)
    assert evaluated["test_size"] == 1100 and evaluated["test_accuracy"] == pytest.approx(test_accuracy, abs=1e-12)
    assert evaluated["test_loss"] == pytest.approx(test_loss, rel=1e-5)


def test_evaluate_takes_another_datasets_test_split(tmp_path, capsys):
    """`normkit evaluate --dataset digits` measures a model trained on MNIST files on the 360 digits."""
    from normkit.cli import main

    folder = write_mnist(tmp_path / "mnist", seed=4)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "mnist", "--data-dir", str(folder), "--dry-run", "--quiet",
                 "--no-tensorboard", "--train-limit", "100", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out), "--dataset", "digits", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dataset"] == "digits" and result["test_size"] == 360


# ------------------------------------------------------------------------------ TensorBoard histograms

def test_histograms_are_the_norm_tensors_and_the_activations_inputs(tmp_path):
    """A dry run on the digits: each norm/<layer>.<tensor> histogram holds that tensor of the checkpoint, and each
    preactivation/<layer> histogram the input of that activation on the first 256 validation images (the last 20%
    of the 1,437 training digits), in eval mode."""
    out = tmp_path / "run"
    run(TrainConfig(dry_run=True, quiet=True, out=str(out)))
    events = events_of(out)
    state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]

    def check(tag, values):
        (event,) = events.Histograms(tag)
        histogram = event.histogram_value
        values = values.double().flatten()
        assert event.step == 1 and histogram.num == values.numel(), tag
        assert histogram.min == pytest.approx(values.min().item(), rel=1e-6, abs=1e-9), tag
        assert histogram.max == pytest.approx(values.max().item(), rel=1e-6, abs=1e-9), tag
        assert histogram.sum == pytest.approx(values.sum().item(), rel=1e-4, abs=1e-4), tag

    for layer in (1, 5, 10, 13):
        for name in ("weight", "bias", "running_mean", "running_var"):
            check(f"norm/{layer}.{name}", state[f"{layer}.{name}"])
    model = build_model("lenet", "batch")
    model.load_state_dict(state)
    model.eval()
    train_images = data.load_digits_28().train[0]
    probe = train_images[int(len(train_images) * 0.8):][:256]
    assert len(probe) == 256
    with torch.no_grad():
        for activation in (2, 6, 11, 14):
            check(f"preactivation/{activation}", nn.Sequential(*list(model)[:activation])(probe))


# ------------------------------------------------------------------------------ the networks

def lenet_reference(features=(6, 16, 120, 84)):
    """docs/lab.md's LeNet written with torch.nn: conv(6, 5x5) -> BN -> sigmoid -> maxpool 2 -> conv(16, 5x5) -> BN
    -> sigmoid -> maxpool 2 -> flatten -> dense(120) -> BN -> sigmoid -> dense(84) -> BN -> sigmoid -> dense(10)."""
    return nn.Sequential(nn.Conv2d(1, 6, 5), nn.BatchNorm2d(6), nn.Sigmoid(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 16, 5), nn.BatchNorm2d(16), nn.Sigmoid(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(256, 120), nn.BatchNorm1d(120), nn.Sigmoid(),
                         nn.Linear(120, 84), nn.BatchNorm1d(84), nn.Sigmoid(), nn.Linear(84, 10))


def mlp_reference():
    """The BN paper's MNIST network: 784 -> 3 x (dense(100) -> BN -> sigmoid) -> dense(10)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.BatchNorm1d(100), nn.Sigmoid(),
                         nn.Linear(100, 100), nn.BatchNorm1d(100), nn.Sigmoid(),
                         nn.Linear(100, 100), nn.BatchNorm1d(100), nn.Sigmoid(), nn.Linear(100, 10))


@pytest.mark.parametrize("name, reference", [("lenet", lenet_reference), ("mlp", mlp_reference)])
def test_the_networks_are_the_documented_ones(name, reference):
    """--norm torch (torch.nn's BatchNorm) gives exactly the hand-written network: same tensors, same outputs."""
    torch.manual_seed(0)
    ours, theirs = build_model(name, "torch"), reference()
    theirs.load_state_dict(ours.state_dict())  # strict: the same layers in the same places
    images = torch.rand(8, 1, 28, 28)
    for mode in (True, False):
        ours.train(mode), theirs.train(mode)
        torch.testing.assert_close(ours(images), theirs(images), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["lenet", "mlp"])
def test_keras_init_is_glorot_uniform_with_zero_biases_and_torch_init_is_not(name):
    torch.manual_seed(0)
    model = build_model(name, "batch")
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for layer in layers:
        receptive = layer.weight[0, 0].numel() if layer.weight.dim() > 2 else 1
        fan_in, fan_out = layer.weight.shape[1] * receptive, layer.weight.shape[0] * receptive
        limit = math.sqrt(6.0 / (fan_in + fan_out))  # Keras' GlorotUniform
        weights = layer.weight.detach()
        assert weights.abs().max() <= limit and weights.abs().max() > 0.8 * limit
        assert weights.std().item() == pytest.approx(limit / math.sqrt(3.0), rel=0.25)  # uniform's spread
        assert torch.count_nonzero(layer.bias) == 0
    torch.manual_seed(0)
    default = build_model(name, "batch", init="torch")
    assert all(torch.count_nonzero(m.bias) > 0 for m in default.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


# ------------------------------------------------------------------------------ checkpoint RNG states

def test_a_checkpoint_restores_numpy_python_torch_and_shuffle_generators(tmp_path):
    model = nn.Linear(2, 2)
    optimizer = build_optimizer("rmsprop", model.parameters())
    cfg = TrainConfig(out=str(tmp_path)).resolved()
    np.random.seed(11)
    random.seed(12)
    torch.manual_seed(13)
    shuffle = torch.Generator().manual_seed(14)
    save_checkpoint(tmp_path / "checkpoint.pt", model, optimizer, 1, 1, cfg, [], shuffle)
    np.random.seed(0), random.seed(0), torch.manual_seed(0), shuffle.manual_seed(0)
    other = torch.Generator()
    restore_rng_states(load_checkpoint(tmp_path / "checkpoint.pt")["rng"], other)
    assert np.random.random() == np.random.RandomState(11).random_sample()
    assert random.random() == random.Random(12).random()
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(13)))
    assert torch.equal(torch.randperm(10, generator=other), torch.randperm(10, generator=torch.Generator().manual_seed(14)))


# ------------------------------------------------------------------------------ compare's table

def test_the_comparison_table_against_hand_computed_statistics():
    def result(accuracy, loss, val_accuracies):
        return {"test_accuracy": accuracy, "test_loss": loss,
                "history": [{"epoch": e + 1, "loss": 1.0, "accuracy": 0.5, "val_loss": 1.0, "val_accuracy": v}
                            for e, v in enumerate(val_accuracies)]}

    results = {"batch": {0: result(0.90, 0.30, [0.50, 0.70]), 1: result(0.80, 0.50, [0.60, 0.90])},
               "none": {0: result(0.40, 1.50, [0.20, 0.30]), 1: result(0.10, 2.10, [0.10, 0.20])}}
    lines = comparison_table(results).splitlines()
    assert lines[0] == "| norm | test accuracy | seed 0 | seed 1 | test loss | val acc e1 | val acc e2 |"
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.strip("|").split("|")][1:] for line in lines[2:]}
    for norm, by_seed in results.items():
        accuracies = [by_seed[s]["test_accuracy"] for s in (0, 1)]
        losses = [by_seed[s]["test_loss"] for s in (0, 1)]
        expected = [f"{np.mean(accuracies):.4f} ± {np.std(accuracies, ddof=1):.4f}",  # the sample deviation
                    f"{accuracies[0]:.4f}", f"{accuracies[1]:.4f}",
                    f"{np.mean(losses):.4f} ± {np.std(losses, ddof=1):.4f}"]
        expected += [f"{np.mean([by_seed[s]['history'][e]['val_accuracy'] for s in (0, 1)]):.4f}" for e in (0, 1)]
        assert rows[norm] == expected, norm


# ------------------------------------------------------------------------------ the run folder's JSON

def test_metrics_json_holds_the_finished_epochs_of_an_interrupted_run(tmp_path):
    """docs/lab.md: metrics.json is rewritten after every epoch, so a run stopped in epoch 2 still has epoch 1's."""
    from normkit.lab.train import RunInterrupted

    def stop(step, model):
        if step == 7:  # 160 images in batches of 32: 5 steps an epoch
            raise KeyboardInterrupt
    out = tmp_path / "run"
    with pytest.raises(RunInterrupted):
        run(TrainConfig(train_limit=200, batch_size=32, epochs=2, quiet=True, tensorboard=False, out=str(out)),
            on_step=stop)
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [(record["epoch"], record["step"]) for record in history] == [(1, 5)]
    assert history == load_checkpoint(out / "checkpoint.pt")["history"]


def test_json_safe_turns_every_non_finite_number_into_null():
    from normkit.lab.runfolder import json_bytes

    payload = {"values": [float("nan"), float("inf"), -float("inf"), 1.5], "nested": {"loss": float("inf")}}
    assert json.loads(json_bytes(payload)) == {"values": [None, None, None, 1.5], "nested": {"loss": None}}


def test_a_fresh_run_with_another_seed_does_not_replace_a_finished_run(tmp_path, capsys):
    """--seed is part of a run's identity: another seed computes another run, which must not replace the
    finished one without --overwrite (docs/lab.md, "Output directory")."""
    from normkit.cli import main

    out = tmp_path / "run"
    command = ["train", "--epochs", "1", "--train-limit", "100", "--batch-size", "32", "--quiet", "--no-tensorboard",
               "--out", str(out)]
    assert main(command) == 0
    saved = (out / "checkpoint.pt").read_bytes()
    assert main(command + ["--seed", "1"]) == 2
    assert "--seed 0 there, 1 here" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == saved
