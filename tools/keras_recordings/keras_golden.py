#!/usr/bin/env python
"""Record golden values of the real Keras BatchNormalization into tests/data/keras_golden.npz.

Run it in a separate environment that has Keras (never needed by the tests, which only
read the .npz):

    python -m venv /tmp/kvenv && /tmp/kvenv/bin/pip install torch==2.13.0 keras \
        tensorflow-cpu tf-keras numpy
    /tmp/kvenv/bin/python tools/keras_recordings/keras_golden.py            # writes tests/data/keras_golden.npz

Two sources, each in its own subprocess (a Keras backend is fixed at import time):

* ``k3``  -- Keras 3 (``keras`` package) with ``KERAS_BACKEND=torch``: gradients come
  straight from torch autograd. Configurations named ``k3_*``.
* ``tfk`` -- tf.keras 2.x (``tf_keras`` package, with TensorFlow), for the options only it
  has (``virtual_batch_size``, ``adjustment``, list ``axis``); gradients from
  ``tf.GradientTape``. Configurations named ``tfk_*``.

For every configuration: the layer is built, ``set_weights`` loads seeded random weights,
then three training calls (``layer(x, training=True[, mask=...])``) and one inference call
run on seeded inputs. For every call the npz holds, under ``<config>/step<k>/``: ``x``,
``g`` (the upstream gradient: the loss is ``sum(y * g)``), ``y``, ``dx``, ``dgamma``/``dbeta``
(when the layer has them and they are trainable), ``mask`` (if any) and ``w<i>`` = the
layer's ``get_weights()[i]`` after the call. ``<config>/init/w<i>`` are the initial
weights; ``<config>/adj_scale``/``adj_bias`` the fixed arrays the adjustment returns.
``__meta__`` is a JSON string: for each configuration its layer kwargs, input shape,
training flags, weight names and source; and the library versions.

Weights are stored exactly as Keras returns them (tf.keras' ghost-batch weights have a
(1, 1, C) / (1, 1, C, 1, 1) shape; normkit's are (C,): the test reshapes).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(ROOT, "tests", "data", "keras_golden.npz")

TRAINING_FLAGS = [True, True, True, False]

# name -> (source, input shape, layer kwargs, extra options)
# extra: "mask": padding lengths per sequence (inputs (N, T, C)), per step;
#        "trainable": False freezes the layer after set_weights;
#        "adjustment": True -> fixed (scale, bias) arrays over the channels.
CONFIGS = {
    "k3_default_2d": ("k3", (8, 5), {}, {}),
    "k3_default_4d": ("k3", (4, 3, 3, 2), {}, {}),
    "k3_axis1_3d": ("k3", (4, 3, 5), {"axis": 1}, {}),
    "k3_axis1_4d_momentum": ("k3", (4, 3, 2, 2), {"axis": 1, "momentum": 0.9, "epsilon": 1e-2}, {}),
    "k3_momentum_eps": ("k3", (8, 5), {"momentum": 0.9, "epsilon": 1e-2}, {}),
    "k3_no_center": ("k3", (8, 5), {"center": False, "momentum": 0.9}, {}),
    "k3_no_scale": ("k3", (8, 5), {"scale": False, "momentum": 0.9}, {}),
    "k3_no_center_no_scale": ("k3", (6, 4), {"center": False, "scale": False, "momentum": 0.5}, {}),
    "k3_renorm_clipped": ("k3", (8, 4), {"renorm": True, "renorm_clipping": {"rmax": 1.5, "rmin": 0.7, "dmax": 0.5},
                                         "renorm_momentum": 0.8, "momentum": 0.9}, {}),
    "k3_renorm_unclipped_4d": ("k3", (4, 3, 3, 2), {"renorm": True, "renorm_momentum": 0.8, "momentum": 0.9}, {}),
    "k3_renorm_no_scale_axis1": ("k3", (6, 3, 4), {"renorm": True, "axis": 1, "scale": False,
                                                   "renorm_clipping": {"rmax": 1.2, "dmax": 0.3},
                                                   "renorm_momentum": 0.7, "momentum": 0.8}, {}),
    "k3_masked": ("k3", (3, 5, 4), {"momentum": 0.8}, {"mask": [[5, 3, 1], [2, 5, 4], [1, 1, 5], [4, 0, 2]]}),
    "k3_masked_renorm": ("k3", (3, 5, 4), {"momentum": 0.8, "renorm": True, "renorm_momentum": 0.7,
                                           "renorm_clipping": {"rmax": 1.3, "rmin": 0.8, "dmax": 0.4}},
                         {"mask": [[5, 3, 1], [2, 5, 4], [1, 1, 5], [4, 0, 2]]}),
    # One fully masked training call: Keras moves the moving stats toward 0 (mean = var = 0);
    # normkit deliberately leaves them unchanged (see docs/keras.md). Outputs agree.
    "k3_fully_masked": ("k3", (3, 5, 4), {"momentum": 0.8}, {"mask": [[0, 0, 0], [0, 0, 0], [0, 0, 0], [5, 5, 5]]}),
    "k3_trainable_false": ("k3", (8, 5), {"momentum": 0.8}, {"trainable": False}),
    # A mask that broadcasts along a middle axis (K3 test_masked_broadcast_normalization, random values).
    "k3_masked_broadcast": ("k3", (2, 3, 4, 2), {"momentum": 0.5}, {"mask_shape": (2, 3, 1)}),
    # axis=1 with a mask: Keras expands the mask at the LAST axis, so it varies along the features.
    "k3_masked_axis1": ("k3", (4, 3, 5), {"axis": 1, "momentum": 0.7}, {"mask_shape": (4, 3)}),
    "tfk_default_2d": ("tfk", (8, 5), {"momentum": 0.9}, {}),
    # Fused kernel (rank 4, channels last): the moving variance gets the unbiased batch variance.
    # normkit.keras follows Keras 3 (biased); the test replays it with normkit.BatchNorm's
    # unbiased_running_var=True, PyTorch's convention, which is what the fused kernel does.
    "tfk_fused_4d": ("tfk", (4, 3, 3, 2), {"momentum": 0.8}, {}),
    "tfk_masked": ("tfk", (3, 5, 4), {"momentum": 0.8}, {"mask": [[5, 3, 1], [2, 5, 4], [1, 1, 5], [4, 0, 2]]}),
    "tfk_vbs_2d": ("tfk", (8, 3), {"virtual_batch_size": 2, "momentum": 0.8}, {}),
    "tfk_vbs_4d_last": ("tfk", (4, 2, 2, 3), {"virtual_batch_size": 2, "momentum": 0.8}, {}),
    "tfk_vbs_4d_axis1": ("tfk", (4, 3, 2, 2), {"virtual_batch_size": 2, "axis": 1, "momentum": 0.8}, {}),
    "tfk_vbs_renorm": ("tfk", (8, 3), {"virtual_batch_size": 4, "momentum": 0.8, "renorm": True,
                                        "renorm_momentum": 0.7, "renorm_clipping": {"rmax": 1.4, "dmax": 0.6}}, {}),
    "tfk_multi_axis": ("tfk", (4, 3, 2, 2), {"axis": [1, 3], "momentum": 0.8}, {}),
    "tfk_adjustment": ("tfk", (8, 4), {"momentum": 0.9}, {"adjustment": True}),
    "tfk_renorm_adjustment": ("tfk", (8, 4), {"momentum": 0.9, "renorm": True, "renorm_momentum": 0.8,
                                              "renorm_clipping": {"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}},
                              {"adjustment": True}),
}


def _seed(name: str, salt: int) -> np.random.Generator:
    return np.random.default_rng([sum(map(ord, name)) * 7919 + len(name), salt])


def channel_count(shape, kwargs):
    axis = kwargs.get("axis", -1)
    axes = [axis] if isinstance(axis, int) else list(axis)
    return [shape[a] for a in axes]


def initial_weights(name, names, param_shape):
    """Seeded weights in Keras' order; the renorm stddevs are positive, variances too."""
    rng = _seed(name, 0)
    draw = {
        "gamma": lambda: rng.uniform(0.5, 1.5, param_shape),
        "beta": lambda: rng.normal(0.0, 0.3, param_shape),
        "moving_mean": lambda: rng.normal(0.0, 0.5, param_shape),
        "moving_variance": lambda: rng.uniform(0.5, 2.0, param_shape),
        "moving_stddev": lambda: rng.uniform(0.7, 1.4, param_shape),
        "renorm_mean": lambda: rng.normal(0.0, 0.5, param_shape),
        "renorm_stddev": lambda: rng.uniform(0.7, 1.6, param_shape),
    }
    return [draw[n]().astype(np.float32) for n in names]


def step_inputs(name, shape, extra, step):
    rng = _seed(name, 1 + step)
    x = (0.5 + 1.5 * rng.standard_normal(shape)).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    mask = None
    if "mask" in extra:
        lengths = extra["mask"][step]
        mask = np.arange(shape[1])[None, :] < np.asarray(lengths)[:, None]
    elif "mask_shape" in extra:
        mask = rng.random(extra["mask_shape"]) < 0.6
        mask.flat[0] = True  # never fully masked
    return x, g, mask


def adjustment_arrays(name, channels):
    rng = _seed(name, 99)
    scale = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    bias = rng.uniform(-0.2, 0.2, channels).astype(np.float32)
    return scale, bias


def weight_names(layer):
    return [w.path.split("/")[-1] if hasattr(w, "path") else w.name.split("/")[-1].split(":")[0]
            for w in layer.weights]


# ----------------------------------------------------------------------------- Keras 3 (torch backend)


def built_layer(layer_class, name, shape, kwargs, extra, data):
    """A built BatchNormalization of either Keras with the config's initial weights (recorded in ``data``)."""
    layer = layer_class(**kwargs)
    layer.build(shape)
    wnames = weight_names(layer)
    layer.set_weights(initial_weights(name, wnames, tuple(layer.weights[0].shape)))
    if extra.get("trainable") is False:
        layer.trainable = False
    for i, w in enumerate(layer.get_weights()):
        data[f"{name}/init/w{i}"] = w
    return layer, wnames


def import_or_exit(name, what):
    """The module, or exit saying what to install: this records the real Keras (the tests only read the .npz)."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        sys.exit(f"tools/keras_recordings/keras_golden.py needs {what} ({error}); run it in a separate venv, as its docstring says")


def record_k3(names, out):
    os.environ["KERAS_BACKEND"] = "torch"
    keras = import_or_exit("keras", "Keras 3 (pip install keras)")
    import torch

    assert keras.backend.backend() == "torch"
    data, meta = {}, {}
    for name in names:
        _, shape, kwargs, extra = CONFIGS[name]
        layer, wnames = built_layer(keras.layers.BatchNormalization, name, shape, kwargs, extra, data)
        for step, training in enumerate(TRAINING_FLAGS):
            x_np, g_np, mask_np = step_inputs(name, shape, extra, step)
            x = torch.tensor(x_np, requires_grad=True)
            call = {"training": training}
            if mask_np is not None:
                call["mask"] = torch.tensor(mask_np)
            y = layer(x, **call)
            params = {n: v.value for n, v in zip(wnames, layer.weights)
                      if n in ("gamma", "beta") and v.trainable}
            loss = (y * torch.tensor(g_np)).sum()
            grads = torch.autograd.grad(loss, [x] + list(params.values()), allow_unused=True)
            prefix = f"{name}/step{step}"
            data[f"{prefix}/x"], data[f"{prefix}/g"] = x_np, g_np
            if mask_np is not None:
                data[f"{prefix}/mask"] = mask_np
            data[f"{prefix}/y"] = y.detach().cpu().numpy()
            data[f"{prefix}/dx"] = grads[0].cpu().numpy()
            for pname, grad in zip(params, grads[1:]):
                if grad is not None:
                    data[f"{prefix}/d{pname}"] = grad.cpu().numpy()
            for i, w in enumerate(layer.get_weights()):
                data[f"{prefix}/w{i}"] = w
        meta[name] = {"source": f"keras {keras.__version__} (KERAS_BACKEND=torch, torch {torch.__version__})",
                      "kwargs": kwargs, "shape": list(shape), "training": TRAINING_FLAGS, "weights": wnames,
                      "trainable": extra.get("trainable", True), "mask": "mask" in extra or "mask_shape" in extra,
                      "adjustment": False}
    np.savez(out, __meta__=np.array(json.dumps(meta)), **data)


# ----------------------------------------------------------------------------- tf.keras 2.x


def record_tfk(names, out):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tf = import_or_exit("tensorflow", "TensorFlow and tf_keras (pip install tensorflow-cpu tf-keras; or --skip-tfk)")
    tf_keras = import_or_exit("tf_keras", "tf_keras (pip install tf-keras; or --skip-tfk)")

    data, meta = {}, {}
    for name in names:
        _, shape, kwargs, extra = CONFIGS[name]
        layer_kwargs = dict(kwargs)
        if extra.get("adjustment"):
            channels = channel_count(shape, kwargs)
            scale, bias = adjustment_arrays(name, channels)
            data[f"{name}/adj_scale"], data[f"{name}/adj_bias"] = scale, bias
            layer_kwargs["adjustment"] = lambda input_shape, s=scale, b=bias: (tf.constant(s), tf.constant(b))
        layer, wnames = built_layer(tf_keras.layers.BatchNormalization, name, shape, layer_kwargs, extra, data)
        for step, training in enumerate(TRAINING_FLAGS):
            x_np, g_np, mask_np = step_inputs(name, shape, extra, step)
            x = tf.constant(x_np)
            call = {"training": training}
            if mask_np is not None:
                call["mask"] = tf.constant(mask_np)
            params = {n: v for n, v in zip(wnames, layer.weights) if n in ("gamma", "beta") and v.trainable}
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, **call)
                loss = tf.reduce_sum(y * tf.constant(g_np))
            grads = tape.gradient(loss, [x] + list(params.values()))
            prefix = f"{name}/step{step}"
            data[f"{prefix}/x"], data[f"{prefix}/g"] = x_np, g_np
            if mask_np is not None:
                data[f"{prefix}/mask"] = mask_np
            data[f"{prefix}/y"] = y.numpy()
            data[f"{prefix}/dx"] = grads[0].numpy()
            for pname, grad in zip(params, grads[1:]):
                if grad is not None:
                    data[f"{prefix}/d{pname}"] = grad.numpy()
            for i, w in enumerate(layer.get_weights()):
                data[f"{prefix}/w{i}"] = w
        meta[name] = {"source": f"tf_keras {tf_keras.__version__} (tensorflow {tf.__version__})",
                      "kwargs": kwargs, "shape": list(shape), "training": TRAINING_FLAGS, "weights": wnames,
                      "trainable": extra.get("trainable", True), "mask": "mask" in extra or "mask_shape" in extra,
                      "adjustment": bool(extra.get("adjustment")), "fused": bool(getattr(layer, "fused", False))}
    np.savez(out, __meta__=np.array(json.dumps(meta)), **data)


# ----------------------------------------------------------------------------- driver


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--part", choices=["k3", "tfk"], help=argparse.SUPPRESS)
    parser.add_argument("--skip-tfk", action="store_true", help="record only the Keras 3 configurations")
    args = parser.parse_args(argv)
    if args.part:
        names = [n for n, spec in CONFIGS.items() if spec[0] == args.part]
        (record_k3 if args.part == "k3" else record_tfk)(names, args.out)
        return 0
    merged, meta = {}, {"__versions__": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for part in ["k3"] + ([] if args.skip_tfk else ["tfk"]):
            path = os.path.join(tmp, f"{part}.npz")
            part_run = subprocess.run([sys.executable, os.path.abspath(__file__), "--part", part, "--out", path])
            if part_run.returncode != 0:  # (the part said why on stderr)
                print(f"tools/keras_recordings/keras_golden.py: recording the {part} part failed; {args.out} is unchanged",
                      file=sys.stderr)
                return 1
            with np.load(path) as f:
                part_meta = json.loads(str(f["__meta__"]))
                merged.update({k: f[k] for k in f.files if k != "__meta__"})
            meta.update(part_meta)
            meta["__versions__"][part] = sorted({m["source"] for m in part_meta.values()})
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, __meta__=np.array(json.dumps(meta, sort_keys=True)), **merged)
    print(f"wrote {args.out}: {len(meta) - 1} configurations, {os.path.getsize(args.out)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
