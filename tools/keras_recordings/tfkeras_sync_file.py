#!/usr/bin/env python
"""Record a tf.keras 2 model with SyncBatchNormalization layers, saved as .h5 and .keras, for load_batch_norms' tests.

tf.keras 2.2-2.15 offered ``tf.keras.layers.experimental.SyncBatchNormalization`` (BatchNormalization with
``synchronized=True``: the models trained under MirroredStrategy); its layers are saved under that class name, which
load_batch_norms passed over without a word. Run with TensorFlow 2.13-2.15:

    /work/tfvenv/bin/python tools/keras_recordings/tfkeras_sync_file.py

Writes tests/data/tfkeras_bn_sync.h5 (legacy HDF5, no optimizer), tfkeras_bn_sync.keras and tfkeras_bn_sync.npz: for
every BN layer (key prefix = its name) ``weights_<i>``, ``x``, ``y_infer``, ``y_train`` and ``after_<i>``, as
tools/keras_recordings/keras_legacy_model_files.py records (outside any distribution strategy, so with local statistics).
"""

from __future__ import annotations

import os
import sys

import numpy as np

import needs  # (this folder is on sys.path when a script runs)
from keras_nested_model_file import inference_record, to_numpy, trained_and_saved  # (this folder is on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "data", "tfkeras_bn_sync")


def build_model(keras):
    """(N, 5) -> (N, 3) with a SyncBatchNormalization before and after a BatchNormalization (the path keys of the
    .keras layout count each class apart) and a channels-first one."""
    layers = keras.layers
    inputs = keras.Input((5,), name="features")
    h = layers.experimental.SyncBatchNormalization(name="sbn_first", momentum=0.8)(inputs)
    h = layers.BatchNormalization(name="bn_plain", momentum=0.7, scale=False)(layers.Dense(4, name="dense")(h))
    h = layers.Reshape((2, 2), name="steps")(h)
    h = layers.experimental.SyncBatchNormalization(name="sbn_axis1", axis=1, momentum=0.6, center=False)(h)
    return keras.Model(inputs, layers.Flatten(name="flat")(h), name="synced")


def main() -> int:
    tf = needs.tensorflow("tfkeras_sync_file.py")
    keras = tf.keras
    model, rng = trained_and_saved(keras, build_model, [OUT + ".keras"], x_shape=(5,), y_shape=(4,))
    model.save(OUT + ".h5", include_optimizer=False)
    arrays, names = {}, []
    for layer in model.layers:
        if "BatchNormalization" not in type(layer).__name__:
            continue
        names.append(layer.name)
        x = rng.normal(size=(8,) + tuple(layer.get_build_config()["input_shape"][1:])) * 1.5 + 0.5
        arrays.update(inference_record(keras, layer.name, layer, layer, x))
        arrays[f"{layer.name}/y_train"] = to_numpy(keras, layer(arrays[f"{layer.name}/x"], training=True))
        for index, weight in enumerate(layer.get_weights()):
            arrays[f"{layer.name}/after_{index}"] = weight
    np.savez_compressed(OUT + ".npz", **arrays)
    print(f"wrote {os.path.basename(OUT)}.h5, .keras and .npz: {names} (tf.keras, tensorflow {tf.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
