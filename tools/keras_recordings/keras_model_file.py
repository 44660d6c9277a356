#!/usr/bin/env python
"""Record a real Keras 3 model saved as a .keras file, and what its BatchNormalization layers compute, for tests/test_keras_files.py.

``normkit.keras.load_batch_norms("model.keras")`` reads the BN layers of a saved Keras model
without Keras; the tests check it against what Keras itself computed. Run where Keras 3 is
installed (torch backend):

    python -m venv /tmp/kvenv && /tmp/kvenv/bin/pip install torch==2.13.0 keras numpy h5py
    KERAS_BACKEND=torch /tmp/kvenv/bin/python tools/keras_recordings/keras_model_file.py

Writes tests/data/keras_bn_model.keras (Keras' own ``model.save``), keras_bn_model_bfloat16.keras (one
layer with the bfloat16 policy: ``bn_bf16``, weights and inference only) and tests/data/keras_bn_model.npz:
for every BN layer (key prefix = its path, e.g. ``block/bn_inner``), ``weights_<i>`` as
``get_weights()`` returns them after training; ``x`` (a seeded input of the layer's input shape);
``y_infer`` (Keras' inference output on ``x``); ``y_train`` and ``after_<i>`` (a training call on
``x`` and the weights after it). The model: a conv block with a channels-last BN, a dense BN
with renorm and clipping, and a nested Sequential whose BN has no gamma, a regularizer and a
constraint; trained for a few steps so the moving statistics are not their initial values.
"""

from __future__ import annotations

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "data", "keras_bn_model")


def build_model(keras):
    layers = keras.layers
    inputs = keras.Input((6, 6, 3), name="image")
    x = layers.Conv2D(4, 3, name="conv")(inputs)
    x = layers.BatchNormalization(name="bn_conv")(x)
    x = layers.ReLU()(x)
    x = layers.Flatten()(x)
    x = layers.Dense(5, name="dense")(x)
    x = layers.BatchNormalization(name="bn_renorm", center=False, momentum=0.9, epsilon=1e-4, renorm=True,
                                  renorm_clipping={"rmax": 3.0, "rmin": 1 / 3, "dmax": 5.0}, renorm_momentum=0.9)(x)
    block = keras.Sequential([layers.Dense(4, name="dense_inner"),
                              layers.BatchNormalization(name="bn_inner", scale=False, momentum=0.8,
                                                        beta_regularizer="l2", beta_constraint="non_neg")],
                             name="block")
    outputs = block(x)
    return keras.Model(inputs, outputs, name="ported")


def batch_norm_layers(model, prefix=""):
    """(path, layer) for every BatchNormalization, nested models included, in the model's order."""
    for layer in model.layers:
        path = prefix + layer.name
        if type(layer).__name__ == "BatchNormalization":
            yield path, layer
        elif hasattr(layer, "layers"):
            yield from batch_norm_layers(layer, path + "/")


def main() -> int:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError as error:  # (this records the real Keras; the tests never need it)
        sys.exit(f"tools/keras_recordings/keras_model_file.py saves a real Keras 3 model and needs Keras ({error}); run it in a venv "
                 "that has it: python -m venv /tmp/kvenv && /tmp/kvenv/bin/pip install torch==2.13.0 keras numpy h5py")

    keras.utils.set_random_seed(0)
    model = build_model(keras)
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(64, 6, 6, 3)).astype("float32") * 2 + 1, rng.normal(size=(64, 4)).astype("float32"),
              batch_size=16, epochs=2, verbose=0)
    model.save(OUT + ".keras")
    arrays = {}
    for path, layer in batch_norm_layers(model):
        shape = (6,) + tuple(layer.get_build_config()["input_shape"][1:])
        x = (rng.normal(size=shape) * 1.5 + 0.5).astype("float32")
        for index, weight in enumerate(layer.get_weights()):
            arrays[f"{path}/weights_{index}"] = weight
        arrays[f"{path}/x"] = x
        arrays[f"{path}/y_infer"] = keras.ops.convert_to_numpy(layer(x, training=False))
        arrays[f"{path}/y_train"] = keras.ops.convert_to_numpy(layer(x, training=True))
        for index, weight in enumerate(layer.get_weights()):
            arrays[f"{path}/after_{index}"] = weight
    # A bfloat16 layer: Keras writes its variables as raw 2-byte values (HDF5 has no bfloat16).
    keras.utils.set_random_seed(1)
    half = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(name="bn_bf16", dtype="bfloat16",
                                                                                momentum=0.5)], name="half")
    half.compile(optimizer="sgd", loss="mse")
    half.fit(rng.normal(size=(32, 4)).astype("float32") * 3 + 1, rng.normal(size=(32, 4)).astype("float32"),
             batch_size=8, epochs=1, verbose=0)
    half.save(OUT + "_bfloat16.keras")
    layer = half.get_layer("bn_bf16")
    x = (rng.normal(size=(6, 4)) * 2 + 1).astype("float32")
    for index, weight in enumerate(layer.get_weights()):
        arrays[f"bn_bf16/weights_{index}"] = np.asarray(weight, dtype=np.float32)  # (exact: bfloat16 in float32)
    arrays["bn_bf16/x"] = x
    arrays["bn_bf16/y_infer"] = np.asarray(keras.ops.convert_to_numpy(layer(x, training=False)), dtype=np.float32)
    np.savez_compressed(OUT + ".npz", **arrays)
    print(f"wrote {OUT}.keras, {OUT}_bfloat16.keras and {OUT}.npz: {', '.join(path for path, _ in batch_norm_layers(model))}"
          f" (keras {keras.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
