"""The tutorial's examples (docs/learn.md) run as doctests, so a doc that drifts from the code fails CI."""

import doctest
from pathlib import Path

import numpy as np

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
