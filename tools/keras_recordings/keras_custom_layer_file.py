#!/usr/bin/env python
"""Record a Keras 3 model whose BatchNormalization sits inside a custom layer, saved as .keras and as legacy .h5.

A custom layer's config holds its constructor's arguments, not its sublayers' options, so the BN inside cannot be
rebuilt from the file; load_batch_norms passed over it without a word (the model's other BN layers loaded, and this
one was simply missing). Run where Keras 3 is installed (torch backend):

    KERAS_BACKEND=torch /work/k3venv/bin/python tools/keras_recordings/keras_custom_layer_file.py

Writes tests/data/keras_bn_custom_layer.keras and keras_bn_custom_layer.h5: Input(4) -> Block (a registered custom
layer: Dense, then BatchNormalization) -> BatchNormalization "bn_top"; and keras_bn_plain_custom_layer.keras, a custom
layer holding a Dense only, then "bn_top". With ``--tf-keras`` (TensorFlow 2.13-2.15), tfkeras_bn_custom_layer.h5:
the same model in tf.keras, whose Block has no get_config (tf.keras then writes ``"config": {}``, the layer's name
only beside it, as a functional model's layers are named).

    /work/tfvenv/bin/python tools/keras_recordings/keras_custom_layer_file.py --tf-keras
"""

from __future__ import annotations

import os
import sys

import needs  # (this folder is on sys.path when a script runs)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "tests", "data")


def record_tf_keras() -> int:
    tf = needs.tensorflow("keras_custom_layer_file.py --tf-keras")
    keras = tf.keras

    @keras.utils.register_keras_serializable(package="recorded")
    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense, self.bn = keras.layers.Dense(3), keras.layers.BatchNormalization(momentum=0.5)

        def call(self, x, training=None):
            return self.bn(self.dense(x), training=training)

    keras.utils.set_random_seed(3)
    inputs = keras.Input((4,), name="features")
    model = keras.Model(inputs, keras.layers.BatchNormalization(name="bn_top")(Block(name="block")(inputs)))
    model.save(os.path.join(DATA, "tfkeras_bn_custom_layer.h5"), include_optimizer=False)
    print(f"wrote tfkeras_bn_custom_layer.h5 (tensorflow {tf.__version__})")
    return 0


def main() -> int:
    if "--tf-keras" in sys.argv[1:]:
        return record_tf_keras()
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError as error:  # (this records the real Keras; the tests never need it)
        sys.exit(f"tools/keras_recordings/keras_custom_layer_file.py needs Keras 3 ({error})")

    @keras.saving.register_keras_serializable(package="recorded")
    class Block(keras.layers.Layer):
        def __init__(self, units=3, normalize=True, **kwargs):
            super().__init__(**kwargs)
            self.units, self.normalize = units, normalize
            self.dense = keras.layers.Dense(units)
            self.bn = keras.layers.BatchNormalization(momentum=0.5) if normalize else None

        def call(self, x, training=None):
            h = self.dense(x)
            return self.bn(h, training=training) if self.bn is not None else h

        def get_config(self):
            return {**super().get_config(), "units": self.units, "normalize": self.normalize}

    keras.utils.set_random_seed(3)
    for normalize, names in ((True, ["keras_bn_custom_layer.keras", "keras_bn_custom_layer.h5"]),
                             (False, ["keras_bn_plain_custom_layer.keras"])):
        inputs = keras.Input((4,), name="features")
        outputs = keras.layers.BatchNormalization(name="bn_top")(Block(normalize=normalize, name="block")(inputs))
        model = keras.Model(inputs, outputs, name="custom")
        for name in names:
            model.save(os.path.join(DATA, name))
    print(f"wrote keras_bn_custom_layer.keras, .h5 and keras_bn_plain_custom_layer.keras (keras {keras.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
