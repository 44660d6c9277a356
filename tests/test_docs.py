"""The tutorial's examples (docs/learn.md) run as doctests, and keras.md's opening example runs, so a doc that
drifts from the code fails CI."""

import doctest
import re
from pathlib import Path

import numpy as np
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "learn.md"


def test_learn_md_examples_run():
    printoptions = np.get_printoptions()  # the tutorial sets NumPy's print precision: restore it for other tests
    try:
        result = doctest.testfile(str(DOC), module_relative=False, report=True,
                                  optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    finally:
        np.set_printoptions(**printoptions)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {DOC.name} failed (see above)"


KERAS_DOC = DOC.with_name("keras.md")


def test_keras_md_first_example_runs():
    # Its opening example is plain Python (not a doctest) and names `mask` without defining it: give it one
    # of the shape its comment says, (32, 10), and check the comments' claims (weights in Keras' order).
    block = re.search(r"```python\n(.*?)```", KERAS_DOC.read_text(), re.S).group(1)
    namespace = {"mask": torch.rand(32, 10) > 0.3}
    exec(compile(block, str(KERAS_DOC), "exec"), namespace)
    bn, y = namespace["bn"], namespace["y"]
    assert y.shape == (32, 10, 8)
    assert [w.shape for w in bn.get_weights()] == [(8,)] * 4
