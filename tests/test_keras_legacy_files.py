"""load_batch_norms on Keras' older formats, as real Keras wrote them: legacy HDF5 models and tf.keras 2's .keras.

tools/keras_recordings/keras_legacy_model_files.py recorded the files in tests/data: ``tfkeras_bn_legacy.h5`` and
``tfkeras_bn_model.keras`` are one trained model saved by tf.keras 2.15 (TensorFlow 2.15.1) as a legacy HDF5 model
and as a .keras archive, ``tfkeras_bn_weights.h5`` its ``save_weights``; ``keras3_bn_legacy.h5`` a model saved by
Keras 3.15.1's legacy HDF5 writer. The .npz beside them hold what each BN layer computed in that Keras (inference and
a training call on a recorded input, the weights before and after). Neither Keras is needed here; h5py is.
"""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from normkit.keras import BatchNormalization, load_batch_norms

from keras_records import DATA, assert_bfloat16_layer_as_recorded, keras_arrays, read_record

h5py = pytest.importorskip("h5py", reason="load_batch_norms reads HDF5: pip install h5py (normkit[keras])")

TF_PATHS = ["bn_conv", "bn_axes", "bn_ghost", "bn_renorm", "bn_bare", "steps/bn_steps", "outer/inner/bn_deep",
            "outer/bn_mid"]
K3_PATHS = ["bn_conv", "bn_renorm", "bn_bare", "steps/bn_steps", "outer/inner/bn_deep", "outer/bn_mid"]
FILES = [("tfkeras_bn_legacy.h5", "tfkeras_bn_legacy.npz", TF_PATHS),
         ("tfkeras_bn_model.keras", "tfkeras_bn_legacy.npz", TF_PATHS),
         ("keras3_bn_legacy.h5", "keras3_bn_legacy.npz", K3_PATHS)]
TF_H5 = DATA / "tfkeras_bn_legacy.h5"


def steps_as_recorded(layers, record, name):
    """Each loaded layer holds Keras' weights, computes Keras' inference and training outputs on the recorded input,
    and its weights after that training step are Keras' (the file's recorded answers, npz keys "<path>/...")."""
    for path, layer in layers.items():
        for ours, theirs in zip(layer.get_weights(), keras_arrays(record, path, "weights"), strict=True):
            same_values(ours, theirs)
        x = torch.as_tensor(record[f"{path}/x"])
        np.testing.assert_allclose(layer(x, training=False).detach().numpy(), record[f"{path}/y_infer"],
                                   rtol=1e-5, atol=1e-6, err_msg=f"{name}: {path}")
        np.testing.assert_allclose(layer(x, training=True).detach().numpy(), record[f"{path}/y_train"],
                                   rtol=1e-5, atol=2e-6, err_msg=f"{name}: {path}")
        for ours, theirs in zip(layer.get_weights(), keras_arrays(record, path, "after"), strict=True):
            same_values(ours, theirs, rtol=1e-5, atol=1e-6)


def same_values(ours, theirs, **tolerance):
    """Keras' array in normkit's shape (tf.keras keeps ghost-batch and multi-axis weights in the inputs' broadcast
    shape, (1, 1, C)); the values compared, exactly unless a tolerance is given."""
    assert theirs.size == ours.size
    theirs = theirs.reshape(ours.shape)
    if tolerance:
        np.testing.assert_allclose(ours, theirs, **tolerance)
    else:
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("name, npz, paths", FILES)
def test_every_batch_norm_with_its_options_and_keras_weights(name, npz, paths):
    record = read_record(npz)
    layers = load_batch_norms(DATA / name)
    assert list(layers) == paths
    assert all(isinstance(layer, BatchNormalization) and layer.built for layer in layers.values())
    assert [layers[p].momentum for p in ("bn_conv", "bn_renorm", "bn_bare", "outer/inner/bn_deep", "outer/bn_mid")] \
        == [0.5, 0.6, 0.7, 0.5, 0.8]
    renorm, bare = layers["bn_renorm"], layers["bn_bare"]
    assert renorm.renorm and renorm.renorm_momentum == pytest.approx(0.8)
    assert renorm.renorm_clipping == {"rmax": 1.5, "rmin": 0.5, "dmax": 0.5}
    assert not bare.center and not bare.scale and bare.epsilon == pytest.approx(0.01)
    assert not layers["outer/inner/bn_deep"].scale and layers["outer/inner/bn_deep"].center
    if "bn_ghost" in layers:  # tf.keras' options, which Keras 3 lacks
        assert layers["bn_ghost"].virtual_batch_size == 4 and layers["bn_ghost"].axis == 1  # (saved as [2]: shifted)
        assert layers["bn_axes"].axis == [2, 3] and layers["bn_axes"].gamma.shape == (4, 4)
    for path, layer in layers.items():
        saved = keras_arrays(record, path, "weights")
        assert len(saved) == len(layer.get_weights())
        for ours, theirs in zip(layer.get_weights(), saved):
            same_values(ours, theirs)
        assert not np.allclose(layer.get_weights()[-1], 1.0)  # (trained: not the initial statistics)


@pytest.mark.parametrize("name, npz, paths", FILES)
def test_the_loaded_layers_compute_what_keras_computed(name, npz, paths):
    """Inference and one training call on the recorded input, and the weights after it, as that Keras computed them.
    tf.keras ran its channels-last conv BN (rank 4) with its fused kernel, which moves the moving variance by the
    unbiased batch variance (var * n / (n - 1)); normkit.keras follows Keras 3 (biased, docs/keras.md): that one
    array is compared with the difference taken out."""
    record = read_record(npz)
    for path, layer in load_batch_norms(DATA / name).items():
        x = torch.as_tensor(record[f"{path}/x"])
        if path == "steps/bn_steps":  # (the wrapper's inference: the layer on every time step's rows)
            y = layer(x.reshape(-1, x.shape[-1]), training=False).reshape(x.shape)
            np.testing.assert_allclose(y.detach().numpy(), record[f"{path}/y_infer"], rtol=1e-5, atol=1e-6)
            continue
        np.testing.assert_allclose(layer(x, training=False).detach().numpy(), record[f"{path}/y_infer"],
                                   rtol=1e-5, atol=1e-6, err_msg=f"{name}: {path}")
        np.testing.assert_allclose(layer(x, training=True).detach().numpy(), record[f"{path}/y_train"],
                                   rtol=1e-5, atol=2e-6, err_msg=f"{name}: {path}")
        after = keras_arrays(record, path, "after")
        if int(record[f"{path}/fused"]):
            values = record[f"{path}/x"].astype(np.float64).reshape(-1, after[3].size)
            count = values.shape[0]
            after[3] = after[3] - (1 - layer.momentum) * values.var(axis=0) / (count - 1)
        for ours, theirs in zip(layer.get_weights(), after, strict=True):
            same_values(ours, theirs, rtol=1e-5, atol=1e-6)


def test_one_tf_keras_model_in_both_formats_is_the_same_layers():
    """The legacy HDF5 file holds no build shapes; the layers built from their weights (input rank unknown, as a
    layer loaded from a state_dict) hold the archive's weights and take the same inputs."""
    from_h5, from_archive = load_batch_norms(TF_H5), load_batch_norms(DATA / "tfkeras_bn_model.keras")
    assert list(from_h5) == list(from_archive)
    for path in from_h5:
        for ours, theirs in zip(from_h5[path].get_weights(), from_archive[path].get_weights(), strict=True):
            np.testing.assert_array_equal(ours, theirs)
    assert from_h5["bn_conv"].get_build_config() is None and from_h5["bn_conv"].axis == 3
    assert from_archive["bn_conv"].get_build_config() == {"input_shape": [None, 4, 4, 4]}


@pytest.mark.parametrize("name", ["tfkeras_bn_legacy.h5", "keras3_bn_legacy.h5"])
def test_axis_moves_a_channels_last_conv_layer_into_an_nchw_model(tmp_path, name):
    """tf.keras' HDF5 bn_conv has no build shape (axis 3, rank unknown), Keras 3's has one (its input tensor's):
    moved to axis 1 either computes on NCHW data what Keras computed on NHWC data."""
    source = DATA / name
    if name.startswith("tfkeras"):
        with pytest.raises(ValueError, match="layer 'bn_axes'.*only a single feature axis can be moved"):
            load_batch_norms(source, axis=1)

        def without_bn_axes(handle):  # (the file without its multi-axis layer, which cannot be moved)
            config = json.loads(handle.attrs["model_config"])
            config["config"]["layers"] = [layer for layer in config["config"]["layers"]
                                          if layer["config"]["name"] != "bn_axes"]
            handle.attrs["model_config"] = json.dumps(config)
        source = _edited(tmp_path, without_bn_axes)
    record = read_record("keras3_bn_legacy.npz" if name.startswith("keras3") else "tfkeras_bn_legacy.npz")
    layer = load_batch_norms(source, axis=1)["bn_conv"]
    assert layer.axis == 1
    nchw = torch.as_tensor(np.ascontiguousarray(record["bn_conv/x"].transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(layer(nchw, training=False).detach().numpy().transpose(0, 2, 3, 1),
                               record["bn_conv/y_infer"], rtol=1e-5, atol=1e-6)


def test_a_weights_only_file_is_refused_saying_it_holds_no_options():
    """tf.keras' model.save_weights("x.h5"): arrays without the layers' options (a decision, docs/keras.md)."""
    with pytest.raises(ValueError, match="tfkeras_bn_weights.h5 is an HDF5 weights file .*holds no layer options"
                                         ".*model.save\\('model.keras'\\).*from_keras_config"):
        load_batch_norms(DATA / "tfkeras_bn_weights.h5")


def _edited(tmp_path, edit, source=TF_H5):
    target = tmp_path / "edited.h5"
    shutil.copyfile(source, target)
    with h5py.File(target, "r+") as handle:
        edit(handle)
    return target


RENORM = "model_weights/bn_renorm/bn_renorm"  # (tf.keras' HDF5 group of bn_renorm's variables)
DEEP = "model_weights/outer/bn_deep"         # (tf.keras names a nested layer's variables by its own name only)


def _set_names(group, add=None, drop=None):
    """A layer group's weight_names with one name added or dropped, written as Keras writes them (text)."""
    names = [name.decode() if isinstance(name, bytes) else name for name in group.attrs["weight_names"]]
    names = [name for name in names if name != drop] + ([add] if add else [])
    group.attrs["weight_names"] = np.array(names, dtype=h5py.string_dtype())


def _replace(handle, where, value):
    del handle[where]
    handle[where] = value


@pytest.mark.parametrize("case, layer, message", [
    ("missing weight", "bn_renorm", "variable bn_renorm/gamma:0 is not an array of this file"),
    ("missing nested weight", "outer/inner/bn_deep", "expects 3 weights"),
    ("wrong shape", "bn_renorm", "moving_mean.* has shape \\(4,\\), got an array of shape \\(5,\\)"),
    ("soft link", "bn_renorm", "variable bn_renorm/gamma:0 is not an array of this file"),
    ("external link", "outer/inner/bn_deep", "variable bn_deep/beta:0 is not an array of this file"),
    ("linked layer group", "bn_renorm", "the weights file does not match the config"),
    ("huge variable", "bn_renorm", "too large for a BN variable"),
    ("integer values", "bn_renorm", "not floating-point"),
    ("foreign variable", "bn_renorm", "not a BatchNormalization's"),
    ("ambiguous names", "outer/inner/bn_deep", "ambiguous"),
    ("weight_names not text", "bn_renorm", "not text"),
])
def test_a_malformed_legacy_file_is_a_value_error_naming_file_and_layer(tmp_path, case, layer, message):
    def edit(handle):
        group = handle[RENORM]
        if case == "missing weight":
            del group["gamma:0"]
        elif case == "missing nested weight":  # (its name gone from weight_names too: then it has one weight fewer)
            _set_names(handle["model_weights/outer"], drop="bn_deep/beta:0")
        elif case == "wrong shape":
            _replace(handle, f"{RENORM}/moving_mean:0", np.ones(5, dtype="f4"))
        elif case == "soft link":
            _replace(handle, f"{RENORM}/gamma:0", h5py.SoftLink(f"/{RENORM}/beta:0"))
        elif case == "external link":
            _replace(handle, f"{DEEP}/beta:0", h5py.ExternalLink(str(tmp_path / "elsewhere.h5"), "/data"))
        elif case == "linked layer group":
            handle["model_weights"].move("bn_renorm", "bn_renorm_moved")
            handle["model_weights/bn_renorm"] = h5py.SoftLink("/model_weights/bn_renorm_moved")
        elif case == "huge variable":  # 2**33 declared values in a few bytes of file (chunked, never written)
            del group["gamma:0"]
            group.create_dataset("gamma:0", shape=(1 << 33,), dtype="f4", chunks=(1 << 16,), compression="gzip")
        elif case == "integer values":
            _replace(handle, f"{RENORM}/gamma:0", np.ones(4, dtype="i4"))
        elif case == "foreign variable":
            _set_names(handle["model_weights/bn_renorm"], add="bn_renorm/kernel:0")
        elif case == "ambiguous names":  # (tf.keras names a nested layer's variables by its name alone: two alike)
            _set_names(handle["model_weights/outer"], add="bn_deep/beta:0")
        else:
            handle["model_weights/bn_renorm"].attrs["weight_names"] = np.arange(7)
    target = _edited(tmp_path, edit)
    with pytest.raises(ValueError, match=f"{target.name}.*layer '{layer}'.*{message}"):
        load_batch_norms(target)


def test_a_damaged_or_foreign_hdf5_file_is_a_value_error_naming_it(tmp_path):
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(TF_H5.read_bytes()[: TF_H5.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.h5 is an HDF5 file that cannot be read.*truncated"):
        load_batch_norms(truncated)

    def bad_json(handle):
        handle.attrs["model_config"] = "{not json"
    with pytest.raises(ValueError, match="edited.h5: its model_config attribute cannot be read"):
        load_batch_norms(_edited(tmp_path, bad_json))

    def no_weights(handle):
        del handle["model_weights"]
    with pytest.raises(ValueError, match="edited.h5 holds a model's config but no model_weights group"):
        load_batch_norms(_edited(tmp_path, no_weights))

    def numbers(handle):
        del handle.attrs["model_config"]
        handle.attrs["model_config"] = np.zeros(3)
    with pytest.raises(ValueError, match="edited.h5: its model_config attribute cannot be read.*not text"):
        load_batch_norms(_edited(tmp_path, numbers))


def test_a_keras_3_file_names_nested_weights_by_their_whole_path(tmp_path):
    """Keras 3's legacy writer names a nested layer's variables outer/inner/bn_deep/...: a layer of the same name
    one level up (outer/bn_deep) is another layer, not an ambiguity."""
    source = DATA / "keras3_bn_legacy.h5"

    def other_bn_deep(handle):
        _set_names(handle["model_weights/outer"], add="outer/bn_deep/beta")
        handle["model_weights/outer/outer/bn_deep/beta"] = np.full(4, 7.0, dtype="f4")
    layer = load_batch_norms(_edited(tmp_path, other_bn_deep, source))["outer/inner/bn_deep"]
    for ours, theirs in zip(layer.get_weights(), load_batch_norms(source)["outer/inner/bn_deep"].get_weights(),
                            strict=True):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("name", ["tfkeras_bn_input_shape.h5", "tfkeras_bn_input_shape.keras"])
def test_a_sequential_whose_first_layer_was_given_its_input_shape(name):
    """tf.keras writes ``input_shape=(5,)`` given to a Sequential's first layer into that layer's config as
    ``batch_input_shape`` (tools/keras_recordings/keras_input_shape_file.py, tf.keras 2.15): the layer loads, with Keras' weights, and
    computes what tf.keras computed. That shape is the one Keras built the layer with, so the legacy HDF5 file, which
    saves no build config, gives the layer its input rank too."""
    record = read_record("tfkeras_bn_input_shape.npz")
    layers = load_batch_norms(DATA / name)
    assert list(layers) == ["bn_input", "bn_after"]
    assert layers["bn_input"].get_build_config() == {"input_shape": [None, 5]}
    steps_as_recorded(layers, record, name)
    # (the config alone, as tf.keras' get_config() returns it: from_config takes it too)
    config = {"name": "bn", "trainable": True, "dtype": "float32", "batch_input_shape": [None, 5], "axis": [1],
              "momentum": 0.8, "epsilon": 0.001, "center": True, "scale": True}
    assert BatchNormalization.from_config(config).momentum == 0.8


@pytest.mark.parametrize("name", ["tfkeras_bn_sync.h5", "tfkeras_bn_sync.keras"])
def test_tf_keras_sync_batch_normalization_layers_are_loaded(name):
    """tf.keras' SyncBatchNormalization (BatchNormalization with synchronized=True, saved under its own class name;
    tools/keras_recordings/tfkeras_sync_file.py, tf.keras 2.15) was passed over: the model's file "had" only its plain BN. Each loads
    as a synchronized layer with Keras' weights and computes what tf.keras computed (outside a process group, as
    tf.keras outside a strategy: local statistics, with normkit's one warning)."""
    record = read_record("tfkeras_bn_sync.npz")
    layers = load_batch_norms(DATA / name)
    assert list(layers) == ["sbn_first", "bn_plain", "sbn_axis1"]
    assert [layer.synchronized for layer in layers.values()] == [True, False, True]
    assert layers["sbn_axis1"].axis == 1 and not layers["sbn_axis1"].center and not layers["bn_plain"].scale
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (synchronized=True without a process group says so once)
        steps_as_recorded(layers, record, name)


def test_tf_1_13_class_names_of_batch_normalization_are_read(tmp_path):
    """TensorFlow 1.13 saved BN layers as "BatchNormalizationV1" or "BatchNormalizationV2", which tf.keras still reads
    as BatchNormalization (keras/src/layers/serialization.py); load_batch_norms passed over them without a word. A
    TF 1.13 file is not at hand: tf.keras 2.15's model with its layers' classes renamed so (the weights are laid out
    alike) loads the same layers, with the same weights, as the file itself."""
    def renamed(handle):
        config = json.loads(handle.attrs["model_config"])
        for index, layer in enumerate(config["config"]["layers"]):
            if layer["class_name"] == "BatchNormalization":
                layer["class_name"] = f"BatchNormalizationV{1 + index % 2}"
        handle.attrs["model_config"] = json.dumps(config)
    original, old = load_batch_norms(TF_H5), load_batch_norms(_edited(tmp_path, renamed))
    assert list(old) == list(original)
    for path, layer in original.items():
        assert old[path].get_config() == layer.get_config()
        for ours, theirs in zip(old[path].get_weights(), layer.get_weights(), strict=True):
            np.testing.assert_array_equal(ours, theirs)


def test_a_bfloat16_layer_of_keras_3s_legacy_writer_loads_exactly():
    """Keras 3's legacy HDF5 writer stores a bfloat16 layer's variables as raw 2-byte values without the dtype
    attribute the .keras format adds (tools/keras_recordings/keras_bfloat16_legacy_file.py, Keras 3.15.1); the layer's policy says what
    they are. They were refused ("holds |V2 values"): they are read as the same numbers, and compute what Keras did."""
    record = read_record("keras3_bn_bfloat16_legacy.npz")
    assert_bfloat16_layer_as_recorded(load_batch_norms(DATA / "keras3_bn_bfloat16_legacy.h5")["bn_bf16"], record,
                                      "bn_bf16")


def test_raw_two_byte_values_of_a_layer_of_another_policy_are_refused(tmp_path):
    """Raw 2-byte values are read as bfloat16 only where the layer's policy is bfloat16 (as Keras wrote them): for a
    float32 layer they are no float Keras writes, and stay refused by name."""
    def float32_policy(handle):
        config = json.loads(handle.attrs["model_config"])
        for layer in config["config"]["layers"]:
            if layer["class_name"] == "BatchNormalization":
                layer["config"]["dtype"] = "float32"
        handle.attrs["model_config"] = json.dumps(config)
    with pytest.raises(ValueError, match=r"layer 'bn_bf16'.*\|V2 values, not floating-point"):
        load_batch_norms(_edited(tmp_path, float32_policy, DATA / "keras3_bn_bfloat16_legacy.h5"))


def test_a_keras_2_2_sequential_model_config_as_a_list_is_read(tmp_path):
    """Keras <= 2.2.4 wrote a Sequential's config as the list of its layers' configs (no "name", no "layers"; no
    InputLayer, the first layer holding batch_input_shape), which tf.keras still loads (Sequential.from_config); it was
    refused as "not a saved Keras model". No such Keras is at hand: tf.keras 2.15's Sequential model
    (tools/keras_recordings/keras_input_shape_file.py) with its config rewritten so, which tf.keras 2.15 loads, loads the same layers
    with the same weights here."""
    def as_keras_2_2(handle):
        config = json.loads(handle.attrs["model_config"])
        config["config"] = [layer for layer in config["config"]["layers"] if layer["class_name"] != "InputLayer"]
        handle.attrs["model_config"] = json.dumps(config)
    source = DATA / "tfkeras_bn_input_shape.h5"
    original, old = load_batch_norms(source), load_batch_norms(_edited(tmp_path, as_keras_2_2, source))
    assert list(old) == list(original) == ["bn_input", "bn_after"]
    for path, layer in original.items():
        assert old[path].get_config() == layer.get_config()
        assert old[path].get_build_config() == layer.get_build_config()
        for ours, theirs in zip(old[path].get_weights(), layer.get_weights(), strict=True):
            np.testing.assert_array_equal(ours, theirs)


def test_a_nested_keras_2_2_sequential_named_beside_its_list_config_is_read(tmp_path):
    """The same list form for a Sequential nested in a functional model, whose entry names it beside its config (as
    functional models name their layers): tf.keras 2.15's model with its 'outer' Sequential rewritten so loads the
    same layers, under the same paths, with the same weights."""
    def outer_as_keras_2_2(handle):
        config = json.loads(handle.attrs["model_config"])
        outer = next(layer for layer in config["config"]["layers"] if layer.get("name") == "outer")
        outer["config"] = outer["config"]["layers"]
        handle.attrs["model_config"] = json.dumps(config)
    original, old = load_batch_norms(TF_H5), load_batch_norms(_edited(tmp_path, outer_as_keras_2_2))
    assert list(old) == list(original) and "outer/inner/bn_deep" in old
    for path, layer in original.items():
        for ours, theirs in zip(old[path].get_weights(), layer.get_weights(), strict=True):
            np.testing.assert_array_equal(ours, theirs)


def test_a_frozen_tf_1_batch_normalization_v1_says_how_it_differs(tmp_path):
    """tf.keras reads "BatchNormalizationV1" as its V1 class (batch_normalization_v1: _USE_V2_BEHAVIOR=False, the spec's
    section 2), whose frozen layer still normalizes training calls by the batch's statistics; the loaded layer, frozen
    as Keras 2/3's, uses its moving statistics there, and said nothing. A UserWarning names the layer and the recipe,
    which gives V1's output (oracle: the batch-statistics formula in NumPy float64) and updates nothing."""
    renamed = set()

    def frozen(version):
        def edit(handle):
            config = json.loads(handle.attrs["model_config"])
            for layer in config["config"]["layers"]:
                if layer["class_name"] == "BatchNormalization":
                    layer["class_name"], layer["config"]["trainable"] = f"BatchNormalization{version}", False
                    renamed.add(layer["config"]["name"])
            handle.attrs["model_config"] = json.dumps(config)
        return edit
    with pytest.warns(UserWarning, match="frozen BatchNormalizationV1") as caught:
        layers = load_batch_norms(_edited(tmp_path, frozen("V1")))
    warned = {name for name in layers for w in caught if f"layer {name!r} is a frozen" in str(w.message)}
    assert warned == renamed and renamed
    layer = next(layers[name] for name in sorted(renamed) if isinstance(layers[name].bn.axis, int)
                 and not layers[name].renorm and layers[name].virtual_batch_size is None)  # (the plain formula's)
    shape = [6, 2, 3, 2]  # (a legacy file saves no build shape: the layer takes inputs of any rank)
    shape[layer.bn.axis] = layer.bn.num_features
    x = torch.tensor(np.random.default_rng(0).normal(1.0, 2.0, size=shape), dtype=torch.float32)
    before = [w.copy() for w in layer.get_weights()]
    layer.trainable, layer.momentum = True, 1.0
    for parameter in (layer.gamma, layer.beta):
        if parameter is not None:
            parameter.requires_grad_(False)
    y = layer(x, training=True)
    values = np.moveaxis(x.double().numpy(), layer.bn.axis, -1)
    mean, var = values.reshape(-1, values.shape[-1]).mean(0), values.reshape(-1, values.shape[-1]).var(0)
    gamma = layer.gamma.detach().double().numpy() if layer.gamma is not None else 1.0
    beta = layer.beta.detach().double().numpy() if layer.beta is not None else 0.0
    expected = np.moveaxis((values - mean) / np.sqrt(var + layer.epsilon) * gamma + beta, -1, layer.bn.axis)
    np.testing.assert_allclose(y.detach().double().numpy(), expected, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(layer.get_weights(), before, strict=True):
        np.testing.assert_array_equal(ours, theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (a frozen layer of another class is Keras 2/3's, read as it always was)
        load_batch_norms(_edited(tmp_path, frozen("V2")))
