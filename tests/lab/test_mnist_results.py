"""The results page's MNIST claims, checked on the real sample (train = first 8,000, test = last 2,000), seed 0."""

import pytest

from normkit.lab.train import TrainConfig, run

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
