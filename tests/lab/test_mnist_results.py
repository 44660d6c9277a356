"""The results page's MNIST claims, checked on the real sample (train = first 8,000, test = last 2,000), seed 0."""

import pytest

from normkit import recalibrate_running_stats
from normkit.lab.batches import prepare_data, recalibration_batches
from normkit.lab.checkpoint import load_checkpoint, model_from_checkpoint
from normkit.lab.config import TrainConfig
from normkit.lab.data import load_dataset
from normkit.lab.train import evaluate, run

pytestmark = pytest.mark.slow


def train(data_dir, tmp_path, **settings):
    return run(TrainConfig(dataset="mnist", data_dir=str(data_dir), quiet=True, tensorboard=False,
                           out=str(tmp_path / "-".join(map(str, settings.values()))), **settings))["test_accuracy"]


def test_bn_beats_no_norm_and_matches_torch_bn(mnist_split_dir, tmp_path):
    normkit_bn = train(mnist_split_dir, tmp_path, norm="batch")
    torch_bn = train(mnist_split_dir, tmp_path, norm="torch")
    without = train(mnist_split_dir, tmp_path, norm="none")
    assert normkit_bn > 0.95
    assert abs(normkit_bn - torch_bn) <= 0.01
    assert without < normkit_bn - 0.1  # sigmoid without BN is still far behind after 5 epochs


def test_lenet_relu_bn_reaches_097(mnist_split_dir, tmp_path):
    assert train(mnist_split_dir, tmp_path, norm="batch", activation="relu") >= 0.97


def test_sigmoid_shortfall_is_the_running_statistics(mnist_split_dir, tmp_path):
    """results.md, "Why the sigmoid recipe falls short": seed 4's eval-mode test accuracy (0.922) is far below
    0.97, the same weights with running statistics recalibrated on the training images are within a few test
    images of it (0.9685), and Keras' BN defaults (momentum 0.99) lag more than PyTorch's (seed 0)."""
    cfg = TrainConfig(dataset="mnist", data_dir=str(mnist_split_dir), seed=4, quiet=True, tensorboard=False,
                      out=str(tmp_path / "seed4"))
    running = run(cfg)["test_accuracy"]
    model, saved = model_from_checkpoint(load_checkpoint(tmp_path / "seed4" / "checkpoint.pt"))
    data = prepare_data(saved, load_dataset("mnist", str(mnist_split_dir)))
    recalibrated = evaluate(recalibrate_running_stats(model, recalibration_batches(data.train[0], saved.resolved(), -1)),
                            *data.test)[1]
    assert running < 0.95
    assert recalibrated >= 0.965 and recalibrated - running >= 0.03
    assert train(mnist_split_dir, tmp_path, norm="keras") < train(mnist_split_dir, tmp_path, norm="batch") - 0.01
