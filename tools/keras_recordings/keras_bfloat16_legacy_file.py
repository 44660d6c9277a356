#!/usr/bin/env python
"""Record a Keras 3 model with a bfloat16 BatchNormalization saved by Keras' legacy HDF5 writer (model.save("x.h5")).

That writer stores bfloat16 variables as raw 2-byte HDF5 values without the ``dtype`` attribute the .keras format
adds (HDF5 has no bfloat16): only the layer's policy says what they are, and load_batch_norms refused them ("holds |V2
values, not floating-point numbers"). Keras 3.15.1 itself cannot load the file back ("Invalid dtype: void16"). Run
where Keras 3 is installed (torch backend):

    KERAS_BACKEND=torch /work/k3venv/bin/python tools/keras_recordings/keras_bfloat16_legacy_file.py

Writes tests/data/keras3_bn_bfloat16_legacy.h5 and .npz: ``weights_<i>`` (as float32: bfloat16 values exactly),
``x`` and ``y_infer`` (the layer's inference output, as float32) under the key prefix ``bn_bf16/``.
"""

from __future__ import annotations

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "data", "keras3_bn_bfloat16_legacy")


def main() -> int:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError as error:  # (this records the real Keras; the tests never need it)
        sys.exit(f"tools/keras_recordings/keras_bfloat16_legacy_file.py needs Keras 3 ({error})")
    keras.utils.set_random_seed(2)
    rng = np.random.default_rng(2)
    inputs = keras.Input((4,), name="features")
    layer = keras.layers.BatchNormalization(name="bn_bf16", dtype="bfloat16", momentum=0.5)
    model = keras.Model(inputs, layer(inputs), name="half")
    for _ in range(3):  # (the moving statistics away from their initial values)
        layer((rng.normal(size=(8, 4)) * 3 + 1).astype("float32"), training=True)
    layer.set_weights([np.asarray(rng.uniform(0.5, 1.5, 4), dtype=w.dtype) if i < 2 else w
                       for i, w in enumerate(layer.get_weights())])
    model.save(OUT + ".h5", include_optimizer=False)
    x = (rng.normal(size=(6, 4)) * 2 + 1).astype("float32")
    arrays = {f"bn_bf16/weights_{i}": np.asarray(w, dtype=np.float32) for i, w in enumerate(layer.get_weights())}
    arrays["bn_bf16/x"] = x
    arrays["bn_bf16/y_infer"] = np.asarray(keras.ops.convert_to_numpy(layer(x, training=False)), dtype=np.float32)
    np.savez_compressed(OUT + ".npz", **arrays)
    print(f"wrote {os.path.basename(OUT)}.h5 and .npz (keras {keras.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
