"""`--norm-option KEY=VALUE` gives every norm layer of the model a constructor keyword.

The options are checked before anything is written, saved in the run, and equal in effect to
building the layers with them (against the registry's own names and plain arithmetic)."""

import json

import pytest
import torch

from normkit import BatchNorm
from normkit.cli import main
from normkit.lab.checkpoint import load_checkpoint, model_from_checkpoint
from normkit.lab.config import TrainConfig
from normkit.lab.train import run

from lab_testing import TINY


def norm_layers(model):
    return [m for m in model.modules() if isinstance(m, BatchNorm)]


def test_values_are_json_else_strings_and_saved_in_the_run(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--dry-run", *TINY, "--out", str(out), "--norm", "renorm",
                 "--norm-option", "renorm_momentum=0.01", "--norm-option", 'renorm_clipping={"rmax": 2, "dmax": 1}',
                 "--norm-option", "weight_regularizer=l1", "--norm-option", "center=true"]) == 2
    # center is Keras vocabulary, not normkit.BatchNorm's: refused, and nothing written
    assert not out.exists()
    assert main(["train", "--dry-run", *TINY, "--out", str(out), "--norm", "renorm",
                 "--norm-option", "renorm_momentum=0.01", "--norm-option", 'renorm_clipping={"rmax": 2, "dmax": 1}',
                 "--norm-option", "weight_regularizer=l1", "--norm-option", "affine=true"]) == 0
    saved = json.loads((out / "config.json").read_text())["norm_options"]
    assert saved == {"renorm_momentum": 0.01, "renorm_clipping": {"rmax": 2, "dmax": 1},
                     "weight_regularizer": "l1", "affine": True}
    model, cfg = model_from_checkpoint(load_checkpoint(out / "checkpoint.pt"))
    assert cfg.norm_options == saved
    layers = norm_layers(model)
    assert len(layers) == 4
    for layer in layers:
        assert layer.renorm and layer.renorm_momentum == 0.01 and layer.weight_regularizer is not None
        assert (layer.renorm_clipping.rmin, layer.renorm_clipping.rmax, layer.renorm_clipping.dmax) == (0.0, 2, 1)  # rmin: none given


def test_options_reproduce_a_named_norm(tmp_path):
    """`batch` with Keras' momentum, epsilon and biased running variance is the registry's `keras`: same weights."""
    keras_run, options_run = tmp_path / "keras", tmp_path / "options"
    assert main(["train", "--epochs", "1", *TINY, "--norm", "keras", "--out", str(keras_run)]) == 0
    assert main(["train", "--epochs", "1", *TINY, "--norm", "batch", "--out", str(options_run),
                 "--norm-option", "momentum=0.01", "--norm-option", "eps=1e-3",
                 "--norm-option", "unbiased_running_var=false"]) == 0
    expected = load_checkpoint(keras_run / "checkpoint.pt")["model"]
    got = load_checkpoint(options_run / "checkpoint.pt")["model"]
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    # ...and the defaults are not that: the option changed something
    assert main(["train", "--epochs", "1", *TINY, "--norm", "batch", "--out", str(tmp_path / "plain")]) == 0
    plain = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")["model"]
    assert not torch.equal(plain["1.running_var"], expected["1.running_var"])


def test_regularizers_enter_the_loss_and_constraints_hold_after_each_step(tmp_path):
    def first_loss(*options):
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        assert main(["train", "--dry-run", *TINY, "--out", str(out), *options]) == 0
        return json.loads((out / "metrics.json").read_text())["history"][0]["loss"], out
    plain, _ = first_loss()
    regularized, _ = first_loss("--norm-option", "weight_regularizer=l2")
    # Keras' l2 = 0.01 * sum(w^2) over every gamma (all 1 before the first step): 6 + 16 + 120 + 84 of them.
    assert regularized - plain == pytest.approx(0.01 * (6 + 16 + 120 + 84), rel=1e-5)
    # unit_norm projects each gamma vector onto the unit sphere after every step (Keras' UnitNorm).
    free_run, constrained_run = tmp_path / "free", tmp_path / "constrained"
    assert main(["train", "--epochs", "1", *TINY, "--out", str(free_run)]) == 0
    assert main(["train", "--epochs", "1", *TINY, "--out", str(constrained_run),
                 "--norm-option", "weight_constraint=unit_norm"]) == 0
    free = load_checkpoint(free_run / "checkpoint.pt")["model"]
    constrained = load_checkpoint(constrained_run / "checkpoint.pt")["model"]
    gammas = [k for k in free if k.endswith(".weight") and k.replace(".weight", ".running_mean") in free]
    assert len(gammas) == 4
    for key in gammas:
        assert abs(free[key].norm().item() - 1.0) > 0.5, key  # about sqrt(C) without the constraint
        assert constrained[key].norm().item() == pytest.approx(1.0, abs=1e-6), key


def test_ghost_batches_of_another_size(tmp_path, capsys):
    out = tmp_path / "ghost"
    assert main(["train", "--dry-run", *TINY[:2], "--batch-size", "20", "--quiet", "--no-tensorboard",
                 "--out", str(out), "--norm", "ghost", "--norm-option", "virtual_batch_size=8"]) == 2
    assert "virtual batches of 8; --batch-size=20 must be a multiple of 8" in capsys.readouterr().err
    assert not out.exists()
    assert main(["train", "--dry-run", *TINY[:2], "--batch-size", "24", "--quiet", "--no-tensorboard",
                 "--out", str(out), "--norm", "ghost", "--norm-option", "virtual_batch_size=8"]) == 0
    model, cfg = model_from_checkpoint(load_checkpoint(out / "checkpoint.pt"))
    assert cfg.drop_last and {layer.virtual_batch_size for layer in norm_layers(model)} == {8}
    # a plain `batch` with virtual batches gets ghost's partial-batch rule too
    resolved = TrainConfig(norm="batch", norm_options={"virtual_batch_size": 8}, batch_size=24).resolved()
    assert resolved.drop_last


@pytest.mark.parametrize("argv, phrase", [
    (["--norm", "none", "--norm-option", "momentum=0.1"], "--norm none has no layer"),
    (["--norm", "layer", "--norm-option", "momentum=0.1"], "--norm layer (conv layers)"),
    (["--norm", "batch", "--norm-option", "momentum=2"], "momentum must be a number in [0, 1]"),
    (["--norm", "batch", "--norm-option", "axis=-1"], "cannot train with them: num_features=6"),
    (["--norm", "batch", "--norm-option", "momentum"], "expected KEY=VALUE"),
    (["--norm", "batch", "--norm-option", "eps=1", "--norm-option", "eps=2"], "eps given twice"),
    (["--model", "mlp", "--norm", "group", "--norm-option", "num_groups=7"], "--norm group (dense layers)"),
    # (torch's traceback, or "Torch not compiled with CUDA enabled", before anything was checked)
    (["--norm", "batch", "--norm-option", "device=cuda"], "device: the run puts every layer where --device says"),
    (["--norm", "torch", "--norm-option", "device=foo"], "device: the run puts every layer where --device says"),
    (["--norm", "batch", "--norm-option", "dtype=float64"], "dtype: the run puts every layer"),
    (["--norm", "batch", "--norm-option", "weight_initializer=1e300"], "beyond torch.float32's range"),
    # Python's spelling is not JSON: the text "False", which the layers read as true (gamma and beta were kept)
    (["--norm", "batch", "--norm-option", "affine=False"], "affine is a switch, give true or false"),
    (["--norm", "torch", "--norm-option", "track_running_stats=False"], "track_running_stats is a switch"),
    (["--model", "mlp", "--norm", "layer", "--norm-option", "elementwise_affine=no"], "elementwise_affine is a switch"),
    # The same for other values: `momentum=None` was refused with "... or None (cumulative average), got 'None'",
    # which named the very value the user had typed; the error says the text is not JSON's null
    (["--norm", "batch", "--norm-option", "momentum=None"], "momentum=None is read as the text 'None' (not JSON): for Python's None give null"),
    (["--norm", "ghost", "--norm-option", "virtual_batch_size=None"], "the text 'None' (not JSON): for Python's None give null"),
    (["--norm", "renorm", "--norm-option", "renorm_momentum=True"], "the text 'True' (not JSON): for Python's True give true"),
])
def test_bad_options_are_one_line_before_anything_is_written(tmp_path, capsys, argv, phrase):
    out = tmp_path / "run"
    try:
        code = main(["train", "--dry-run", *TINY, "--out", str(out), *argv])
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    assert code == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error, error
    assert "--norm-option" in error and phrase in error, error
    assert not out.exists()


def test_a_switch_given_as_json_false_turns_the_layers_feature_off(tmp_path):
    """The refused spellings' oracle: JSON false does what `affine=False` was meant to (no gamma and beta)."""
    out = tmp_path / "run"
    assert main(["train", "--dry-run", *TINY, "--quiet", "--no-tensorboard", "--out", str(out),
                 "--norm-option", "affine=false"]) == 0
    model, _ = model_from_checkpoint(load_checkpoint(out / "checkpoint.pt"))
    assert all(layer.weight is None and layer.bias is None for layer in norm_layers(model))


def test_resume_keeps_the_options(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", *TINY, "--out", str(out), "--norm-option", "momentum=0.5"]) == 0
    assert main(["train", "--epochs", "2", *TINY, "--out", str(out), "--resume",
                 "--norm-option", "momentum=0.25"]) == 2
    error = capsys.readouterr().err
    assert "--norm-option {'momentum': 0.25}" in error and "--norm-options" not in error, error
    # Not given on --resume: the checkpoint's options are used.
    metrics = run(TrainConfig(out=str(out), resume=True, epochs=2, quiet=True, tensorboard=False),
                  given={"out", "resume", "epochs", "quiet", "tensorboard"})
    assert len(metrics["history"]) == 2
    model, cfg = model_from_checkpoint(load_checkpoint(out / "checkpoint.pt"))
    assert cfg.norm_options == {"momentum": 0.5} and {m.momentum for m in norm_layers(model)} == {0.5}


def test_checking_the_options_draws_nothing_from_the_run_s_generator():
    from normkit.lab.config import check_norm_options

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    check_norm_options("batch", {"momentum": 0.5}, "lenet")  # builds and steps a throwaway LeNet
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)
