"""Porting BatchNormalization layers between Keras and normkit, against layers recorded from the real Keras 3.

tests/data/keras_configs.json holds, for each layer, what Keras 3 itself wrote: its
get_config(), get_build_config(), weights, a training call and an inference call
(tools/keras_recordings/keras_configs.py records it). Keras is not needed here except for the last test.
"""

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import normkit.options
from normkit.keras import BatchNormalization, from_keras, from_keras_config, to_keras
from normkit.stats import RenormClipping

from oracle import assert_close, assert_same_config

DATA = json.loads((Path(__file__).parent / "data" / "keras_configs.json").read_text())
NAMES = sorted(name for name in DATA if name != "__meta__")


def _arrays(values):
    return [np.asarray(value, dtype=np.float32) for value in values]


@pytest.mark.parametrize("name", NAMES)
def test_a_keras_layer_computes_the_same_here(name):
    """Config, build and weights from Keras: the same training step, weights after it, inference, losses."""
    recorded = DATA[name]
    layer = from_keras_config(recorded["config"], recorded["build_config"], _arrays(recorded["weights"]))
    assert layer.name == recorded["config"]["name"]
    assert layer.trainable == recorded["config"]["trainable"]
    assert_close(layer(torch.tensor(recorded["x_train"]), training=True), recorded["y_train"], torch.float32)
    for ours, theirs in zip(layer.get_weights(), recorded["weights_after"], strict=True):
        assert_close(ours, theirs, torch.float32)
    assert_close(layer(torch.tensor(recorded["x_infer"]), training=False), recorded["y_infer"], torch.float32)
    losses = layer.losses
    assert len(losses) == len(recorded["losses"])
    for ours, theirs in zip(losses, recorded["losses"]):
        assert_close(ours, theirs, torch.float32)
    layer.bn.apply_constraints()
    for label, parameter in (("gamma", layer.bn.weight), ("beta", layer.bn.bias)):
        if label in recorded["constrained"]:
            assert_close(parameter, recorded["constrained"][label], torch.float32, err_msg=label)


TF_DATA = json.loads((Path(__file__).parent / "data" / "tfkeras_configs.json").read_text())


@pytest.mark.parametrize("name", sorted(name for name in TF_DATA if not name.startswith("__")))
def test_a_tf_keras_layer_computes_the_same_here(name):
    """tf.keras 2.15's get_config(), get_build_config() and get_weights() (tools/keras_recordings/tfkeras_configs.py): a built
    ghost-batch layer writes its axis shifted by one and its weights as (1, 1, C), a list axis its weights as
    (1, H, W); from_keras_config read them as Keras 3's ("axis=[2] is out of range for an input of rank 2", "weight
    'gamma' has shape (3, 4), got (1, 3, 4)"), so from_keras failed on every such tf.keras layer."""
    recorded = TF_DATA[name]
    layer = from_keras_config(recorded["config"], recorded["build_config"], _arrays(recorded["weights"]))
    assert layer.get_build_config() == recorded["build_config"]
    for ours, theirs in zip(layer.get_weights(), _arrays(recorded["weights"]), strict=True):
        np.testing.assert_array_equal(ours, theirs.reshape(ours.shape))
    # (a live layer's get_build_config(), which from_keras passes, gives the shape as a tuple)
    live = from_keras_config(recorded["config"], {"input_shape": tuple(recorded["build_config"]["input_shape"])},
                             _arrays(recorded["weights"]))
    assert live.get_build_config() == recorded["build_config"] and live.axis == layer.axis
    assert_close(layer(torch.tensor(recorded["x_train"]), training=True), recorded["y_train"], torch.float32)
    for ours, theirs in zip(layer.get_weights(), _arrays(recorded["weights_after"]), strict=True):
        assert_close(ours, theirs.reshape(ours.shape), torch.float32)
    assert_close(layer(torch.tensor(recorded["x_infer"]), training=False), recorded["y_infer"], torch.float32)
    # the options and build alone (no weights): the same axis
    bare = from_keras_config(recorded["config"], recorded["build_config"])
    assert bare.axis == layer.axis and bare.get_build_config() == recorded["build_config"]
    # normkit's own config of the loaded layer (no tf.keras shift in it) gives the same layer back
    again = from_keras_config(layer.get_config(), layer.get_build_config(), layer.get_weights())
    assert again.axis == layer.axis and again.virtual_batch_size == layer.virtual_batch_size


@pytest.mark.parametrize("name", NAMES)
def test_keras_config_is_what_keras_writes(name):
    """The same arguments given to normkit's layer: keras_config() is Keras' own get_config()."""
    recorded = DATA[name]
    ours = BatchNormalization(**recorded["kwargs"], name=recorded["config"]["name"])
    ours.build(recorded["build_config"]["input_shape"])
    assert_same_config(ours.keras_config(), recorded["config"])
    assert ours.get_build_config() == recorded["build_config"]


@pytest.mark.parametrize("name", NAMES)
def test_keras_config_round_trips(name):
    recorded = DATA[name]
    assert_same_config(from_keras_config(recorded["config"]).keras_config(), recorded["config"])


@pytest.mark.parametrize("name", NAMES)
def test_get_config_round_trips_to_what_keras_wrote(name):
    """normkit's own get_config()/from_config() (a model's saved options, a clone) keep every Keras option: the
    layer it gives is the recorded Keras layer again (trainable=False included: a frozen layer came back trainable)."""
    recorded = DATA[name]
    original = from_keras_config(recorded["config"])
    copied = BatchNormalization.from_config(original.get_config())
    assert copied.trainable == recorded["config"]["trainable"]
    assert_same_config(copied.keras_config(), recorded["config"])


def test_keras_initializer_configs_give_their_distributions():
    """Keras' serialized random initializers keep their parameters (the draws are torch's, seeded)."""
    layer = BatchNormalization(gamma_initializer={"class_name": "RandomNormal",
                                                  "config": {"mean": 3.0, "stddev": 0.5, "seed": 7}},
                               beta_initializer={"class_name": "RandomUniform",
                                                 "config": {"minval": 2.0, "maxval": 2.5, "seed": None}},
                               moving_variance_initializer={"class_name": "TruncatedNormal",
                                                            "config": {"mean": 1.0, "stddev": 0.1}},
                               moving_mean_initializer={"class_name": "Constant", "config": {"value": -4.0}})
    layer.build((2, 4000))
    gamma, beta, mean, var = layer.get_weights()
    assert abs(gamma.mean() - 3.0) < 0.05 and abs(gamma.std() - 0.5) < 0.05
    assert beta.min() >= 2.0 and beta.max() <= 2.5
    assert var.min() >= 0.8 and var.max() <= 1.2
    assert np.all(mean == -4.0)
    again = BatchNormalization(gamma_initializer={"class_name": "RandomNormal",
                                                  "config": {"mean": 3.0, "stddev": 0.5, "seed": 7}})
    again.build((2, 4000))
    np.testing.assert_array_equal(again.get_weights()[0], gamma)  # the seed fixes the draw


@pytest.mark.parametrize("kwargs,match", [
    (dict(virtual_batch_size=4), "virtual_batch_size"),
    (dict(adjustment=lambda shape: (1.0, 0.0)), "adjustment"),
    (dict(axis=[1, 2]), "list axis"),
    (dict(gamma_regularizer=lambda w: w.sum()), "gamma_regularizer"),
    (dict(beta_constraint=lambda w: w), "beta_constraint"),
    (dict(renorm=True, renorm_clipping={"rmax": lambda step: 1.0 + step / 100}), "schedules"),
    (dict(renorm=True, renorm_clipping=RenormClipping.paper_schedule()), "schedules"),
])
def test_keras_config_refuses_what_keras_cannot_load(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchNormalization(**kwargs).keras_config()


def test_keras_config_writes_a_renorm_clipping_object_as_keras_dict():
    """The layer takes a RenormClipping as it takes Keras' dict; keras_config() raised AttributeError on one."""
    recorded = DATA["renorm"]
    clipping = RenormClipping(**recorded["kwargs"]["renorm_clipping"])
    ours = BatchNormalization(**{**recorded["kwargs"], "renorm_clipping": clipping}, name=recorded["config"]["name"])
    ours.build(recorded["build_config"]["input_shape"])
    assert_same_config(ours.keras_config(), recorded["config"])
    partial = BatchNormalization(renorm=True, renorm_clipping=RenormClipping(rmax=1.5), name="bn")
    assert partial.keras_config() == BatchNormalization(renorm=True, renorm_clipping={"rmax": 1.5},
                                                        name="bn").keras_config()


def test_keras_config_writes_a_one_element_axis_list_as_its_int():
    """A built tf.keras layer's config holds axis=[3]; Keras 3 only reads an int, which is the same layer."""
    listed, plain = BatchNormalization(axis=[3], name="bn"), BatchNormalization(axis=3, name="bn")
    assert listed.keras_config() == plain.keras_config()
    assert listed.keras_config()["axis"] == 3


@pytest.mark.parametrize("config,match", [
    ({"axis": -1, "unknown_option": 1}, "unknown_option"),
    ({"dtype": {"class_name": "DTypePolicy", "config": {"name": "int8"}}}, "int8"),
    ({"gamma_initializer": {"class_name": "Orthogonal", "config": {}}}, "Orthogonal"),
    ({"beta_regularizer": {"class_name": "L2", "config": {"factor": 0.1}}}, "L2"),
    # A value Keras' class refuses names the argument too (it said "could not convert string to float: 'x'", or
    # "regularization factors must be ... >= 0", without saying which of the layer's eight objects it was).
    ({"gamma_initializer": {"class_name": "Constant", "config": {"value": "x"}}}, "gamma_initializer.*Constant"),
    ({"moving_mean_initializer": {"class_name": "RandomNormal", "config": {"stddev": "wide"}}},
     "moving_mean_initializer.*RandomNormal"),
    ({"beta_initializer": {"class_name": "VarianceScaling", "config": {"scale": -1.0}}},
     "beta_initializer.*VarianceScaling"),
    ({"gamma_regularizer": {"class_name": "L2", "config": {"l2": -1.0}}}, "gamma_regularizer.*L2"),
    ({"beta_constraint": {"class_name": "MaxNorm", "config": {"max_value": "two"}}}, "beta_constraint.*MaxNorm"),
    # The serialized layer (a model config's entry) for its config: the unknown keys alone did not say the fix.
    ({"module": "keras.layers", "class_name": "BatchNormalization", "config": {"axis": -1}, "registered_name": None},
     r"a serialized layer .*from_config\(serialized\['config'\]\)"),
])
def test_from_config_says_what_it_cannot_read(config, match):
    with pytest.raises(ValueError, match=match):
        BatchNormalization.from_config(config)


def test_weights_need_a_build():
    recorded = DATA["defaults_dense"]
    with pytest.raises(ValueError, match="build_config"):
        from_keras_config(recorded["config"], None, _arrays(recorded["weights"]))


def test_weights_of_another_shape_are_refused_and_change_nothing():
    """Keras' set_weights refuses an array whose shape is not its weight's (a (1,) array for a (4,) moving
    variance would otherwise broadcast into every feature), before any weight changes."""
    recorded = DATA["defaults_dense"]
    layer = from_keras_config(recorded["config"], recorded["build_config"], _arrays(recorded["weights"]))
    with pytest.raises(ValueError, match=r"'moving_variance'.*\(4,\).*\(1,\)"):
        layer.set_weights([np.full(4, 2.0), np.full(4, 3.0), np.full(4, 4.0), np.full(1, 5.0)])
    for ours, theirs in zip(layer.get_weights(), _arrays(recorded["weights"]), strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_build_after_a_state_dict_keeps_the_loaded_weights():
    """A torch checkpoint of a ported layer, loaded into a new unbuilt layer, then built (as the docs say, to know the
    input rank for get_build_config/to_keras): the Keras weights stay and it computes what Keras did. build()
    created new weights there (moving statistics 0/1: silently another layer), and on any built layer."""
    recorded = DATA["renorm"]
    ported = from_keras_config(recorded["config"], recorded["build_config"], _arrays(recorded["weights"]))
    loaded = BatchNormalization.from_config(recorded["config"])
    loaded.load_state_dict(ported.state_dict())
    assert loaded.get_build_config() is None
    with pytest.raises(ValueError, match="state_dict.*layer.build"):
        to_keras(loaded)  # (said before Keras is imported: the same error with it or without)
    loaded.build(recorded["build_config"]["input_shape"])
    assert loaded.get_build_config() == recorded["build_config"]
    for ours, theirs in zip(loaded.get_weights(), recorded["weights"], strict=True):
        np.testing.assert_array_equal(ours, np.asarray(theirs, dtype=np.float32))
    assert_close(loaded(torch.tensor(recorded["x_train"]), training=True), recorded["y_train"], torch.float32)
    for ours, theirs in zip(loaded.get_weights(), recorded["weights_after"], strict=True):
        assert_close(ours, theirs, torch.float32)
    assert_close(loaded(torch.tensor(recorded["x_infer"]), training=False), recorded["y_infer"], torch.float32)


def test_building_a_built_layer_is_refused_and_changes_nothing():
    """Keras refuses a second build (its state is locked); here it replaced the weights by fresh ones."""
    recorded = DATA["defaults_dense"]
    layer = from_keras_config(recorded["config"], recorded["build_config"], _arrays(recorded["weights"]))
    features = recorded["build_config"]["input_shape"][-1]
    for shape in (recorded["build_config"]["input_shape"], [None, features + 1]):
        with pytest.raises(ValueError, match="already built"):
            layer.build(shape)
    for ours, theirs in zip(layer.get_weights(), recorded["weights"], strict=True):
        np.testing.assert_array_equal(ours, np.asarray(theirs, dtype=np.float32))
    assert layer.get_build_config() == recorded["build_config"]
    unbuilt = BatchNormalization()
    unbuilt.load_state_dict(layer.state_dict())
    with pytest.raises(ValueError, match="already built"):  # (features that are not the loaded ones)
        unbuilt.build([None, features + 1])
    assert unbuilt.get_build_config() is None


def test_unnamed_layers_get_distinct_names_as_in_keras():
    """Keras names unnamed layers batch_normalization, batch_normalization_1, ...; every unnamed normkit layer was
    "batch_normalization", so two exported with to_keras()/keras_config() could not go into one Keras model
    (Keras: "All layers added to a Sequential model should have unique names")."""
    names = [BatchNormalization().keras_config()["name"] for _ in range(3)]
    assert len(set(names)) == 3 and all(name.startswith("batch_normalization") for name in names)
    assert BatchNormalization(name="bn").keras_config()["name"] == "bn"  # (a name given is kept)


def test_a_per_feature_constant_initializer_ports():
    """Keras' Constant broadcasts its value (value * ones(shape)), so Constant([...]) gives one value per feature;
    Keras 3.15.1 serializes a list as the list and a NumPy array as {"class_name": "__numpy__", ...}. Both failed to
    load here ("float() argument must be ... not 'list'"): from_keras, from_keras_config and load_batch_norms of
    such a layer raised. The config is the one Keras writes; the expected weights follow from Keras' rule, and the
    renorm statistics' sqrt of the variance initializer."""
    as_list = {"module": "keras.initializers", "class_name": "Constant", "config": {"value": [0.5, 2.0, 4.0]},
               "registered_name": None}
    as_array = {**as_list, "config": {"value": {"class_name": "__numpy__",
                                                "config": {"value": [0.25, 1.0, 9.0], "dtype": "float32"}}}}
    config = {**BatchNormalization(name="bn", axis=1).keras_config(), "gamma_initializer": as_list,
              "moving_variance_initializer": as_array, "renorm": True, "renorm_clipping": {}}
    layer = from_keras_config(config, {"input_shape": [None, 3, 5]})
    gamma, beta, mean, variance, stddev, renorm_mean, renorm_stddev = layer.get_weights()
    np.testing.assert_array_equal(gamma, [0.5, 2.0, 4.0])
    np.testing.assert_array_equal(variance, [0.25, 1.0, 9.0])
    np.testing.assert_array_equal(stddev, [0.5, 1.0, 3.0])
    np.testing.assert_array_equal(renorm_stddev, [0.5, 1.0, 3.0])
    assert_same_config(layer.keras_config(), config, "keras_config of the ported layer")
    with pytest.raises(ValueError, match="do not broadcast"):
        from_keras_config(config, {"input_shape": [None, 4, 5]})


def test_from_keras_refuses_other_objects():
    with pytest.raises(TypeError, match="Keras BatchNormalization"):
        from_keras(torch.nn.BatchNorm1d(3))


def _keras_on_torch():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras", reason="Keras 3 is not installed (the recorded tests above cover porting)")
    if keras.backend.backend() != "torch":
        pytest.skip("Keras runs on another backend here")
    return keras


def test_round_trip_through_the_real_keras():
    """With Keras installed: a Keras layer -> normkit -> Keras again computes what the first one did."""
    keras = _keras_on_torch()
    recorded = DATA["renorm"]
    theirs = keras.layers.BatchNormalization(**recorded["kwargs"])
    theirs.build(tuple(recorded["build_config"]["input_shape"]))
    theirs.set_weights(_arrays(recorded["weights"]))
    ours = from_keras(theirs)
    back = to_keras(ours)
    x = np.asarray(recorded["x_infer"], dtype=np.float32)
    expected = keras.ops.convert_to_numpy(theirs(x, training=False))
    assert_close(ours(torch.tensor(x), training=False), expected, torch.float32)
    assert_close(keras.ops.convert_to_numpy(back(x, training=False)), expected, torch.float32)


def test_keras_objects_given_to_a_normkit_layer_are_written_back():
    """With Keras installed: Keras' own initializer, regularizer and constraint objects go back into its config."""
    keras = _keras_on_torch()
    ours = BatchNormalization(gamma_initializer=keras.initializers.Constant(0.5),
                              beta_regularizer=keras.regularizers.L2(0.3),
                              gamma_constraint=keras.constraints.NonNeg())
    ours.build((4, 3))
    back = to_keras(ours)
    assert back.gamma_initializer.get_config() == {"value": 0.5}
    assert back.beta_regularizer.get_config()["l2"] == pytest.approx(0.3)
    assert isinstance(back.gamma_constraint, keras.constraints.NonNeg)
    np.testing.assert_array_equal(back.get_weights()[0], np.full(3, 0.5, dtype=np.float32))


def test_argument_spellings_keras_accepts_are_read_as_keras_reads_them():
    """With Keras installed: None regularization factors and VarianceScaling's "normal" or capitalized distributions
    mean what they mean in Keras (its get_config after its own reading)."""
    keras = _keras_on_torch()
    for theirs, ours in ((keras.regularizers.L1L2(l1=None, l2=0.5), normkit.options.L1L2(l1=None, l2=0.5)),
                         (keras.regularizers.L1(None), normkit.options.L1(None)),
                         (keras.regularizers.L2(None), normkit.options.L2(None))):
        assert ours.keras_config()[1] == pytest.approx(theirs.get_config())
    for spelling in ("normal", "Uniform", "Untruncated_Normal"):
        theirs = keras.initializers.VarianceScaling(distribution=spelling)
        ours = normkit.options.VarianceScaling(distribution=spelling)
        assert ours.keras_config()[1]["distribution"] == theirs.get_config()["distribution"]


def test_constraints_project_bit_for_bit_as_the_real_keras():
    """With Keras installed (torch backend: the same sums and square roots): each constraint gives Keras' float32
    values exactly (normkit's MaxNorm and MinMaxNorm rounded in another order and differed in the last bits)."""
    keras = _keras_on_torch()
    rng = np.random.default_rng(1)
    pairs = ((normkit.options.MaxNorm(0.5), keras.constraints.MaxNorm(0.5)),
             (normkit.options.MinMaxNorm(0.2, 0.7, 0.3), keras.constraints.MinMaxNorm(0.2, 0.7, 0.3)),
             (normkit.options.UnitNorm(), keras.constraints.UnitNorm()), (normkit.options.NonNeg(), keras.constraints.NonNeg()))
    for ours, theirs in pairs:
        for _ in range(20):
            w = torch.tensor(rng.normal(size=7), dtype=torch.float32)
            np.testing.assert_array_equal(ours(w).numpy(), keras.ops.convert_to_numpy(theirs(w)))


def test_keras_classes_given_as_classes_are_made_as_keras_makes_them():
    """With Keras installed: keras.constraints.NonNeg (the class) works as Keras' get() reads it, an instance made
    with no arguments, and is written back to Keras' config by its class name."""
    keras = _keras_on_torch()
    ours = BatchNormalization(gamma_constraint=keras.constraints.NonNeg, beta_regularizer=keras.regularizers.L2)
    ours.build((4, 3))
    with torch.no_grad():
        ours.gamma.copy_(torch.tensor([-1.0, 2.0, -3.0]))
    normkit.apply_constraints(ours)
    np.testing.assert_array_equal(ours.gamma.detach().numpy(),
                                  keras.ops.convert_to_numpy(keras.constraints.get(keras.constraints.NonNeg)(
                                      torch.tensor([-1.0, 2.0, -3.0]))))
    config = ours.keras_config()
    assert config["gamma_constraint"]["class_name"] == "NonNeg"
    assert config["beta_regularizer"]["config"]["l2"] == pytest.approx(0.01)


def test_a_per_feature_constant_initializer_round_trips_through_the_real_keras():
    """With Keras installed: Constant with a list and with a NumPy array, Keras -> normkit -> Keras."""
    keras = _keras_on_torch()
    for value in ([0.5, 2.0, 4.0], np.array([0.25, 1.0, 9.0], dtype=np.float32)):
        theirs = keras.layers.BatchNormalization(gamma_initializer=keras.initializers.Constant(value),
                                                 moving_variance_initializer=keras.initializers.Constant(value))
        theirs.build((4, 3))
        ours = from_keras(theirs)
        assert_same_config(ours.keras_config(), theirs.get_config(), "from_keras")
        fresh = BatchNormalization.from_config(ours.get_config())
        fresh.build((4, 3))
        for got, want in zip(fresh.get_weights(), theirs.get_weights(), strict=True):
            np.testing.assert_array_equal(got, want)
        assert_same_config(to_keras(ours).get_config(), theirs.get_config(), "to_keras")


def test_options_changed_after_build_act_as_in_the_real_keras():
    """With Keras installed: Keras reads momentum and epsilon on every call, so a change after build counts there;
    the same change on normkit's layer gives the same outputs and moving statistics."""
    keras = _keras_on_torch()
    rng = np.random.default_rng(5)
    theirs, ours = keras.layers.BatchNormalization(), BatchNormalization()
    first = rng.normal(size=(16, 3)).astype(np.float32)
    theirs(first, training=True)
    ours(torch.tensor(first), training=True)
    theirs.momentum = ours.momentum = 0.5
    theirs.epsilon = ours.epsilon = 0.25
    for step in range(3):
        x = (rng.normal(size=(16, 3)) * (step + 2) + step).astype(np.float32)
        expected = keras.ops.convert_to_numpy(theirs(x, training=True))
        assert_close(ours(torch.tensor(x), training=True), expected, torch.float32)
    for got, want in zip(ours.get_weights(), theirs.get_weights(), strict=True):
        assert_close(torch.tensor(got), want, torch.float32)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    assert_close(ours(torch.tensor(x), training=False), keras.ops.convert_to_numpy(theirs(x, training=False)),
                 torch.float32)


def test_unnamed_layers_export_into_one_keras_model():
    """With Keras installed: two unnamed normkit layers, exported, make a Keras model that saves and loads."""
    keras = _keras_on_torch()
    first, second = BatchNormalization(momentum=0.5), BatchNormalization()
    for layer in (first, second):
        layer.build((None, 3))
    model = keras.Sequential([keras.Input((3,)), to_keras(first), to_keras(second)])
    assert len({layer.name for layer in model.layers}) == 2


def test_a_seed_generator_seed_as_keras_writes_it():
    """Keras 3 writes an initializer seeded with a ``keras.random.SeedGenerator`` as the generator's own config (as
    Keras 3.15.1 wrote it, below); the layer failed at its build with "int() argument must be ... not 'dict'", naming
    nothing. The generator's seed seeds torch's draw as the int would, and keras_config() writes the dict back; a seed
    that is neither is refused by name."""
    generator = {"module": "keras.random", "class_name": "SeedGenerator",
                 "config": {"seed": 3, "name": "seed_generator"}, "registered_name": None}
    config = {"class_name": "RandomNormal", "config": {"seed": generator, "mean": 0.0, "stddev": 0.05}}
    seeded, plain = BatchNormalization(gamma_initializer=config), BatchNormalization(
        gamma_initializer={"class_name": "RandomNormal", "config": {"seed": 3, "mean": 0.0, "stddev": 0.05}})
    seeded.build((2, 6))
    plain.build((2, 6))
    np.testing.assert_array_equal(seeded.get_weights()[0], plain.get_weights()[0])
    assert seeded.keras_config()["gamma_initializer"]["config"]["seed"] == generator
    with pytest.raises(ValueError, match="gamma_initializer.*seed"):
        BatchNormalization(gamma_initializer={"class_name": "RandomNormal", "config": {"seed": "three"}})


class _RecordedLayer:
    """What a real tf.keras 2.15 layer answered (tools/keras_recordings/tfkeras_configs.py, ``__built_by_build__``), replayed for
    from_keras where TensorFlow is not installed: its config, build config, weights and input_spec, nothing else."""

    def __init__(self, recorded):
        self.built, self._recorded = True, recorded
        spec = recorded["input_spec"]
        self.input_spec = type("InputSpec", (), {"ndim": spec["ndim"],
                                                 "axes": {int(a): size for a, size in spec["axes"].items()}})()

    def get_config(self):
        return self._recorded["config"]

    def get_build_config(self):
        return self._recorded["build_config"]

    def get_weights(self):
        return _arrays(self._recorded["weights"])


@pytest.mark.parametrize("name", sorted(TF_DATA["__built_by_build__"]))
def test_from_keras_of_a_tf_keras_layer_built_by_build(name):
    """tf.keras 2.15 records no build config for a layer built by ``layer.build(shape)`` (get_build_config() is None);
    from_keras then returned it unbuilt, without its weights: a layer initialized anew, silently. Its input_spec
    gives the rank and feature sizes Keras built for: the port holds Keras' weights and computes what it computed."""
    recorded = TF_DATA["__built_by_build__"][name]
    assert recorded["build_config"] is None
    layer = from_keras(_RecordedLayer(recorded))
    assert layer.built and len(layer.get_build_config()["input_shape"]) == recorded["input_spec"]["ndim"]
    for ours, theirs in zip(layer.get_weights(), _arrays(recorded["weights"]), strict=True):
        np.testing.assert_array_equal(ours, theirs.reshape(ours.shape))
    assert_close(layer(torch.tensor(recorded["x_infer"]), training=False), recorded["y_infer"], torch.float32)
    assert_close(layer(torch.tensor(recorded["x_train"]), training=True), recorded["y_train"], torch.float32)
    for ours, theirs in zip(layer.get_weights(), _arrays(recorded["weights_after"]), strict=True):
        assert_close(ours, theirs.reshape(ours.shape), torch.float32)


@pytest.mark.parametrize("dtype", [None, "bfloat16", "float64"])
def test_set_weights_takes_another_layers_weights(dtype):
    """Keras' set_weights takes variables as well as arrays (``b.set_weights(a.weights)``); here ``a.weights`` are
    parameters that require grad (and bfloat16 tensors, which NumPy cannot read), which failed with torch's "Can't
    call numpy() on Tensor that requires grad". The values are copied exactly."""
    recorded = DATA["renorm"]
    source = from_keras_config({**recorded["config"], "dtype": dtype}, recorded["build_config"],
                               _arrays(recorded["weights"]))
    target = from_keras_config({**recorded["config"], "dtype": dtype}, recorded["build_config"])
    assert any(w.requires_grad for w in source.weights)
    target.set_weights(source.weights)
    for ours, theirs in zip(target.get_weights(), source.get_weights(), strict=True):
        np.testing.assert_array_equal(np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64))


@pytest.mark.parametrize("convert, dtype", [(lambda m: m.double(), torch.float64), (lambda m: m.half(), torch.float16),
                                            (lambda m: m.to(torch.bfloat16), torch.bfloat16)],
                         ids=["double", "half", "to_bfloat16"])
@pytest.mark.parametrize("name", ["channels_first_conv", "defaults_dense", "mixed_float16"])
def test_a_ported_model_converted_by_torch_computes_in_the_new_dtype(name, convert, dtype):
    """Every layer ported from Keras carries the policy Keras wrote ("float32", "mixed_float16"): a torch model
    holding one, converted with .double() or .half(), got float64/float16 weights in that layer but its outputs in
    the old policy's dtype, so the next layer refused them ("mat1 and mat2 must have the same dtype"). The torch
    conversion sets the layer's dtype, as it does for torch.nn's layers: the policy follows the variables' new
    dtype. Oracle: the inference formula in NumPy float64 on the recorded weights, rounded to the new dtype."""
    recorded = DATA[name]
    layer = from_keras_config(recorded["config"], recorded["build_config"], _arrays(recorded["weights"]))
    features = recorded["build_config"]["input_shape"][layer.bn.axis]
    model = convert(torch.nn.Sequential(layer, torch.nn.Flatten(), torch.nn.LazyLinear(2)))
    x = torch.tensor(recorded["x_infer"]).to(dtype)
    assert model(x).dtype == dtype  # (refused by the Linear before: the layer's output kept the old dtype)
    y = layer(x, training=False)
    assert y.dtype == dtype and layer.gamma.dtype == dtype
    assert layer.dtype_policy == str(dtype).replace("torch.", "")
    weights = [np.asarray(w, dtype=np.float64) for w in layer.get_weights()]  # (the weights rounded to the dtype)
    gamma, beta, mean, var = weights
    shape = [1] * x.dim()
    shape[layer.bn.axis] = features
    values = x.double().numpy()
    expected = (values - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + layer.epsilon) * gamma.reshape(shape) \
        + beta.reshape(shape)
    tolerance = {torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    np.testing.assert_allclose(y.double().detach().numpy(), expected, rtol=tolerance, atol=tolerance)


# Keras' BatchNormalization takes every Layer's activity_regularizer and its get_config() writes it, in this form.
_KERAS_ACTIVITY_L2 = {"module": "keras.regularizers", "class_name": "L2", "config": {"l2": 0.01}, "registered_name": None}


def test_an_activity_regularizer_ports_and_adds_keras_term_of_each_call():
    """A Keras layer with activity_regularizer (a Layer argument, in its config) could not be ported at all: from_config,
    from_keras and load_batch_norms refused the whole model ("not BatchNormalization arguments"). Keras adds
    regularizer(output) / batch size to layer.losses at each call (before the weights' terms, in any mode, frozen
    too). Oracle: that term computed in NumPy float64 from the layer's output."""
    recorded = DATA["defaults_dense"]
    config = {**recorded["config"], "activity_regularizer": _KERAS_ACTIVITY_L2, "gamma_regularizer": "l1"}
    layer = from_keras_config(config, recorded["build_config"], _arrays(recorded["weights"]))
    x = torch.tensor(recorded["x_train"])
    for trainable in (True, False):
        layer.trainable = trainable
        y = layer(x, training=True).detach().double().numpy()
        expected = [0.01 * np.square(y).sum() / x.shape[0]]
        if trainable:
            expected.append(0.01 * np.abs(layer.get_weights()[0].astype(np.float64)).sum())
        losses = layer.losses
        assert len(losses) == len(expected)
        for ours, theirs in zip(losses, expected):
            assert_close(ours, theirs, torch.float32)
        assert_close(normkit.regularization_loss(torch.nn.Sequential(layer)), sum(expected), torch.float32)
    assert layer.keras_config()["activity_regularizer"] == _KERAS_ACTIVITY_L2
    assert BatchNormalization.from_config(layer.get_config()).activity_regularizer == _KERAS_ACTIVITY_L2
    assert "activity_regularizer" not in BatchNormalization().keras_config()  # (Keras writes it only when set)


def test_an_activity_regularizer_matches_the_real_keras(tmp_path):
    """With Keras installed: the same losses as Keras' layer after a call, written back by to_keras, and read from a
    saved model by load_batch_norms (every BN layer of such a model was refused)."""
    keras = _keras_on_torch()
    theirs = keras.layers.BatchNormalization(activity_regularizer=keras.regularizers.L1L2(0.1, 0.2),
                                             gamma_regularizer="l2", name="bn_activity")
    x = np.asarray(DATA["defaults_dense"]["x_train"], dtype=np.float32)
    theirs.build(x.shape)
    ours = from_keras(theirs)
    theirs(x, training=True)
    expected = [keras.ops.convert_to_numpy(loss) for loss in theirs.losses]
    ours(torch.tensor(x), training=True)
    assert len(ours.losses) == len(expected) == 2
    for mine, theirs_loss in zip(ours.losses, expected):
        assert_close(mine, theirs_loss, torch.float32)
    assert to_keras(ours).get_config()["activity_regularizer"] == theirs.get_config()["activity_regularizer"]
    inputs = keras.Input(x.shape[1:])
    keras.Model(inputs, theirs(inputs)).save(tmp_path / "activity.keras")
    loaded = normkit.keras.load_batch_norms(tmp_path / "activity.keras")["bn_activity"]
    loaded(torch.tensor(x), training=True)
    for mine, theirs_loss in zip(loaded.losses, expected):
        assert_close(mine, theirs_loss, torch.float32)


def _keras_like_class(name, module="keras.src.layers.normalization.batch_normalization"):
    """A class standing for one of Keras' own (named and placed as Keras' are), for the checks of from_keras without
    Keras: it answers with a recorded layer."""
    return type(name, (_RecordedLayer,), {"__module__": module, "call": lambda self, inputs, training=None: inputs})


def test_from_keras_refuses_a_subclass_that_computes_otherwise():
    """A Keras BatchNormalization subclass overriding call (BN then an activation, as model zoos write) was ported as a
    plain BatchNormalization, silently computing something else (1.26 off on a relu'd N(0, 1) batch). Refused, naming
    the class and what it overrides; a subclass that overrides nothing of the computation still ports."""
    recorded = dict(TF_DATA["__built_by_build__"][sorted(TF_DATA["__built_by_build__"])[0]])
    keras_bn = _keras_like_class("BatchNormalization")
    fused_activation = type("BatchNormRelu", (keras_bn,), {"call": lambda self, inputs, training=None: inputs})
    with pytest.raises(ValueError, match=r"BatchNormRelu.*overrides call"):
        from_keras(fused_activation(recorded))
    renamed = type("RegisteredBatchNorm", (keras_bn,), {"__init__": keras_bn.__init__})
    assert from_keras(renamed(recorded)).built
    other = _keras_like_class("UnitNormalization", "keras.src.layers.normalization.unit_normalization")
    with pytest.raises(TypeError, match="expects a Keras BatchNormalization layer, got UnitNormalization"):
        from_keras(other(recorded))  # (it said this built layer gave no input shape)


def test_from_keras_refuses_a_real_keras_subclass_that_computes_otherwise():
    """With Keras installed: the subclass's own output is not what its port would compute, so it is refused."""
    keras = _keras_on_torch()

    class BatchNormRelu(keras.layers.BatchNormalization):
        def call(self, inputs, training=None, mask=None):
            return keras.ops.relu(super().call(inputs, training=training, mask=mask))

    theirs = BatchNormRelu()
    x = np.asarray(DATA["defaults_dense"]["x_infer"], dtype=np.float32)
    theirs.build(x.shape)
    plain = from_keras(keras.layers.BatchNormalization.from_config(theirs.get_config()))
    assert not np.allclose(keras.ops.convert_to_numpy(theirs(x)), plain(torch.tensor(x), training=False).detach())
    with pytest.raises(ValueError, match=r"BatchNormRelu.*overrides call"):
        from_keras(theirs)
    with pytest.raises(TypeError, match="got UnitNormalization"):
        from_keras(keras.layers.UnitNormalization())


def test_an_activity_regularizer_inside_vmap_leaves_no_escaped_tensor():
    """A call under torch.func.vmap recorded its batched term on the layer: layer.losses then held a BatchedTensor and
    normkit.regularization_loss raised functorch's "escaped from inside a function being vmapped". Inside a transform
    nothing is recorded; the weights' terms stay (oracle: 0.01 * sum(gamma^2) in NumPy)."""
    layer = BatchNormalization(activity_regularizer="l2", gamma_regularizer="l2")
    layer(torch.randn(4, 3), training=True)
    layer.eval()
    torch.func.vmap(lambda x: layer(x, training=False))(torch.randn(5, 2, 3))
    gamma = layer.get_weights()[0].astype(np.float64)
    assert len(layer.losses) == 1
    assert_close(normkit.regularization_loss(layer), 0.01 * np.square(gamma).sum(), torch.float32)


def test_from_keras_of_a_frozen_tf_keras_v1_layer_says_how_it_differs():
    """tf.keras' V1 class (tf.compat.v1.keras.layers.BatchNormalization, _USE_V2_BEHAVIOR = False: the spec's section
    2) normalizes a frozen layer's training calls by the batch's statistics; its port is frozen as Keras 2/3's layer,
    which from_keras did not say. A frozen V1 layer warns (as load_batch_norms does for the class name); a V2 one not."""
    recorded = dict(TF_DATA["__built_by_build__"][sorted(TF_DATA["__built_by_build__"])[0]])
    recorded["config"] = {**recorded["config"], "trainable": False}
    v1 = type("BatchNormalization", (_keras_like_class("BatchNormalization", "tf_keras.src.layers.normalization."
                                                        "batch_normalization_v1"),),
              {"_USE_V2_BEHAVIOR": False, "trainable": False, "__module__": "tf_keras.src.layers.normalization."
                                                                             "batch_normalization_v1"})
    with pytest.warns(UserWarning, match="V1 class"):
        assert not from_keras(v1(recorded)).trainable
    v2 = type("BatchNormalization", (v1,), {"_USE_V2_BEHAVIOR": True, "__module__": "tf_keras.src.layers."
                                                                               "normalization.batch_normalization"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_keras(v2(recorded))


@pytest.mark.parametrize("convert", [lambda m: m.double(), lambda m: m.half(), lambda m: m.to(torch.bfloat16)],
                         ids=["double", "half", "to_bfloat16"])
def test_keras_config_of_an_unbuilt_converted_layer_names_the_dtype_it_builds(convert):
    """An unbuilt layer converted by .double() builds float64 weights, but its keras_config() said "float32" (the
    default dtype), so to_keras made a float32 Keras layer of it, and its get_config() said nothing (from_config made
    a float32 layer of a built one too). Oracle: the same layer's config once built, and its weights' dtype."""
    layer = convert(BatchNormalization(name="converted"))
    before = layer.keras_config()
    layer.build((None, 3))
    assert before == layer.keras_config()
    assert before["dtype"]["config"]["name"] == str(layer.gamma.dtype).replace("torch.", "")
    again = BatchNormalization.from_config(layer.get_config())  # (and get_config: its from_config built float32)
    again.build((None, 3))
    assert again.gamma.dtype == layer.gamma.dtype
