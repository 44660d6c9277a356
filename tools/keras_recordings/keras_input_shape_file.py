#!/usr/bin/env python
"""Record a tf.keras 2 Sequential model whose first BatchNormalization was given ``input_shape=``, saved as .h5 and .keras.

tf.keras writes such a layer's input shape into the layer's own config (``"batch_input_shape": [null, 5]``), the
most common way old Sequential models were written; load_batch_norms refused the key as "not a BatchNormalization
argument". Run with TensorFlow 2.13-2.15:

    /work/tfvenv/bin/python tools/keras_recordings/keras_input_shape_file.py

Writes tests/data/tfkeras_bn_input_shape.h5 (legacy HDF5, no optimizer), tfkeras_bn_input_shape.keras and
tfkeras_bn_input_shape.npz: for every BN layer (key prefix = its name) ``weights_<i>``, ``x``, ``y_infer``,
``y_train`` and ``after_<i>`` (the weights after that training call), as tools/keras_recordings/keras_legacy_model_files.py records.
"""

from __future__ import annotations

import os
import sys

import numpy as np

import needs  # (this folder is on sys.path when a script runs)
from keras_model_file import batch_norm_layers  # (this folder is on sys.path when the script runs)
from keras_nested_model_file import inference_record, to_numpy, trained_and_saved

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "data", "tfkeras_bn_input_shape")


def build_model(keras):
    """(N, 5) -> (N, 3): the input shape given to the first layer, as tf.keras' Sequential models were written."""
    layers = keras.layers
    return keras.Sequential([layers.BatchNormalization(input_shape=(5,), name="bn_input", momentum=0.8),
                             layers.Dense(3, name="dense"),
                             layers.BatchNormalization(name="bn_after", center=False, momentum=0.7)], name="seq")


def main() -> int:
    tf = needs.tensorflow("keras_input_shape_file.py")
    keras = tf.keras
    model, rng = trained_and_saved(keras, build_model, [OUT + ".keras"], x_shape=(5,), y_shape=(3,))
    model.save(OUT + ".h5", include_optimizer=False)
    arrays = {}
    for path, layer in batch_norm_layers(model):
        x = (rng.normal(size=(8,) + tuple(layer.get_build_config()["input_shape"][1:])) * 1.5 + 0.5)
        arrays.update(inference_record(keras, path, layer, layer, x))
        arrays[f"{path}/y_train"] = to_numpy(keras, layer(arrays[f"{path}/x"], training=True))
        for index, weight in enumerate(layer.get_weights()):
            arrays[f"{path}/after_{index}"] = weight
    np.savez_compressed(OUT + ".npz", **arrays)
    print(f"wrote {os.path.basename(OUT)}.h5, .keras and .npz: {[p for p, _ in batch_norm_layers(model)]} "
          f"(tf.keras, tensorflow {tf.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
