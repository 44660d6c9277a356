#!/usr/bin/env python
"""Record a model saved by Keras 3.0-3.5, whose weights file names no layer, for load_batch_norms' tests.

Keras 3.6 and later write each layer's name on its weights group (``layers/<key>/vars`` attribute ``name``);
Keras 3.0-3.5 do not: a layer's weights are found only by their path, which Keras builds from the class names
in the model's order (``batch_normalization``, ``batch_normalization_1``, ..., and ``sequential``/``functional``
for nested models, ``time_distributed/layer`` for a wrapper). Run with such a Keras (torch backend), e.g.

    /tmp/kvenv/bin/pip install keras==3.5.0
    KERAS_BACKEND=torch /tmp/kvenv/bin/python tools/keras_recordings/keras_unnamed_weights_file.py

Writes tests/data/keras_bn_unnamed.keras (Keras' ``model.save`` of a model trained one epoch: three BN
layers at the top, whose names sort otherwise than their paths, one with neither center nor scale, one in a
nested Sequential, one in TimeDistributed) and tests/data/keras_bn_unnamed.npz: for every BN layer (key prefix =
its path), ``weights_<i>`` as ``get_weights()`` returns them, ``x`` (a seeded input) and ``y_infer`` (the layer's
inference output on ``x``; for the TimeDistributed one, the wrapper's on a (batch, time, features) sequence).
"""

from __future__ import annotations

import os
import sys

import numpy as np

from keras_model_file import batch_norm_layers  # (this folder is on sys.path when the script runs)
from keras_nested_model_file import inference_record, trained_and_saved, wrapped_batch_norm_layers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "data", "keras_bn_unnamed")


def build_model(keras):
    layers = keras.layers
    inner = keras.Sequential([layers.Dense(4, name="dense_in"),
                              layers.BatchNormalization(name="bn_inner", momentum=0.6, scale=False)], name="block")
    inputs = keras.Input((3,), name="features")
    # Names in another order than Keras' paths (batch_normalization, _1, _2): a name-blind reader must count.
    h = layers.BatchNormalization(name="zz_first", momentum=0.5)(inputs)
    h = layers.BatchNormalization(name="aa_second", momentum=0.7, center=False, scale=False)(layers.Dense(4)(h))
    h = layers.BatchNormalization(name="mm_third", momentum=0.8, epsilon=0.01)(inner(h))
    steps = layers.TimeDistributed(layers.BatchNormalization(name="bn_steps", momentum=0.9), name="steps")
    return keras.Model(inputs, steps(layers.Reshape((2, 2), name="as_steps")(h)), name="unnamed")


def main() -> int:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError as error:  # (this records the real Keras; the tests never need it)
        sys.exit(f"tools/keras_recordings/keras_unnamed_weights_file.py saves a real Keras 3 model and needs Keras ({error})")
    if tuple(int(part) for part in keras.__version__.split(".")[:2]) >= (3, 6):
        sys.exit(f"tools/keras_recordings/keras_unnamed_weights_file.py needs Keras 3.0-3.5 (these name no layer in the weights "
                 f"file); this is Keras {keras.__version__}: pip install keras==3.5.0")
    model, rng = trained_and_saved(keras, build_model, OUT + ".keras")
    arrays = {}
    for path, layer in batch_norm_layers(model):
        x = (rng.normal(size=(5, 4)) * 1.5 + 0.5).astype("float32")
        arrays.update(inference_record(keras, path, layer, layer, x[:, :3] if path == "zz_first" else x))
    for path, wrapper in wrapped_batch_norm_layers(model):
        arrays.update(inference_record(keras, path, wrapper.layer, wrapper, rng.normal(size=(5, 2, 2)) * 1.5 + 0.5))
    np.savez_compressed(OUT + ".npz", **arrays)
    paths = [path for path, _ in batch_norm_layers(model)] + [path for path, _ in wrapped_batch_norm_layers(model)]
    print(f"wrote {OUT}.keras and {OUT}.npz: {', '.join(paths)} (keras {keras.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
