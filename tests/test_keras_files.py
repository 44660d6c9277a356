"""normkit.keras.load_batch_norms on a model saved by the real Keras 3: same weights, same outputs, safe errors.

tests/data/keras_bn_model.keras is Keras 3.15.1's own ``model.save`` of a small trained model
(tools/keras_model_file.py), and keras_bn_model.npz what each of its BatchNormalization layers
computed in Keras (inference and a training call on a recorded input, the weights before and
after). Keras is not needed here; h5py is (the dev extra installs it).
"""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from normkit.keras import BatchNormalization, load_batch_norms

h5py = pytest.importorskip("h5py", reason="load_batch_norms reads HDF5: pip install h5py (normkit[keras])")

DATA = Path(__file__).parent / "data"
MODEL = DATA / "keras_bn_model.keras"
PATHS = ["bn_conv", "bn_renorm", "block/bn_inner"]


@pytest.fixture(scope="module")
def recorded():
    with np.load(DATA / "keras_bn_model.npz") as arrays:
        return dict(arrays)


def keras_arrays(recorded, path, kind):
    return [recorded[f"{path}/{kind}_{i}"] for i in range(sum(k.startswith(f"{path}/{kind}_") for k in recorded))]


def test_every_batch_norm_with_keras_options_and_weights(recorded):
    layers = load_batch_norms(MODEL)
    assert list(layers) == PATHS
    assert all(isinstance(layer, BatchNormalization) and layer.built for layer in layers.values())
    conv, renorm, inner = (layers[p] for p in PATHS)
    assert (conv.axis, conv.momentum, conv.epsilon) == (-1, 0.99, 1e-3)
    assert renorm.renorm and not renorm.center and renorm.renorm_momentum == pytest.approx(0.9)
    assert renorm.renorm_clipping == {"rmax": 3.0, "rmin": pytest.approx(1 / 3), "dmax": 5.0}
    assert not inner.scale and inner.beta_regularizer is not None and inner.beta_constraint is not None
    for path, layer in layers.items():
        saved = keras_arrays(recorded, path, "weights")
        assert len(saved) == len(layer.get_weights()) and len(saved) in (3, 4, 6)
        for ours, theirs in zip(layer.get_weights(), saved):
            np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("path", PATHS)
def test_the_loaded_layers_compute_what_keras_computed(path, recorded):
    layer = load_batch_norms(MODEL)[path]
    x = torch.as_tensor(recorded[f"{path}/x"])
    # float32 in both; the moving statistics are not the initial ones (the model was trained)
    assert not np.allclose(layer.get_weights()[-1], 1.0)
    np.testing.assert_allclose(layer(x, training=False).detach().numpy(), recorded[f"{path}/y_infer"],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer(x, training=True).detach().numpy(), recorded[f"{path}/y_train"],
                               rtol=1e-5, atol=2e-6)
    for ours, theirs in zip(layer.get_weights(), keras_arrays(recorded, path, "after")):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)


def test_axis_moves_a_channels_last_layer_into_an_nchw_model(recorded):
    layer = load_batch_norms(MODEL, axis=1)["bn_conv"]
    assert layer.axis == 1 and layer.get_build_config()["input_shape"] == [None, 4, 4, 4]
    x = recorded["bn_conv/x"]  # NHWC, as Keras saw it
    nchw = torch.as_tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(layer(nchw, training=False).detach().numpy().transpose(0, 2, 3, 1),
                               recorded["bn_conv/y_infer"], rtol=1e-5, atol=1e-6)
    # a normkit.BatchNorm2d-style layer in an NCHW model: the same weights
    torch.testing.assert_close(layer.moving_mean, torch.as_tensor(recorded["bn_conv/weights_2"]))


def _rewritten(tmp_path, edit_config=None, drop=None, name="edited.keras"):
    """A copy of the recorded archive with config.json edited or a member left out."""
    target = tmp_path / name
    with zipfile.ZipFile(MODEL) as source, zipfile.ZipFile(target, "w") as out:
        for member in source.namelist():
            if member == drop:
                continue
            payload = source.read(member)
            if member == "config.json" and edit_config is not None:
                config = json.loads(payload)
                edit_config(config)
                payload = json.dumps(config).encode()
            out.writestr(member, payload)
    return target


def _batch_norm_configs(config):
    return [layer for layer in config["config"]["layers"] if layer["class_name"] == "BatchNormalization"]


def test_bad_files_are_clear_errors(tmp_path):
    weights_only = tmp_path / "model.weights.h5"
    with h5py.File(weights_only, "w") as handle:
        handle.create_dataset("layers/batch_normalization/vars/0", data=np.ones(3))
    with pytest.raises(ValueError, match="HDF5 weights file .* model.save\\('model.keras'\\)"):
        load_batch_norms(weights_only)
    text = tmp_path / "notes.keras"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="not a Keras 3 model archive"):
        load_batch_norms(text)
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(MODEL.read_bytes()[: MODEL.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a Keras 3 model archive|damaged"):
        load_batch_norms(truncated)
    with pytest.raises(ValueError, match="lacks model.weights.h5"):
        load_batch_norms(_rewritten(tmp_path, drop="model.weights.h5"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_batch_norms(tmp_path / "absent.keras")

    def rename(config):
        _batch_norm_configs(config)[0]["config"]["name"] = "renamed"
    with pytest.raises(ValueError, match="no weights for BatchNormalization layer 'renamed'"):
        load_batch_norms(_rewritten(tmp_path, rename))


def test_nothing_in_the_file_is_imported_or_run(tmp_path):
    """A config naming arbitrary code (module/class) is refused by name; only Keras' built-ins are rebuilt."""
    marker = tmp_path / "ran"

    def hostile(config):
        _batch_norm_configs(config)[0]["config"]["gamma_initializer"] = {
            "module": "os", "class_name": "system", "config": {"command": f"touch {marker}"},
            "registered_name": "os>system"}
    with pytest.raises(ValueError, match="bn_conv.*system"):
        load_batch_norms(_rewritten(tmp_path, hostile))
    assert not marker.exists()


def test_moving_an_axis_needs_a_single_one(tmp_path):
    def two_axes(config):
        _batch_norm_configs(config)[0]["config"]["axis"] = [1, 3]
    with pytest.raises(ValueError, match="only a single feature axis can be moved"):
        load_batch_norms(_rewritten(tmp_path, two_axes), axis=1)
