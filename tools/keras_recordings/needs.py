"""What the recording scripts need from outside the test environment (TensorFlow's tf.keras), or one line saying so."""

from __future__ import annotations

import os
import sys


def tensorflow(script: str):
    """TensorFlow, for its tf.keras (2.13-2.15 record the files the tests read); without it the script ends with one
    line naming ``script`` (its name and flags) and what it needs, not a traceback."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import tensorflow as tf
    except ImportError as error:  # (these record the real tf.keras; the tests never need it)
        sys.exit(f"tools/keras_recordings/{script} needs TensorFlow 2.13-2.15 ({error})")
    return tf
