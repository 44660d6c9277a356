"""normkit.keras.load_batch_norms on a model saved by the real Keras 3: same weights, same outputs, safe errors.

tests/data/keras_bn_model.keras is Keras 3.15.1's own ``model.save`` of a small trained model
(tools/keras_recordings/keras_model_file.py), and keras_bn_model.npz what each of its BatchNormalization layers
computed in Keras (inference and a training call on a recorded input, the weights before and
after). Keras is not needed here; h5py is (the dev extra installs it).
"""

import json
import warnings
import zipfile

import numpy as np
import pytest
import torch

from normkit.keras import BatchNormalization, load_batch_norms

from keras_records import DATA, assert_bfloat16_layer_as_recorded, keras_arrays, read_record

h5py = pytest.importorskip("h5py", reason="load_batch_norms reads HDF5: pip install h5py (normkit[keras])")

MODEL = DATA / "keras_bn_model.keras"
PATHS = ["bn_conv", "bn_renorm", "block/bn_inner"]


@pytest.fixture(scope="module")
def recorded():
    return read_record("keras_bn_model.npz")


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


def test_layers_two_models_deep_are_named_by_their_whole_path():
    """tests/data/keras_bn_nested.keras (tools/keras_recordings/keras_nested_model_file.py): a Sequential inside a Sequential inside
    the model, and a TimeDistributed(BN). Each BN is found under its whole path, outer/inner/bn_deep (the innermost
    level must not drop its outer model's name) and steps/bn_steps (the wrapper's name, then the layer's), with
    Keras' weights, computing what Keras computed."""
    with np.load(DATA / "keras_bn_nested.npz") as arrays:
        nested = dict(arrays)
    layers = load_batch_norms(DATA / "keras_bn_nested.keras")
    assert list(layers) == ["outer/inner/bn_deep", "outer/bn_mid", "bn_top", "steps/bn_steps"]
    assert [layers[p].momentum for p in layers] == [0.5, 0.6, 0.7, 0.8] and not layers["outer/bn_mid"].center
    for path, layer in layers.items():
        for ours, theirs in zip(layer.get_weights(), keras_arrays(nested, path, "weights"), strict=True):
            np.testing.assert_array_equal(ours, theirs)
        if path != "steps/bn_steps":
            np.testing.assert_allclose(layer(torch.as_tensor(nested[f"{path}/x"]), training=False).detach().numpy(),
                                       nested[f"{path}/y_infer"], rtol=1e-5, atol=1e-6)
    # The wrapped layer is built on one time step, as Keras built it; called once per step, as Keras 3's wrapper
    # calls it, it computes what the wrapper computed on the (N, T, 2) sequences, in training too (statistics
    # of each step, the moving averages moved once per step).
    steps = layers["steps/bn_steps"]
    assert steps.get_build_config()["input_shape"] == [None, 2] and steps.axis == 1
    x = torch.as_tensor(nested["steps/bn_steps/x"])
    for training in (False, True):
        y = torch.stack([steps(x[:, t], training=training) for t in range(x.shape[1])], dim=1)
        np.testing.assert_allclose(y.detach().numpy(), nested[f"steps/bn_steps/y_{'train' if training else 'infer'}"],
                                   rtol=1e-5, atol=2e-6)
    for ours, theirs in zip(steps.get_weights(), keras_arrays(nested, "steps/bn_steps", "after"), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)


def test_one_layer_in_two_places_is_loaded_once_under_both_paths():
    """tests/data/keras_bn_shared.keras (tools/keras_recordings/keras_nested_model_file.py): a BN layer of a nested Sequential also
    called in the outer model, and one wrapped in TimeDistributed also called directly. Keras writes each layer's
    weights once, at its first place, and the config at both: the second place raised "has no weights for
    BatchNormalization layer" on this valid file. Both paths give one loaded layer, with Keras' weights, computing
    what Keras computed (a training call moves the statistics seen from either path, as in Keras)."""
    with np.load(DATA / "keras_bn_shared.npz") as arrays:
        shared = dict(arrays)
    layers = load_batch_norms(DATA / "keras_bn_shared.keras")
    assert sorted(layers) == ["bn_both", "bn_shared", "inner/bn_shared", "steps/bn_both"]
    assert layers["bn_shared"] is layers["inner/bn_shared"] and layers["bn_both"] is layers["steps/bn_both"]
    for path, layer in layers.items():
        for ours, theirs in zip(layer.get_weights(), keras_arrays(shared, path, "weights"), strict=True):
            np.testing.assert_array_equal(ours, theirs)
    for path in ("inner/bn_shared", "bn_both"):
        layer, x = layers[path], torch.as_tensor(shared[f"{path}/x"])
        assert not np.allclose(layer.get_weights()[-1], 1.0)  # (trained: not the initial statistics)
        np.testing.assert_allclose(layer(x, training=False).detach().numpy(), shared[f"{path}/y_infer"],
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer(x, training=True).detach().numpy(), shared[f"{path}/y_train"],
                                   rtol=1e-5, atol=2e-6)
        for ours, theirs in zip(layer.get_weights(), keras_arrays(shared, path, "after"), strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)


def test_a_file_of_keras_before_3_6_names_no_layer_and_is_read_by_path():
    """tests/data/keras_bn_unnamed.keras (tools/keras_recordings/keras_unnamed_weights_file.py, Keras 3.5.0): Keras 3.0-3.5 write no
    layer name on the weights groups; Keras itself finds a layer's weights by path (layers/batch_normalization_1,
    layers/sequential/layers/batch_normalization, layers/time_distributed/layer), counted by class in the model's
    order. Every layer raised "has no weights for BatchNormalization layer" on this valid file. The names here sort
    otherwise than the paths (zz_first is batch_normalization, aa_second _1), so a wrong count swaps weights."""
    with np.load(DATA / "keras_bn_unnamed.npz") as arrays:
        unnamed = dict(arrays)
    layers = load_batch_norms(DATA / "keras_bn_unnamed.keras")
    assert list(layers) == ["zz_first", "aa_second", "block/bn_inner", "mm_third", "steps/bn_steps"]
    assert [layers[p].momentum for p in layers] == [0.5, 0.7, 0.6, 0.8, 0.9]
    assert not layers["aa_second"].center and not layers["aa_second"].scale and not layers["block/bn_inner"].scale
    for path, layer in layers.items():
        for ours, theirs in zip(layer.get_weights(), keras_arrays(unnamed, path, "weights"), strict=True):
            np.testing.assert_array_equal(ours, theirs)
        x = torch.as_tensor(unnamed[f"{path}/x"])
        if path == "steps/bn_steps":  # (Keras 3's wrapper calls the layer once per time step)
            y = torch.stack([layer(x[:, t], training=False) for t in range(x.shape[1])], dim=1)
        else:
            y = layer(x, training=False)
        np.testing.assert_allclose(y.detach().numpy(), unnamed[f"{path}/y_infer"], rtol=1e-5, atol=1e-6)


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


def test_moving_the_axis_permutes_the_build_shape(tmp_path):
    """bn_conv built on NHWC inputs of 5x6 images with its 4 channels last: with axis=1 it is built on
    (N, 4, 5, 6) and normalizes NCHW data as torch.nn's BatchNorm2d with its moving statistics does."""
    def wider(config):
        _batch_norm_configs(config)[0]["build_config"]["input_shape"] = [None, 5, 6, 4]
    layer = load_batch_norms(_rewritten(tmp_path, wider), axis=1)["bn_conv"]
    assert layer.get_build_config()["input_shape"] == [None, 4, 5, 6]
    gamma, beta, mean, variance = (torch.as_tensor(w) for w in layer.get_weights())
    oracle = torch.nn.BatchNorm2d(4, eps=1e-3).eval()
    with torch.no_grad():
        for tensor, value in zip((oracle.weight, oracle.bias, oracle.running_mean, oracle.running_var),
                                 (gamma, beta, mean, variance)):
            tensor.copy_(value)
    x = torch.randn(3, 4, 5, 6)
    torch.testing.assert_close(layer(x, training=False), oracle(x))


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
    legacy = tmp_path / "model.h5"  # (a legacy model.save("model.h5"): read, tests/test_keras_legacy_files.py)
    with h5py.File(legacy, "w") as handle:
        handle.attrs["model_config"] = json.dumps({"class_name": "Sequential", "config": {"layers": []}})
        handle.create_dataset("model_weights/bn/bn/gamma", data=np.ones(3))
    assert load_batch_norms(legacy) == {}
    text = tmp_path / "notes.keras"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="not a Keras model archive"):
        load_batch_norms(text)
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(MODEL.read_bytes()[: MODEL.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a Keras model archive|damaged"):
        load_batch_norms(truncated)
    with pytest.raises(ValueError, match="lacks model.weights.h5"):
        load_batch_norms(_rewritten(tmp_path, drop="model.weights.h5"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_batch_norms(tmp_path / "absent.keras")
    # Keras' model.save(folder, zipped=False) layout: refused naming the remedy, which works (the members zipped)
    folder = tmp_path / "unzipped"
    with zipfile.ZipFile(MODEL) as archive:
        archive.extractall(folder)
    with pytest.raises(ValueError, match=r"is a folder; it reads a \.keras archive.*zip the folder's members"):
        load_batch_norms(folder)
    rezipped = tmp_path / "rezipped.keras"
    with zipfile.ZipFile(rezipped, "w") as archive:
        for member in folder.iterdir():
            archive.write(member, member.name)
    original, again = load_batch_norms(MODEL), load_batch_norms(rezipped)
    assert list(original) == list(again)
    for name in original:
        for ours, theirs in zip(again[name].get_weights(), original[name].get_weights(), strict=True):
            np.testing.assert_array_equal(ours, theirs)

    def rename(config):
        _batch_norm_configs(config)[0]["config"]["name"] = "renamed"
    with pytest.raises(ValueError, match="no weights for BatchNormalization layer 'renamed'"):
        load_batch_norms(_rewritten(tmp_path, rename))


def test_a_subclassed_model_is_named_as_such(tmp_path):
    """Keras 3 saves a subclassed model's constructor arguments, not its layers (config.json as Keras 3.15.1
    writes it for ``class Sub(keras.Model)``): the error says so instead of "not a saved Keras model"."""
    def subclassed(config):
        config.clear()
        config.update({"module": None, "class_name": "Sub", "registered_name": "Custom>Sub",
                       "config": {"trainable": True, "dtype": {"module": "keras", "class_name": "DTypePolicy",
                                                               "config": {"name": "float32"}, "registered_name": None}},
                       "build_config": {"input_shape": [1, 3]}})
    with pytest.raises(ValueError, match="subclassed model \\('Sub'\\).*from_keras"):
        load_batch_norms(_rewritten(tmp_path, subclassed))


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


def test_a_bfloat16_layer_loads_exactly(recorded):
    """Keras writes bfloat16 variables as raw 2-byte HDF5 values; they are read as the same numbers."""
    assert_bfloat16_layer_as_recorded(load_batch_norms(DATA / "keras_bn_model_bfloat16.keras")["bn_bf16"], recorded,
                                      "bn_bf16")


def _with_weights(tmp_path, edit, name="edited.keras", compress=None, source=MODEL):
    """A copy of the recorded archive (``source``) whose model.weights.h5 went through ``edit(h5py.File)``."""
    weights = tmp_path / "model.weights.h5"
    with zipfile.ZipFile(source) as source:
        weights.write_bytes(source.read("model.weights.h5"))
        config = source.read("config.json")
    with h5py.File(weights, "r+") as handle:
        edit(handle)
    target = tmp_path / name
    with zipfile.ZipFile(target, "w", compression=compress or zipfile.ZIP_STORED) as out:
        out.writestr("config.json", config)
        out.write(weights, "model.weights.h5")
    return target


BN_CONV_VARS = "layers/batch_normalization/vars"  # (Keras' own HDF5 path of the layer named bn_conv)


@pytest.mark.parametrize("case, message", [
    ("huge variable", "too large for a BN variable"),
    ("soft link loop", "not an array of this file"),
    ("external link", "not an array of this file"),
    ("odd variable names", "not 0, 1"),
    ("complex values", "not floating-point"),
    # Each variable may hold 2**24 values (a BN's features), but a BN has at most seven: 64 of them declared at that
    # size (a few bytes of file each, never written) were all read, 4 GiB, before the count was compared.
    ("many large variables", "64 variables: a BatchNormalization has at most 7"),
])
def test_a_hostile_weights_file_is_refused_before_it_is_read(tmp_path, case, message):
    """Untrusted files: declared sizes are checked before reading, links are not followed, every oddity is a
    ValueError naming the file and the layer."""
    def edit(handle):
        variables = handle[BN_CONV_VARS]
        if case == "huge variable":  # 2**33 declared values in a few bytes of file (chunked, never written)
            del variables["0"]
            variables.create_dataset("0", shape=(1 << 33,), dtype="f4", chunks=(1 << 16,), compression="gzip")
        elif case == "soft link loop":
            del variables["0"]
            variables["0"] = h5py.SoftLink(f"/{BN_CONV_VARS}/0")
        elif case == "external link":
            del variables["0"]
            variables["0"] = h5py.ExternalLink(str(tmp_path / "elsewhere.h5"), "/data")
        elif case == "odd variable names":
            variables["abc"] = np.ones(4, dtype="f4")
        elif case == "many large variables":
            for index in range(len(variables), 64):
                variables.create_dataset(str(index), shape=(1 << 24,), dtype="f4", chunks=(1 << 16,),
                                         compression="gzip")
        else:
            values = variables["0"][()]
            del variables["0"]
            variables.create_dataset("0", data=values.astype(np.complex64))
    target = _with_weights(tmp_path, edit)
    with pytest.raises(ValueError, match=f"{target.name}: layer 'bn_conv': .*{message}"):
        load_batch_norms(target)


def test_an_archive_that_would_inflate_beyond_reason_is_refused(tmp_path):
    bomb = tmp_path / "bomb.keras"
    with zipfile.ZipFile(MODEL) as source, zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as out:
        out.writestr("config.json", source.read("config.json"))
        out.writestr("model.weights.h5", bytes(64 << 20))  # 64 MiB of zeros: about 64 KiB deflated
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(ValueError, match="would inflate from .* refused"):
        load_batch_norms(bomb)


@pytest.mark.parametrize("edit, message", [
    (lambda c: _batch_norm_configs(c)[0]["config"].update(center="no"), "center must be True or False"),
    (lambda c: _batch_norm_configs(c)[0]["config"].update(momentum=True), "momentum must be a number"),
    (lambda c: _batch_norm_configs(c)[0]["config"].update(dtype={"config": "x"}), "dtype"),
    (lambda c: _batch_norm_configs(c)[0].update(build_config={"input_shape": [None, 5, 5, 1 << 40]}),
     "is not a shape"),
    (lambda c: _batch_norm_configs(c)[0].update(build_config={"input_shape": "abc"}), "is not a shape"),
])
def test_a_malformed_config_is_a_value_error_naming_the_layer(tmp_path, edit, message):
    with pytest.raises(ValueError, match=f"layer 'bn_conv': .*{message}"):
        load_batch_norms(_rewritten(tmp_path, edit))


def test_a_config_nested_too_deep_is_refused(tmp_path):
    deep = tmp_path / "deep.keras"
    with zipfile.ZipFile(MODEL) as source, zipfile.ZipFile(deep, "w") as out:
        out.writestr("config.json", "[" * 100_000 + "]" * 100_000)
        out.writestr("model.weights.h5", source.read("model.weights.h5"))
    with pytest.raises(ValueError, match="config.json cannot be read"):
        load_batch_norms(deep)


NESTED = DATA / "keras_bn_nested.keras"  # (tools/keras_recordings/keras_nested_model_file.py: TimeDistributed(BN) named steps/bn_steps)


def _nested_rewritten(tmp_path, edit_config=None, edit_weights=None):
    """A copy of keras_bn_nested.keras with its config.json and/or model.weights.h5 edited."""
    weights = tmp_path / "nested.weights.h5"
    with zipfile.ZipFile(NESTED) as source:
        config = json.loads(source.read("config.json"))
        weights.write_bytes(source.read("model.weights.h5"))
    if edit_config is not None:
        edit_config(next(layer for layer in config["config"]["layers"] if layer["class_name"] == "TimeDistributed"))
    if edit_weights is not None:
        with h5py.File(weights, "r+") as handle:
            edit_weights(handle)
    target = tmp_path / "nested_edited.keras"
    with zipfile.ZipFile(target, "w") as out:
        out.writestr("config.json", json.dumps(config))
        out.write(weights, "model.weights.h5")
    return target


TIME_DISTRIBUTED_VARS = "layers/time_distributed/layer/vars"  # (Keras' HDF5 path of steps/bn_steps' variables)


@pytest.mark.parametrize("case", ["deleted", "a dataset", "a soft link"])
def test_a_time_distributed_layer_without_its_vars_group_has_no_weights(tmp_path, case):
    """The wrapper's group found, its layer/vars missing (or not a group of this file): the message of any BN without
    weights, naming the file and the layer (it was "'NoneType' object is not iterable")."""
    def edit(handle):
        del handle[TIME_DISTRIBUTED_VARS]
        if case == "a dataset":
            handle.create_dataset(TIME_DISTRIBUTED_VARS, data=np.ones(2, dtype="f4"))
        elif case == "a soft link":
            handle[TIME_DISTRIBUTED_VARS] = h5py.SoftLink("/layers/batch_normalization/vars")
    target = _nested_rewritten(tmp_path, edit_weights=edit)
    with pytest.raises(ValueError, match=f"{target.name} has no weights for BatchNormalization layer 'steps/bn_steps'"):
        load_batch_norms(target)


@pytest.mark.parametrize("wrapped", ["BatchNormalization", None, [1, 2], {"class_name": "BatchNormalization",
                                                                          "config": "bn_steps"},
                                     {"class_name": ["BatchNormalization"], "config": {"name": "bn_steps"}}])
def test_a_time_distributed_layer_whose_wrapped_layer_is_not_a_config_is_refused(tmp_path, wrapped):
    """Malformed, it is a ValueError naming the file and the wrapper (it was skipped silently: the file's
    TimeDistributed BN was missing from the result, with no word)."""
    target = _nested_rewritten(tmp_path, edit_config=lambda layer: layer["config"].update(layer=wrapped))
    with pytest.raises(ValueError, match=f"{target.name}: layer 'steps': TimeDistributed's wrapped layer .* is not a "
                                         "layer config"):
        load_batch_norms(target)


def test_a_time_distributed_layer_inside_a_nested_model_is_found_under_its_whole_path(tmp_path):
    """TimeDistributed(BN) moved into the innermost Sequential (config and weights): outer/inner/steps/bn_steps,
    with the weights of the unedited file's steps/bn_steps."""
    with zipfile.ZipFile(NESTED) as source:
        config = json.loads(source.read("config.json"))
        weights = tmp_path / "moved.weights.h5"
        weights.write_bytes(source.read("model.weights.h5"))
    layers = config["config"]["layers"]
    wrapper = next(layer for layer in layers if layer["class_name"] == "TimeDistributed")
    layers.remove(wrapper)
    outer = next(layer for layer in layers if layer["class_name"] == "Sequential")
    inner = next(layer for layer in outer["config"]["layers"] if layer["class_name"] == "Sequential")
    inner["config"]["layers"].append(wrapper)
    with h5py.File(weights, "r+") as handle:
        handle.move("layers/time_distributed", "layers/sequential/layers/sequential/layers/time_distributed")
    target = tmp_path / "moved.keras"
    with zipfile.ZipFile(target, "w") as out:
        out.writestr("config.json", json.dumps(config))
        out.write(weights, "model.weights.h5")
    moved = load_batch_norms(target)["outer/inner/steps/bn_steps"]
    for ours, theirs in zip(moved.get_weights(), load_batch_norms(NESTED)["steps/bn_steps"].get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("name", ["keras_bn_custom_layer.keras", "keras_bn_custom_layer.h5",
                                  "tfkeras_bn_custom_layer.h5"])
def test_a_batch_norm_inside_a_custom_layer_is_not_missing_silently(name):
    """A custom layer's config holds its constructor's arguments, not its sublayers' options, so a BN inside it
    cannot be rebuilt (tools/keras_recordings/keras_custom_layer_file.py, Keras 3.15.1 and tf.keras 2.15): it was left out of the result
    without a word. The other layers load, with a warning naming the custom layer and what to do. (tf.keras writes
    the config of a layer without get_config as {}, its name beside it: the layer is found by that name.)"""
    with pytest.warns(UserWarning, match=r"'block'.*custom layer.*from_keras"):
        layers = load_batch_norms(DATA / name)
    assert list(layers) == ["bn_top"]


def test_a_custom_layer_without_batch_norm_variables_loads_without_a_warning():
    """A custom layer holding a Dense only (a 2-D kernel): nothing BN-like is left behind, nothing to warn of."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(load_batch_norms(DATA / "keras_bn_plain_custom_layer.keras")) == ["bn_top"]


def test_a_layer_whose_config_tf_keras_left_empty_is_found_by_its_name(tmp_path):
    """tf.keras 2.15 wrote ``"config": {}`` for such a custom layer in one of our runs (the model saved as .keras,
    then as .h5), its name only beside the config, as a functional model names its layers; the layer was looked up
    as 'None', so nothing was found in its group and no warning came. The recorded tf.keras file, edited so."""
    target = tmp_path / "empty_config.h5"
    target.write_bytes((DATA / "tfkeras_bn_custom_layer.h5").read_bytes())
    with h5py.File(target, "r+") as handle:
        config = json.loads(handle.attrs["model_config"])
        block = next(layer for layer in config["config"]["layers"] if layer.get("name") == "block")
        block["config"] = {}
        handle.attrs["model_config"] = json.dumps(config)
    with pytest.warns(UserWarning, match=r"'block'.*custom layer"):
        assert list(load_batch_norms(target)) == ["bn_top"]


def test_the_custom_layer_check_ends_on_hard_link_cycles(tmp_path):
    """The look into a custom layer's groups follows hard links only, but those may loop back up the tree (HDF5 allows
    a group as its own member): a walk bounded by depth alone visited 256 ** 4 groups. A file whose custom layer
    (holding a Dense only) is full of such loops loads at once, without a warning (nothing BN-like in it)."""
    def loops(handle):
        block = handle["layers/block"]
        for index in range(64):
            block[f"loop_{index}"] = block  # (a hard link: the group itself, one level down)
            block["dense"][f"up_{index}"] = block
    edited = _with_weights(tmp_path, loops, source=DATA / "keras_bn_plain_custom_layer.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(load_batch_norms(edited)) == ["bn_top"]
