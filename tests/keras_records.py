"""The recordings of what the real Keras computed (tests/data, made by tools/keras_recordings/), read alike by every test."""

from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).parent / "data"


def read_record(npz: str) -> dict:
    """A recording's arrays, by key ("<layer path>/<kind>_<i>", "<layer path>/x", ...)."""
    with np.load(DATA / npz) as arrays:
        return dict(arrays)


def keras_arrays(record: dict, path: str, kind: str) -> list:
    """The recorded arrays of one kind ("weights", "after") of the layer at ``path``, in Keras' order."""
    return [record[f"{path}/{kind}_{i}"] for i in range(sum(k.startswith(f"{path}/{kind}_") for k in record))]


def assert_bfloat16_layer_as_recorded(layer, record: dict, path: str) -> None:
    """A loaded bfloat16 layer holds Keras' values exactly and computes Keras' inference output in bfloat16, one
    bfloat16 rounding apart at most (Keras and torch may order the multiply-adds differently)."""
    assert layer.dtype_policy == "bfloat16" and layer.gamma.dtype == torch.bfloat16
    for ours, theirs in zip(layer.get_weights(), keras_arrays(record, path, "weights"), strict=True):
        np.testing.assert_array_equal(np.asarray(ours, dtype=np.float32), theirs)
    y = layer(torch.as_tensor(record[f"{path}/x"]), training=False)
    assert y.dtype == torch.bfloat16
    np.testing.assert_allclose(y.detach().float().numpy(), record[f"{path}/y_infer"], rtol=2 ** -7, atol=0)
