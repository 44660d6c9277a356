#!/usr/bin/env python
"""Record real Keras 3 BatchNormalization layers (config, build config, weights, outputs) into tests/data/keras_configs.json.

The porting tests (tests/test_keras_port.py) read the JSON without Keras: they rebuild each
layer with ``normkit.keras.from_keras_config`` and check that it computes what Keras computed,
and that ``keras_config()`` of an equivalent normkit layer is the config Keras wrote. Run it
where Keras 3 is installed (torch backend):

    python -m venv /tmp/kvenv && /tmp/kvenv/bin/pip install torch==2.13.0 keras numpy
    KERAS_BACKEND=torch /tmp/kvenv/bin/python tools/keras_recordings/keras_configs.py

For every layer: ``layer.get_config()`` and ``layer.get_build_config()`` exactly as Keras
returns them; the weights after ``set_weights`` of seeded values (``weights``); one training
call on a seeded input (``x_train``, ``y_train``, the weights after it: ``weights_after``);
one inference call (``x_infer``, ``y_infer``); ``layer.losses`` after it (the regularization
terms) and the constraints applied to gamma and beta (``constrained``); the constructor
arguments (``kwargs``). Arrays are nested lists of float32 values.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(ROOT, "tests", "data", "keras_configs.json")

# name -> (input shape, layer kwargs): the options a ported model carries, serialized by Keras.
LAYERS = {
    "defaults_dense": ((6, 4), {}),
    "channels_first_conv": ((4, 3, 5, 5), {"axis": 1, "momentum": 0.9, "epsilon": 1e-4}),
    "no_center": ((6, 4), {"center": False, "momentum": 0.8}),
    "no_scale_sequence": ((3, 5, 4), {"scale": False}),
    "initializers": ((6, 3), {"beta_initializer": "random_normal", "gamma_initializer": {"class_name": "Constant",
                                                                                         "config": {"value": 0.5}},
                              "moving_mean_initializer": "random_uniform",
                              "moving_variance_initializer": "truncated_normal"}),
    "regularizers_constraints": ((6, 3), {"gamma_regularizer": "l2", "beta_regularizer": {
        "class_name": "L1L2", "config": {"l1": 0.001, "l2": 0.002}}, "gamma_constraint": "non_neg",
        "beta_constraint": {"class_name": "MaxNorm", "config": {"max_value": 1.5, "axis": 0}}}),
    "unit_and_min_max_norm": ((6, 3), {"gamma_constraint": "unit_norm", "beta_constraint": {
        "class_name": "MinMaxNorm", "config": {"min_value": 0.2, "max_value": 1.0, "rate": 0.5, "axis": 0}},
        "beta_regularizer": {"class_name": "L1", "config": {"l1": 0.05}}}),
    "renorm": ((8, 3), {"renorm": True, "renorm_clipping": {"rmax": 2.0, "rmin": 0.5, "dmax": 1.0},
                        "renorm_momentum": 0.9, "momentum": 0.9}),
    "renorm_default_clipping": ((8, 3), {"renorm": True}),
    "renorm_partial_clipping": ((8, 3), {"renorm": True, "renorm_clipping": {"rmax": 1.5, "dmax": None}}),
    "frozen": ((6, 4), {"trainable": False}),
    "mixed_float16": ((6, 4), {"dtype": "mixed_float16", "momentum": 0.8}),
    "variance_scaling_initializers": ((6, 3), {
        "gamma_initializer": "he_uniform", "beta_initializer": "glorot_normal",
        "moving_mean_initializer": "LecunNormal", "moving_variance_initializer": {
            "class_name": "VarianceScaling", "config": {"scale": 2.0, "mode": "fan_out", "distribution": "uniform"}}}),
    # Keras writes back the class it was given: L1L2 with one factor 0 stays L1L2, L2(0) stays L2.
    "one_factor_regularizers": ((6, 3), {"gamma_regularizer": {"class_name": "L1L2", "config": {"l1": 0.02, "l2": 0.0}},
                                         "beta_regularizer": {"class_name": "L2", "config": {"l2": 0.0}}}),
}


def _seed(name: str, salt: int) -> np.random.Generator:
    return np.random.default_rng([sum(map(ord, name)) * 104729 + len(name), salt])


def seeded_weights(name, names, shape):
    rng = _seed(name, 0)
    draw = {"gamma": lambda: rng.uniform(0.5, 1.5, shape), "beta": lambda: rng.normal(0.0, 0.3, shape),
            "moving_mean": lambda: rng.normal(0.0, 0.5, shape), "moving_variance": lambda: rng.uniform(0.5, 2, shape),
            "moving_stddev": lambda: rng.uniform(0.7, 1.4, shape), "renorm_mean": lambda: rng.normal(0, 0.5, shape),
            "renorm_stddev": lambda: rng.uniform(0.7, 1.6, shape)}
    return [draw[n]().astype(np.float32) for n in names]


def import_keras():
    """Keras 3 on the torch backend, or exit saying how to get it (this records the real Keras; the tests never need it)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError as error:
        sys.exit(f"tools/keras_recordings/keras_configs.py records real Keras 3 layers and needs Keras ({error}); run it in a venv "
                 "that has it: python -m venv /tmp/kvenv && /tmp/kvenv/bin/pip install torch==2.13.0 keras numpy")
    return keras


def record() -> dict:
    keras = import_keras()

    out = {"__meta__": {"keras": keras.__version__, "backend": keras.backend.backend(),
                        "numpy": np.__version__}}
    for name, (shape, kwargs) in LAYERS.items():
        layer = keras.layers.BatchNormalization(**kwargs)
        layer.build(shape)
        names = [w.path.split("/")[-1] for w in layer.weights]
        layer.set_weights(seeded_weights(name, names, tuple(layer.weights[0].shape)))
        rng = _seed(name, 1)
        x_train = (0.5 + 1.5 * rng.standard_normal(shape)).astype(np.float32)
        x_infer = (0.5 + 1.5 * rng.standard_normal(shape)).astype(np.float32)
        weights = [w.tolist() for w in layer.get_weights()]
        y_train = keras.ops.convert_to_numpy(layer(x_train, training=True))
        weights_after = [w.tolist() for w in layer.get_weights()]
        y_infer = keras.ops.convert_to_numpy(layer(x_infer, training=False))
        losses = [float(keras.ops.convert_to_numpy(loss)) for loss in layer.losses]
        constrained = {}
        for label, variable, constraint in (("gamma", getattr(layer, "gamma", None), layer.gamma_constraint),
                                            ("beta", getattr(layer, "beta", None), layer.beta_constraint)):
            if variable is not None and constraint is not None:
                constrained[label] = keras.ops.convert_to_numpy(constraint(variable.value)).tolist()
        out[name] = {"kwargs": kwargs, "config": layer.get_config(), "build_config": layer.get_build_config(),
                     "weight_names": names, "weights": weights, "x_train": x_train.tolist(),
                     "y_train": y_train.tolist(), "weights_after": weights_after, "x_infer": x_infer.tolist(),
                     "y_infer": y_infer.tolist(), "losses": losses, "constrained": constrained}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=DEFAULT_OUT, help=f"the JSON file to write (default {DEFAULT_OUT})")
    out_path = parser.parse_args(argv).out
    data = record()
    tmp = out_path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=None, separators=(",", ":"), sort_keys=True)
    os.replace(tmp, out_path)
    print(f"wrote {out_path}: {len(data) - 1} layers, Keras {data['__meta__']['keras']}")


if __name__ == "__main__":
    main()
