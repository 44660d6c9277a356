#!/usr/bin/env python
"""Record models saved in Keras' older formats (legacy HDF5, tf.keras 2's .keras archive) for load_batch_norms' tests.

Users porting old Keras models mostly have these files: ``model.save("x.h5")`` of tf.keras 2 (TensorFlow's bundled
Keras) or of Keras 3's legacy HDF5 writer, and ``model.save("x.keras")`` of tf.keras 2.13-2.15, whose weights file is
laid out by path rather than by layer name. Run it twice, once per Keras:

    KERAS_BACKEND=torch /work/k3venv/bin/python tools/keras_recordings/keras_legacy_model_files.py            # Keras 3 (3.15.1)
    /work/tfvenv/bin/python tools/keras_recordings/keras_legacy_model_files.py --tf-keras                      # TensorFlow 2.15

Keras 3 writes tests/data/keras3_bn_legacy.h5 and .npz. tf.keras writes tests/data/tfkeras_bn_legacy.h5 (legacy
HDF5 model), tfkeras_bn_model.keras (its .keras archive) and tfkeras_bn_weights.h5 (``model.save_weights``: no
config), one trained model saved three ways, and tfkeras_bn_legacy.npz. Each model has a channels-last conv BN (the
fused kernel in tf.keras), dense BNs with renorm and clipping, with scale=False and with neither center nor scale,
BNs two models deep (outer/inner/bn_deep), one in TimeDistributed (steps/bn_steps) and, in tf.keras only, a ghost-batch BN (virtual_batch_size) and one
over a list of axes. For every BN layer (key prefix = its path): ``weights_<i>`` as ``get_weights()`` returns
them, ``x`` (a seeded input), ``y_infer`` and ``y_train`` (the layer's inference and training outputs on ``x``) and
``after_<i>`` (the weights after that training call); ``<path>/fused`` is 1 where tf.keras ran its fused kernel.
For the TimeDistributed one, ``weights_<i>``, ``x`` (a (batch, time, features) sequence) and ``y_infer`` (the
wrapper's inference output) only.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

import needs  # (this folder is on sys.path when a script runs)
from keras_model_file import batch_norm_layers  # (this folder is on sys.path when the script runs)
from keras_nested_model_file import inference_record, to_numpy, trained_and_saved, wrapped_batch_norm_layers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "tests", "data")


def build_model(keras, tf_keras: bool):
    """(N, 6, 6, 3) images -> (N, 4): a BN of each kind the loader must read; the tf.keras-only options where
    tf.keras is the Keras recorded."""
    layers = keras.layers
    inputs = keras.Input((6, 6, 3), name="images")
    h = layers.BatchNormalization(name="bn_conv", momentum=0.5)(layers.Conv2D(4, 3, name="conv")(inputs))
    if tf_keras:  # (Keras 3 refuses a list axis and has no virtual_batch_size)
        h = layers.BatchNormalization(name="bn_axes", axis=[2, 3], momentum=0.6)(h)
    h = layers.Dense(4, name="dense")(layers.GlobalAveragePooling2D(name="pool")(h))
    if tf_keras:
        h = layers.BatchNormalization(name="bn_ghost", virtual_batch_size=4, momentum=0.7)(h)
    h = layers.BatchNormalization(name="bn_renorm", momentum=0.6, renorm=True, renorm_momentum=0.8,
                                  renorm_clipping={"rmax": 1.5, "rmin": 0.5, "dmax": 0.5})(h)
    h = layers.BatchNormalization(name="bn_bare", momentum=0.7, center=False, scale=False, epsilon=0.01)(h)
    # (tf.keras names a wrapped layer's weights by the wrapper's path, steps/gamma:0, not the layer's)
    steps = layers.TimeDistributed(layers.BatchNormalization(name="bn_steps", momentum=0.9), name="steps")
    h = layers.Flatten(name="flat")(steps(layers.Reshape((2, 2), name="as_steps")(h)))
    inner = keras.Sequential([layers.Dense(4, name="dense_deep"),
                              layers.BatchNormalization(name="bn_deep", momentum=0.5, scale=False)], name="inner")
    outer = keras.Sequential([layers.Dense(4, name="dense_mid"), inner,
                              layers.BatchNormalization(name="bn_mid", momentum=0.8)], name="outer")
    return keras.Model(inputs, outer(h), name="legacy")


def record(keras, model, rng) -> dict:
    arrays = {}
    for path, layer in batch_norm_layers(model):
        shape = (8,) + tuple(layer.get_build_config()["input_shape"][1:])  # (8: two ghost batches of 4)
        x = (rng.normal(size=shape) * 1.5 + 0.5).astype("float32")
        arrays.update(inference_record(keras, path, layer, layer, x))
        arrays[f"{path}/fused"] = np.array(int(bool(getattr(layer, "fused", False))))
        arrays[f"{path}/y_train"] = to_numpy(keras, layer(x, training=True))
        for index, weight in enumerate(layer.get_weights()):
            arrays[f"{path}/after_{index}"] = weight
    for path, wrapper in wrapped_batch_norm_layers(model):  # (inference only: the Kerases' wrappers train otherwise)
        arrays.update(inference_record(keras, path, wrapper.layer, wrapper, rng.normal(size=(8, 2, 2)) * 1.5 + 0.5))
    return arrays


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tf-keras", action="store_true", help="record TensorFlow's tf.keras 2 (2.13-2.15)")
    args = parser.parse_args(argv)
    if args.tf_keras:
        tf = needs.tensorflow("keras_legacy_model_files.py --tf-keras")
        keras, version = tf.keras, f"tf.keras (tensorflow {tf.__version__})"
        if not (2, 13) <= tuple(int(part) for part in tf.__version__.split(".")[:2]) < (2, 16):
            sys.exit(f"tools/keras_recordings/keras_legacy_model_files.py --tf-keras needs TensorFlow 2.13-2.15 (its bundled Keras 2 "
                     f"writes the .keras layout recorded here); this is {tf.__version__}")
        out = os.path.join(DATA, "tfkeras_bn_legacy")
        paths = [os.path.join(DATA, "tfkeras_bn_model.keras")]
    else:
        os.environ.setdefault("KERAS_BACKEND", "torch")
        try:
            import keras
        except ImportError as error:
            sys.exit(f"tools/keras_recordings/keras_legacy_model_files.py needs Keras 3 ({error}), or TensorFlow 2.13-2.15 with "
                     "--tf-keras")
        version = f"keras {keras.__version__}"
        out = os.path.join(DATA, "keras3_bn_legacy")
        paths = []
    model, rng = trained_and_saved(keras, lambda k: build_model(k, args.tf_keras), paths, x_shape=(6, 6, 3),
                                   y_shape=(4,))
    # Legacy HDF5 without the optimizer's slots (a third of the file's objects; load_batch_norms never reads them):
    # the files stay small. The .keras format takes no such option.
    paths.append(out + ".h5")
    model.save(paths[-1], include_optimizer=False)
    if args.tf_keras:
        model.save_weights(os.path.join(DATA, "tfkeras_bn_weights.h5"))  # (legacy HDF5 weights: no config inside)
    arrays = record(keras, model, rng)
    np.savez_compressed(out + ".npz", **arrays)
    print(f"wrote {', '.join(os.path.basename(p) for p in paths)} and {os.path.basename(out)}.npz: "
          f"{', '.join(path for path, _ in [*batch_norm_layers(model), *wrapped_batch_norm_layers(model)])} ({version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
