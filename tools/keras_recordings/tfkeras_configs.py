#!/usr/bin/env python
"""Record real tf.keras 2 BatchNormalization layers (config, build config, weights, outputs) into tests/data/tfkeras_configs.json.

from_keras_config (and from_keras) take a tf.keras layer's get_config(), get_build_config() and get_weights() as
they take Keras 3's; a built tf.keras layer writes its options in forms Keras 3 lacks: a ghost-batch layer
(virtual_batch_size) its axis shifted by one past the ghost dimension and its weights in the broadcast shape
(1, 1, C), a list axis its weights as (1, H, W). Run with TensorFlow 2.13-2.15:

    /work/tfvenv/bin/python tools/keras_recordings/tfkeras_configs.py

Per layer, as tools/keras_recordings/keras_configs.py records Keras 3's: ``config``, ``build_config``, ``weights`` (the layer's
after one seeded training call, so the moving statistics are not the initial ones), ``x_train``, ``y_train``,
``weights_after`` (after a second training call on ``x_train``), ``x_infer``, ``y_infer``. Arrays are nested lists.

Under ``__built_by_build__``, layers built by ``layer.build(shape)`` rather than a call: tf.keras records no build
config then (``get_build_config()`` is None) but its ``input_spec`` (``ndim``, ``axes``) holds the input's rank and
feature sizes; from_keras returned such a layer unbuilt, without its weights. Each holds ``config``,
``build_config`` (None), ``input_spec``, ``weights`` (seeded values set with ``set_weights``), ``x_infer``,
``y_infer``, ``x_train``, ``y_train`` and ``weights_after``.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

import needs  # (this folder is on sys.path when a script runs)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "data", "tfkeras_configs.json")

# name -> (input shape, layer kwargs): tf.keras' options whose built config Keras 3 could not have written.
LAYERS = {
    "ghost_2d": ((8, 3), {"virtual_batch_size": 2, "momentum": 0.8}),
    "ghost_3d_axis1": ((8, 3, 4), {"virtual_batch_size": 4, "axis": 1, "momentum": 0.7}),
    "list_axis": ((6, 3, 4), {"axis": [1, 2], "momentum": 0.6}),
    "plain_3d": ((6, 3, 4), {"momentum": 0.9, "center": False}),
}
BUILT_BY_BUILD = {
    "ghost_built": ((8, 3), {"virtual_batch_size": 2, "momentum": 0.8}),
    "axis1_built": ((6, 3, 4), {"axis": 1, "momentum": 0.7, "scale": False}),
}


def built_by_build(rng, shape, kwargs, tf) -> dict:
    layer = tf.keras.layers.BatchNormalization(**kwargs)
    layer.build(shape)
    layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(np.float32) for w in layer.get_weights()])
    spec = layer.input_spec
    record = {"kwargs": kwargs, "config": layer.get_config(), "build_config": layer.get_build_config(),
              "input_spec": {"ndim": spec.ndim, "axes": {str(a): int(s) for a, s in spec.axes.items()}},
              "weights": [w.tolist() for w in layer.get_weights()]}
    x_infer = (1.5 * rng.standard_normal(shape) + 0.5).astype(np.float32)
    x_train = (1.5 * rng.standard_normal(shape) - 0.5).astype(np.float32)
    record.update(x_infer=x_infer.tolist(), y_infer=layer(x_infer, training=False).numpy().tolist(),
                  x_train=x_train.tolist(), y_train=layer(x_train, training=True).numpy().tolist(),
                  weights_after=[w.tolist() for w in layer.get_weights()])
    return record


def main() -> int:
    tf = needs.tensorflow("tfkeras_configs.py")
    out = {"__meta__": {"tensorflow": tf.__version__, "numpy": np.__version__}}
    for index, (name, (shape, kwargs)) in enumerate(LAYERS.items()):
        rng = np.random.default_rng(index)
        layer = tf.keras.layers.BatchNormalization(**kwargs)
        first = (1.5 * rng.standard_normal(shape) + 0.5).astype(np.float32)
        layer(first, training=True)
        x_train = (1.5 * rng.standard_normal(shape) - 0.5).astype(np.float32)
        x_infer = (1.5 * rng.standard_normal(shape) + 0.5).astype(np.float32)
        weights = [w.tolist() for w in layer.get_weights()]
        y_train = layer(x_train, training=True).numpy()
        weights_after = [w.tolist() for w in layer.get_weights()]
        y_infer = layer(x_infer, training=False).numpy()
        out[name] = {"kwargs": kwargs, "config": layer.get_config(), "build_config": layer.get_build_config(),
                     "weights": weights, "x_train": x_train.tolist(), "y_train": y_train.tolist(),
                     "weights_after": weights_after, "x_infer": x_infer.tolist(), "y_infer": y_infer.tolist()}
    out["__built_by_build__"] = {name: built_by_build(np.random.default_rng(10 + index), shape, kwargs, tf)
                                 for index, (name, (shape, kwargs)) in enumerate(BUILT_BY_BUILD.items())}
    with open(OUT, "w") as handle:
        json.dump(out, handle, separators=(",", ":"), sort_keys=True)
    print(f"wrote {OUT}: {len(LAYERS)} layers (tensorflow {tf.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
