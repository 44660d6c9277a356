#!/usr/bin/env python
"""Record a real Keras 3 model with BatchNormalization layers two models deep and inside TimeDistributed.

For tests/test_keras_files.py: ``load_batch_norms`` names a layer by its path through the nested models
(``outer/inner/bn_deep``) and through a wrapper (``steps/bn_steps``); the model of tools/keras_recordings/keras_model_file.py
nests one level only. Run where Keras 3 is installed (torch backend):

    KERAS_BACKEND=torch /tmp/kvenv/bin/python tools/keras_recordings/keras_nested_model_file.py

Writes tests/data/keras_bn_nested.keras (Keras' own ``model.save`` of a model trained a few steps) and
tests/data/keras_bn_nested.npz: for every BN layer (key prefix = its path), ``weights_<i>`` as
``get_weights()`` returns them, ``x`` (a seeded input) and ``y_infer`` (Keras' inference output on ``x``); for
the TimeDistributed one, ``x`` is a (batch, time, features) sequence, the outputs are the wrapper's, and
``y_train`` (its training-mode output: Keras 3 calls the layer once per time step) and ``after_<i>`` (the
weights after that call) are recorded too.

It also writes tests/data/keras_bn_shared.keras and .npz: one BN layer object in two places (in a nested Sequential
and called again in the outer model; wrapped in TimeDistributed and called directly), whose weights Keras writes
once, at the first place. For each path, ``weights_<i>``; for each layer once, ``x``, ``y_infer``, ``y_train`` and
``after_<i>`` (a training call, then the weights: both paths are one layer).
"""

from __future__ import annotations

import os
import sys

import numpy as np

from keras_model_file import batch_norm_layers  # (this folder is on sys.path when the script runs)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "data", "keras_bn_nested")


def build_model(keras):
    layers = keras.layers
    inner = keras.Sequential([layers.Dense(4, name="dense_deep"),
                              layers.BatchNormalization(name="bn_deep", momentum=0.5, epsilon=0.01)], name="inner")
    outer = keras.Sequential([layers.Dense(4, name="dense_mid"), inner,
                              layers.BatchNormalization(name="bn_mid", momentum=0.6, center=False)], name="outer")
    inputs = keras.Input((3,), name="features")
    top = layers.BatchNormalization(name="bn_top", momentum=0.7)(outer(inputs))
    # The wrapped BN sees (N * 2, 2) rows; its axis 1 is axis 2 of the (N, 2, 2) sequence.
    steps = layers.TimeDistributed(layers.BatchNormalization(name="bn_steps", axis=1, momentum=0.8), name="steps")
    return keras.Model(inputs, steps(layers.Reshape((2, 2), name="as_steps")(top)), name="nested")


def build_shared_model(keras):
    layers = keras.layers
    shared = layers.BatchNormalization(name="bn_shared", momentum=0.5)
    inner = keras.Sequential([keras.Input((4,)), layers.Dense(4, name="dense_in"), shared], name="inner")
    stepped = layers.BatchNormalization(name="bn_both", momentum=0.7)
    flat, sequence = keras.Input((4,), name="flat"), keras.Input((3, 4), name="sequence")
    steps = layers.TimeDistributed(stepped, name="steps")(sequence)  # first: Keras writes its weights here
    outputs = [inner(flat), shared(flat), stepped(flat), layers.Flatten()(steps)]
    return keras.Model([flat, sequence], layers.Concatenate()(outputs), name="shared")


def record_shared(keras, rng) -> list:
    keras.utils.set_random_seed(2)
    model = build_shared_model(keras)
    model.compile(optimizer="sgd", loss="mse")
    model.fit([rng.normal(size=(32, 4)).astype("float32") * 2 + 1, rng.normal(size=(32, 3, 4)).astype("float32") - 1],
              rng.normal(size=(32, 24)).astype("float32"), batch_size=8, epochs=1, verbose=0)
    out = OUT.replace("keras_bn_nested", "keras_bn_shared")
    model.save(out + ".keras")
    arrays, done = {}, set()
    found = list(batch_norm_layers(model)) + [(path, wrapper.layer) for path, wrapper in wrapped_batch_norm_layers(model)]
    for path, layer in found:
        for index, weight in enumerate(layer.get_weights()):
            arrays[f"{path}/weights_{index}"] = weight
    for path, layer in found:
        if id(layer) in done:
            continue
        done.add(id(layer))
        x = (rng.normal(size=(5, 4)) * 1.5 + 0.5).astype("float32")
        arrays[f"{path}/x"] = x
        arrays[f"{path}/y_infer"] = keras.ops.convert_to_numpy(layer(x, training=False))
        arrays[f"{path}/y_train"] = keras.ops.convert_to_numpy(layer(x, training=True))
        for index, weight in enumerate(layer.get_weights()):
            arrays[f"{path}/after_{index}"] = weight
    np.savez_compressed(out + ".npz", **arrays)
    return [path for path, _ in found]


def wrapped_batch_norm_layers(model):
    """(path, wrapper) for every TimeDistributed(BatchNormalization) at the model's top level."""
    for layer in model.layers:
        if type(layer).__name__ == "TimeDistributed" and type(layer.layer).__name__ == "BatchNormalization":
            yield f"{layer.name}/{layer.layer.name}", layer


def trained_and_saved(keras, build_model, paths, x_shape=(3,), y_shape=(2, 2)):
    """``build_model(keras)`` trained one epoch of SGD on seeded (32, *x_shape) -> (32, *y_shape) data, so every BN's
    moving statistics move, and saved by Keras' ``model.save`` to each of ``paths`` (one path, or several: one model
    in several formats); returns the model and the seeded generator, for the inputs recorded next. ``keras`` is
    Keras 3 or TensorFlow's tf.keras 2 (the same calls in both)."""
    keras.utils.set_random_seed(0)
    model = build_model(keras)
    rng = np.random.default_rng(0)
    model.compile(optimizer="sgd", loss="mse")
    model.fit(rng.normal(size=(32, *x_shape)).astype("float32") * 2 + 1,
              rng.normal(size=(32, *y_shape)).astype("float32"), batch_size=8, epochs=1, verbose=0)
    for path in [paths] if isinstance(paths, str) else paths:
        model.save(path)
    return model, rng


def to_numpy(keras, value):
    """A layer's output as a NumPy array: Keras 3's ``keras.ops.convert_to_numpy``; tf.keras 2 (no ``ops``) gives
    eager tensors, which NumPy reads."""
    ops = getattr(keras, "ops", None)
    return ops.convert_to_numpy(value) if ops is not None else np.asarray(value)


def inference_record(keras, path: str, layer, caller, x) -> dict:
    """``layer``'s weights as ``get_weights()`` returns them, the input ``x`` (float32) and ``caller``'s inference
    output on it (``caller`` is the layer, or the wrapper around it), under keys prefixed by ``path``."""
    x = np.asarray(x, dtype="float32")
    arrays = {f"{path}/weights_{index}": weight for index, weight in enumerate(layer.get_weights())}
    arrays[f"{path}/x"] = x
    arrays[f"{path}/y_infer"] = to_numpy(keras, caller(x, training=False))
    return arrays


def main() -> int:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError as error:  # (this records the real Keras; the tests never need it)
        sys.exit(f"tools/keras_recordings/keras_nested_model_file.py saves a real Keras 3 model and needs Keras ({error})")
    model, rng = trained_and_saved(keras, build_model, OUT + ".keras")
    arrays = {}
    for path, layer in batch_norm_layers(model):
        arrays.update(inference_record(keras, path, layer, layer, (rng.normal(size=(5, 4)) * 1.5 + 0.5)))
    for path, wrapper in wrapped_batch_norm_layers(model):
        x = (rng.normal(size=(5, 3, 2)) * 1.5 + 0.5).astype("float32")
        arrays.update(inference_record(keras, path, wrapper.layer, wrapper, x))
        arrays[f"{path}/y_train"] = keras.ops.convert_to_numpy(wrapper(x, training=True))
        for index, weight in enumerate(wrapper.layer.get_weights()):
            arrays[f"{path}/after_{index}"] = weight
    np.savez_compressed(OUT + ".npz", **arrays)
    paths = [path for path, _ in batch_norm_layers(model)] + [path for path, _ in wrapped_batch_norm_layers(model)]
    print(f"wrote {OUT}.keras and {OUT}.npz: {', '.join(paths)} (keras {keras.__version__})")
    print(f"wrote keras_bn_shared.keras and .npz: {', '.join(record_shared(keras, rng))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
