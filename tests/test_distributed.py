"""synchronized=True over a real 2-process gloo group equals one process normalizing the whole batch.

One spawn runs every case (processes are the slow part); each case trains a few steps on each
rank's part of a batch and saves what it saw, and the test replays the whole batch in one process.
A second spawn has one process refuse its input while the other waits in the merge.
"""

import copy
import datetime
import os
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist

import normkit
import normkit.keras
from normkit import reference as R
from oracle import errors_of, spawn_processes

STEPS = 2
FEATURES = 4


def _adjustment(shape):
    # A fixed, input-independent adjustment (what matters is that the synchronized path applies it).
    return torch.full(shape, 1.5, dtype=torch.float64), torch.full(shape, -0.25, dtype=torch.float64)


# name: (local batch sizes, layer options, with a mask). Uneven sizes: the merge must weigh by counts.
CASES = {
    "plain": ((3, 5), {}, False),
    "mask": ((3, 5), {}, True),
    "renorm": ((3, 5), {"renorm": True, "renorm_clipping": {"rmax": 1.5, "dmax": 0.5}}, False),
    "ghost": ((4, 4), {"virtual_batch_size": 2}, False),
    "adjustment": ((3, 5), {"adjustment": _adjustment}, False),
    "biased_variance": ((3, 5), {"unbiased_running_var": False, "momentum": None}, False),
    "empty_rank": ((0, 8), {}, False),
}

# The cases also trained under torch.compile (which breaks the graph around the merge).
COMPILED_CASES = ("plain", "mask", "renorm")


def _data(sizes, step):
    generator = torch.Generator().manual_seed(step)
    shape = (sum(sizes), FEATURES, 3)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 1
    g = torch.randn(shape, generator=generator, dtype=torch.float64)
    mask = torch.rand((shape[0], shape[2]), generator=generator) > 0.3
    return x, g, mask


def _layer(options, **extra):
    layer = normkit.BatchNorm(FEATURES, **options, **extra).double()
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, FEATURES + 1.0, dtype=torch.float64))
    return layer


def _train(layer, batches, compiled=False):
    """Steps of forward + backward; returns per-step outputs and input gradients, and the layer's state."""
    call = torch.compile(layer, backend="eager") if compiled else layer
    outputs, grads = [], []
    for x, g, mask in batches:
        x = x.clone().requires_grad_()
        y = call(x, mask=mask)
        y.backward(g)
        outputs.append(y.detach())
        grads.append(x.grad)
    return outputs, grads, {"weight_grad": layer.weight.grad, **layer.state_dict()}


def _torch_model(last=torch.nn.SyncBatchNorm):
    """torch.nn layers for synchronize_batch_norm: BatchNorm1d and (GPU-only in torch.nn) SyncBatchNorm."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(FEATURES), torch.nn.Linear(3, 3), last(FEATURES)).double()
    for parameter in model.parameters():
        torch.nn.init.uniform_(parameter, 0.5, 1.5)
    return model


def _train_model(model, batches):
    """Like _train for a whole model: per-step outputs and input gradients, the state, the parameter gradients."""
    outputs, grads = [], []
    for x, g in batches:
        x = x.clone().requires_grad_()
        y = model(x)
        y.backward(g)
        outputs.append(y.detach())
        grads.append(x.grad)
    return outputs, grads, model.state_dict(), [parameter.grad for parameter in model.parameters()]


def _gradient_penalty(layer, batch):
    """A double backward (create_graph=True): the input gradient's squared norm, differentiated again."""
    x, g, _ = batch
    x = x.clone().requires_grad_()
    first, = torch.autograd.grad((layer(x) * g).square().sum(), x, create_graph=True)
    first.square().sum().backward()
    return first.detach(), x.grad, layer.weight.grad, layer.bias.grad


def _transformed(layer, batch):
    """torch.func.grad (parameters and input, the buffers passed in), forward-mode AD's tangent of the output, and
    torch.func.jvp of the gradient (a Hessian-vector product) of a layer; a vmap over the input gives its error."""
    x, g, _ = batch
    params = {name: value.detach() for name, value in layer.named_parameters()}
    buffers = {name: value.clone() for name, value in layer.named_buffers()}

    def loss(p, b, v):
        return (torch.func.functional_call(layer, (p, b), (v,)) * g).sum()

    results = {"grad": torch.func.grad(loss, argnums=(0, 2))(params, buffers, x)}
    import torch.autograd.forward_ad as forward_ad
    with forward_ad.dual_level():
        results["forward_ad"] = forward_ad.unpack_dual(layer(forward_ad.make_dual(x, g))).tangent
    stateless = type(layer)(FEATURES, track_running_stats=False, synchronized=layer.synchronized).double()
    stateless_loss = lambda v: (stateless(v) * g).sum()  # noqa: E731
    results["hvp"] = torch.func.jvp(torch.func.grad(stateless_loss), (x,), (g,))[1]
    try:
        torch.func.vmap(stateless)(x.unsqueeze(0))
        results["vmap"] = None
    except RuntimeError as error:
        results["vmap"] = str(error)
    # An ensemble (stack_module_state) vmapped over its members' weights and buffers, not the data: the merge is
    # not batched, and each member's running statistics are the group's.
    members = [type(layer)(FEATURES, synchronized=layer.synchronized).double() for _ in range(2)]
    with torch.no_grad():
        members[1].weight.fill_(2.0)
    stacked, stacked_buffers = torch.func.stack_module_state(members)
    call = lambda p, b: torch.func.functional_call(members[0], (p, b), (x,))  # noqa: E731
    results["ensemble"] = (torch.func.vmap(call)(stacked, stacked_buffers), stacked_buffers)
    return results


def _copy_of_grouped_model(rank):
    """copy.deepcopy of a model synchronized over a group of its own (an EMA copy; fold_batch_norm's copy): the copy
    shares the group and trains on it; the original is left as it was."""
    group = dist.new_group([0, 1])
    model = normkit.synchronize_batch_norm(_torch_model(), process_group=group)
    keras = normkit.keras.BatchNormalization(axis=1, synchronized=True, process_group=group)
    keras.build((None, FEATURES, 3))
    try:
        copied, keras_copy = copy.deepcopy(model), copy.deepcopy(keras)
    except TypeError as error:  # (recorded; the test says what was expected)
        return f"TypeError: {error}"
    shared = [layer.process_group is group for layer in (copied[0], copied[2], keras_copy, keras_copy.bn)]
    trained = _train_model(copied, [_local(_data((3, 5), step)[:2], (3, 5), rank) for step in range(STEPS)])
    x = _local(_data((3, 5), STEPS), (3, 5), rank)[0]
    conv = torch.nn.Sequential(torch.nn.Conv1d(FEATURES, FEATURES, 1),
                               normkit.BatchNorm1d(FEATURES, synchronized=True, process_group=group)).double().eval()
    with torch.no_grad():
        folded, names = normkit.fold_batch_norm(conv)
        fold = (folded(x), conv(x), names)
    return {"shared": shared, "trained": trained, "original": model.state_dict(), "fold": fold}


# Float32 data at mean 1e4, std 1e-2 (name: (local batch sizes per step, layer options, with a mask)). The second
# plain step leaves process 0 empty after a step that recentered it.
# "masked_process": process 0's rows all masked out (their values real data, near the others), so it holds no valid
# value and no centre of its own, yet normalizes its rows by the group's statistics.
FAR_CASES = {"plain": (((3, 5), (0, 8)), {}, False), "masked_ghosts": (((4, 4), (4, 4)), {"virtual_batch_size": 2}, True),
             "masked_process": (((3, 5), (2, 2)), {}, "process 0")}


def _far_data(sizes, step, masked=True):
    x, g, mask = _data(sizes, step)
    if masked == "process 0":
        mask[:sizes[0]] = False
    return (x * 5e-3 + 1e4).float(), g.float(), mask if masked else None


def _far_from_zero(rank):
    results = {}
    for name, (steps, options, masked) in FAR_CASES.items():
        batches = [_local(_far_data(sizes, step, masked), sizes, rank)
                   for step, sizes in enumerate(steps)]
        results[name] = _train(_layer(options, synchronized=True).float(), batches)
    return results


# Float32 layers whose state every process must hold to the bit after several steps (name: layer options).
SAME_BITS = {"plain": {}, "renorm": {"renorm": True, "renorm_clipping": {"rmax": 1.5, "dmax": 0.5}},
             "ghost": {"virtual_batch_size": 2}}


def _same_bits(rank):
    """Each SAME_BITS layer's state after 20 float32 training steps on this process's half of each batch."""
    results = {}
    for name, options in SAME_BITS.items():
        layer = normkit.BatchNorm(FEATURES, **options, synchronized=True)
        for step in range(20):
            x = (_data((4, 4), step)[0] + 0.3).float()
            layer(_local((x,), (4, 4), rank)[0]).sum().backward()
        results[name] = layer.state_dict()
    return results


def _local(batch, sizes, rank):
    start = sum(sizes[:rank])
    return tuple(None if t is None else t[start:start + sizes[rank]] for t in batch)


# Per-process image sizes (multi-scale training; sequence lengths differ alike): each process's (N, C, H, W), its
# mask and output gradient, drawn for both processes from one seed.
SPATIAL_SHAPES = ((3, FEATURES, 5, 7), (2, FEATURES, 6, 3))


def _spatial_data():
    generator = torch.Generator().manual_seed(11)
    parts = []
    for shape in SPATIAL_SHAPES:
        x = torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 1
        g = torch.randn(shape, generator=generator, dtype=torch.float64)
        mask = torch.rand((shape[0], *shape[2:]), generator=generator) > 0.3
        parts.append((x, g, mask))
    return parts


def _spatial_sizes(rank):
    """Each process trains on images of its own size (masked or not, contiguous or channels_last): the statistics'
    shape is the same on every process, and the merge weighs each by its count of positions."""
    x, g, mask = _spatial_data()[rank]
    results = {}
    for masked in (False, True):
        for layout in (torch.contiguous_format, torch.channels_last):
            layer = _layer({}, synchronized=True)
            results[(masked, str(layout))] = _train(
                layer, [(x.contiguous(memory_format=layout), g, mask if masked else None)] * STEPS)
    return results


def _refusals(rank):
    """Process 1 alone gives an input the layer refuses (the same layer on both); each process records its error."""
    bad = rank == 1
    keras = normkit.keras.BatchNormalization(axis=1, synchronized=True)
    keras.build((None, FEATURES, 3))
    calls = {
        "features": lambda: _layer({}, synchronized=True)(
            torch.randn(4, FEATURES + bad, 3, dtype=torch.float64)),
        "ghost": lambda: _layer({"virtual_batch_size": 2}, synchronized=True)(
            torch.randn(4 + bad, FEATURES, 3, dtype=torch.float64)),
        "mask": lambda: _layer({}, synchronized=True)(
            torch.randn(4, FEATURES, 3, dtype=torch.float64), mask=torch.ones(4, 3 + bad, dtype=torch.bool)),
        "keras_rank": lambda: keras(torch.randn(4, FEATURES, *((3,) if not bad else ())), training=True),
        # A Keras mask that is no array (ragged lists) on one process, a regular one on the other.
        "keras_mask": lambda: keras(torch.randn(2, FEATURES, 3), training=True,
                                    mask=[[1, 0, 1, 1], [1]] if bad else [[1, 0, 1, 1], [1, 1, 1, 1]]),
        # A lazy layer's first call (sized by torch's lazy hook, which checks the input before the forward).
        "lazy_mask": lambda: normkit.LazyBatchNorm1d(synchronized=True).double()(
            torch.randn(4, FEATURES, 3, dtype=torch.float64), mask=torch.ones(4, 3 + bad, dtype=torch.bool)),
        # Keras' array input: ragged lists on one process, a regular batch on the other.
        "keras_input": lambda: keras([[[1.0, 2.0, 3.0]] * FEATURES, [[1.0, 0.0, 3.0]] * (FEATURES - bad)],
                                     training=True),
        # An adjustment whose terms fit one process's batch and not the other's (a fixed batch size of 4).
        "adjustment": lambda: _layer({"adjustment": lambda shape: (torch.full((4, FEATURES), 1.5, dtype=torch.float64),
                                                                   torch.zeros(4, FEATURES, dtype=torch.float64))},
                                     synchronized=True)(torch.randn(4 + bad, FEATURES, dtype=torch.float64)),
        # A renorm clipping schedule that fails at step 1 on one process (a table of values shorter than its
        # training): evaluated among the call's arguments, it was no refusal, and the peer's merge paired with this
        # process's next collective (statistics of another layer, no error).
        "schedule": lambda: (lambda layer: [layer(torch.randn(4, FEATURES, 3, dtype=torch.float64)) for _ in range(2)])(
            _layer({"renorm": True, "renorm_clipping": {"rmax": lambda step: [2.0, *([] if bad else [2.0])][step]}},
                   synchronized=True)),
        # An unbuilt layer whose first call cannot build (axis 2 of a rank-2 input) while the peer's builds and merges.
        "keras_build": lambda: normkit.keras.BatchNormalization(axis=2, synchronized=True)(
            torch.randn(4, FEATURES, *((3,) if not bad else ())), training=True),
        # Under torch.compile: Dynamo raises the refusal while tracing and never runs the frame eagerly, so the
        # peers were not told (they waited for the timeout, or merged with this process's next batch).
        "compiled_features": lambda: torch.compile(_layer({}, synchronized=True), backend="eager")(
            torch.randn(4, FEATURES + bad, 3, dtype=torch.float64)),
        "compiled_keras_rank": lambda: torch.compile(keras, backend="eager")(
            torch.randn(4, FEATURES, *((3,) if not bad else ())), training=True),
    }
    return errors_of(calls)


def _mixed_mask_batches():
    """One valid value per feature over the group, process 1's, under its mask; process 0 has no row and no mask."""
    x, g, _ = _data((0, 2), 0)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[1, 2] = True
    return [(x, g, mask)]


def _mixed_mask(rank):
    # (last in its spawn: before the fix process 0 raised here and process 1 waited in the backward for it)
    x, g, mask = _mixed_mask_batches()[0]
    batch = (x[:0], g[:0], None) if rank == 0 else (x, g, mask)
    try:
        return _train(_layer({}, synchronized=True), [batch])
    except Exception as error:  # noqa: BLE001 (recorded; the test says what was expected)
        return f"{type(error).__name__}: {error}"


# Recalibration of a synchronized layer (name: local batch sizes of each batch). Its batch is the group's: a batch
# empty on every process gives it no value, and one empty on one process only still does.
RECALIBRATIONS = {"group_empty": ((3, 5), (0, 4), (0, 0), (2, 2)), "all_empty": ((0, 0), (0, 0))}


def _recalibration_batches(sizes_per_batch):
    return [_data(sizes, 10 + index)[0] for index, sizes in enumerate(sizes_per_batch)]


def _recalibrated(rank):
    """Each case's state after recalibrate_running_stats over this process's part of its batches, and the warnings."""
    results = {}
    for name, sizes_per_batch in RECALIBRATIONS.items():
        model = torch.nn.Sequential(_layer({}, synchronized=True))
        with torch.no_grad():  # (statistics of its own, which a recalibration that averages nothing must keep)
            model[0].running_mean.fill_(0.5)
            model[0].running_var.fill_(2.0)
        local = [_local((batch,), sizes, rank)[0]
                 for batch, sizes in zip(_recalibration_batches(sizes_per_batch), sizes_per_batch)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            normkit.recalibrate_running_stats(model, local)
        results[name] = (model[0].state_dict(), [str(warning.message) for warning in caught])
    return results


def _refusal_worker(rank, init_file, out_dir):
    # Its own spawn: a process left waiting in the merge may pair with a peer's later gather of another size, and
    # gloo then aborts it (std::terminate), which must not take the other cases' results with it. The collectives
    # time out fast, so a process left waiting raises instead.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=10))
    try:
        results = {"refusals": _refusals(rank)}
        batches = [_local(_data((3, 5), step)[:2] + (None,), (3, 5), rank) for step in range(STEPS)]
        try:
            results["after_refusals"] = _train(_layer({}, synchronized=True), batches)
        except RuntimeError as error:
            results["after_refusals"] = f"{type(error).__name__}: {error}"
        results["mixed_mask"] = _mixed_mask(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results = {}
        for name, (sizes, options, masked) in CASES.items():
            batches = [_local(_data(sizes, step)[:2] + (_data(sizes, step)[2] if masked else None,), sizes, rank)
                       for step in range(STEPS)]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                results[name] = _train(_layer(options, synchronized=True), batches)
            results[f"{name} warnings"] = [str(warning.message) for warning in caught]
            if name in COMPILED_CASES:
                # Each its own compiled layer: from the second on, Dynamo's polyfill of struct.pack (the merge's
                # settings code) recursed until a RecursionError.
                results[f"compiled {name}"] = _train(_layer(options, synchronized=True), batches, compiled=True)
        # One value per feature over the whole group (rank 0 holds it, rank 1 nothing): both refuse it together,
        # and the collectives below still pair up.
        try:
            _layer({}, synchronized=True)(torch.randn(1 - rank, FEATURES, dtype=torch.float64))
            results["one_value"] = None
        except ValueError as error:
            results["one_value"] = str(error)
        model = normkit.synchronize_batch_norm(_torch_model())
        results["tool_types"] = [type(module) for module in model]
        results["tool"] = _train_model(model, [_local(_data((3, 5), step)[:2], (3, 5), rank) for step in range(STEPS)])
        # Eval never synchronizes: without running statistics each process normalizes its own batch.
        x = _local(_data((3, 5), 0), (3, 5), rank)[0]
        results["eval_local"] = _layer({}, synchronized=True, track_running_stats=False).eval()(x)
        results["copy"] = _copy_of_grouped_model(rank)
        results["penalty"] = _gradient_penalty(_layer({}, synchronized=True), _local(_data((3, 5), 0), (3, 5), rank))
        results["far"] = _far_from_zero(rank)
        try:  # (recorded; the test says what was expected)
            results["transforms"] = _transformed(_layer({}, synchronized=True), _local(_data((3, 5), 0), (3, 5), rank))
        except Exception as error:  # noqa: BLE001
            results["transforms"] = f"{type(error).__name__}: {error}"
        results["recalibrated"] = _recalibrated(rank)
        results["same_bits"] = _same_bits(rank)
        results["spatial"] = _spatial_sizes(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # nobody tears gloo down while a peer still talks to it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gloo")
    spawn_processes(_worker, 2, args=(2, str(folder / "store"), str(folder)), deadline=180)  # (fails, never hangs)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def refusing_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gloo_refusals")
    spawn_processes(_refusal_worker, 2, args=(str(folder / "store"), str(folder)), deadline=120)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]


pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build"),
              pytest.mark.skipif(sys.platform == "win32", reason="gloo file store test runs on POSIX")]


def test_a_rank_with_an_empty_batch_adds_nothing_quietly(ranks):
    """Its statistics are a count of 0 (tested above); torch's var_mean would warn about 0 degrees of freedom."""
    assert ranks[0]["empty_rank warnings"] == [] and ranks[1]["empty_rank warnings"] == []


@pytest.mark.parametrize("name", list(CASES) + [f"compiled {name}" for name in COMPILED_CASES])
def test_two_process_gloo_equals_single_process_on_the_whole_batch(ranks, name):
    sizes, options, masked = CASES[name.removeprefix("compiled ")]
    batches = [_data(sizes, step)[:2] + (_data(sizes, step)[2] if masked else None,) for step in range(STEPS)]
    if "virtual_batch_size" in options:  # strided ghost j of the concatenated batch is every rank's ghost j
        options = {**options, "virtual_batch_size": options["virtual_batch_size"] * len(sizes)}
    single = _layer(options)
    outputs, grads, state = _train(single, batches)
    for step in range(STEPS):
        torch.testing.assert_close(torch.cat([r[name][0][step] for r in ranks]), outputs[step], msg=f"output {step}")
        torch.testing.assert_close(torch.cat([r[name][1][step] for r in ranks]), grads[step], msg=f"grad {step}")
    # Parameter gradients are local (DDP all-reduces them): their sum is the whole batch's.
    torch.testing.assert_close(ranks[0][name][2]["weight_grad"] + ranks[1][name][2]["weight_grad"],
                               state["weight_grad"])
    for r in ranks:
        for key, value in state.items():
            if key != "weight_grad" and key not in ("weight", "bias"):
                torch.testing.assert_close(r[name][2][key], value, msg=key)


def test_one_value_per_feature_over_the_group_is_refused_on_every_process(ranks):
    """One process on the whole batch (and torch.nn.SyncBatchNorm) refuses a single value per feature, whose
    variance is 0; synchronized, it normalized everything to the bias and stored a variance of 0 before."""
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        _layer({})(torch.randn(1, FEATURES, dtype=torch.float64))
    for r in ranks:
        assert r["one_value"] is not None and "Expected more than 1 value per channel when training, got 1 over " \
            "the 2 processes" in r["one_value"]


def test_double_backward_equals_single_process_on_the_whole_batch(ranks):
    """A gradient penalty through a synchronized layer: the sum in the gather's backward is differentiated too. It
    was an in-place all_reduce autograd did not see (torch only warned that c10d::allreduce_ has no autograd
    kernel), and the second derivatives came out wrong."""
    first, x_grad, weight_grad, bias_grad = _gradient_penalty(_layer({}), _data((3, 5), 0))
    torch.testing.assert_close(torch.cat([r["penalty"][0] for r in ranks]), first)
    torch.testing.assert_close(torch.cat([r["penalty"][1] for r in ranks]), x_grad)
    # (parameter gradients are each process's own: their sum is the whole batch's)
    torch.testing.assert_close(ranks[0]["penalty"][2] + ranks[1]["penalty"][2], weight_grad)
    torch.testing.assert_close(ranks[0]["penalty"][3] + ranks[1]["penalty"][3], bias_grad)


def test_torch_func_and_forward_mode_ad_equal_single_process_on_the_whole_batch(ranks):
    """torch.func.grad, forward-mode AD and jvp-of-grad through the merge: the gather and the sum had no
    setup_context nor jvp, and a synchronized layer failed there with torch's message about autograd.Function where
    the unsynchronized layer works. vmap (jacrev, jacfwd) is refused by every process at once, with a message that
    says why (a batched merge would pair lanes of different processes that do not correspond); a vmap over an
    ensemble's weights and buffers does not batch the merge and works."""
    expected = _transformed(_layer({}), _data((3, 5), 0))
    for r in ranks:
        assert not isinstance(r["transforms"], str), r["transforms"]
    (parameter_grads, x_grad) = expected["grad"]
    torch.testing.assert_close(torch.cat([r["transforms"]["grad"][1] for r in ranks]), x_grad)
    for name in ("weight", "bias"):  # (each process's own: their sum is the whole batch's)
        torch.testing.assert_close(sum(r["transforms"]["grad"][0][name] for r in ranks), parameter_grads[name])
    for key in ("forward_ad", "hvp"):
        torch.testing.assert_close(torch.cat([r["transforms"][key] for r in ranks]), expected[key], msg=key)
    assert expected["vmap"] is None
    torch.testing.assert_close(torch.cat([r["transforms"]["ensemble"][0] for r in ranks], dim=1),
                               expected["ensemble"][0])
    for r in ranks:
        for key, value in expected["ensemble"][1].items():
            torch.testing.assert_close(r["transforms"]["ensemble"][1][key], value, msg=key)
    for r in ranks:
        assert r["transforms"]["vmap"] is not None and "cannot run under torch.func.vmap" in r["transforms"]["vmap"]


def test_a_deep_copy_of_a_model_synchronized_over_a_group_shares_the_group(ranks):
    """torch's ProcessGroup cannot be copied: deepcopy of a layer synchronized over a dist.new_group was a TypeError
    ('cannot pickle ProcessGroup'), and so was fold_batch_norm, which folds a copy. The copy shares the group and
    trains as torch.nn's BatchNorm1d on the whole batch in one process; the original is left alone."""
    for r in ranks:
        assert not isinstance(r["copy"], str), r["copy"]
        assert r["copy"]["shared"] == [True] * 4
    single = _torch_model(torch.nn.BatchNorm1d)
    single.load_state_dict(_torch_model().state_dict())
    outputs, grads, state, parameter_grads = _train_model(single, [_data((3, 5), step)[:2] for step in range(STEPS)])
    for step in range(STEPS):
        torch.testing.assert_close(torch.cat([r["copy"]["trained"][0][step] for r in ranks]), outputs[step])
        torch.testing.assert_close(torch.cat([r["copy"]["trained"][1][step] for r in ranks]), grads[step])
    for index, expected in enumerate(parameter_grads):  # (local: their sum is the whole batch's)
        torch.testing.assert_close(ranks[0]["copy"]["trained"][3][index] + ranks[1]["copy"]["trained"][3][index],
                                   expected)
    initial = _torch_model().state_dict()
    for r in ranks:
        for key, value in state.items():
            if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
                torch.testing.assert_close(r["copy"]["trained"][2][key], value, msg=key)
        for key, value in initial.items():  # (the original model did not train)
            torch.testing.assert_close(r["copy"]["original"][key], value, msg=key)
        folded, unfolded, names = r["copy"]["fold"]
        assert names == ["1"]
        torch.testing.assert_close(folded, unfolded)


@pytest.mark.parametrize("name", list(FAR_CASES))
def test_float32_far_from_zero_is_as_exact_as_one_process(ranks, name):
    """Float32 data at mean 1e4, std 1e-2: the outputs and gradients are those of float64 on the same values to
    float32's precision, as one process's are (it recenters). Synchronized layers did not recenter, and the merged mean,
    known only to an ulp of the data (1e-3 here), put 5e-2 into the outputs and 1e0 into the input gradients. A
    process whose rows were all masked out had no centre, and its rows came out 1e-1 off (its peers' gradients 3 off
    through them)."""
    steps, options, masked = FAR_CASES[name]
    if "virtual_batch_size" in options:
        options = {**options, "virtual_batch_size": options["virtual_batch_size"] * 2}
    batches = [tuple(t.double() if t is not None and t.is_floating_point() else t for t in _far_data(sizes, step, masked))
               for step, sizes in enumerate(steps)]
    outputs, grads, state = _train(_layer(options), batches)  # float64
    for step in range(len(steps)):
        got = torch.cat([r["far"][name][0][step] for r in ranks]).double()
        torch.testing.assert_close(got, outputs[step], rtol=1e-5, atol=1e-5, msg=f"output {step}")
        got = torch.cat([r["far"][name][1][step] for r in ranks]).double()
        torch.testing.assert_close(got, grads[step], rtol=1e-5, atol=1e-3, msg=f"grad {step}")
    for r in ranks:
        for key in ("running_mean", "running_var"):
            torch.testing.assert_close(r["far"][name][2][key].double(), state[key], rtol=1e-6, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", list(SAME_BITS))
def test_float32_running_statistics_are_the_same_bits_on_every_process(ranks, name):
    """The merge is the same arithmetic on the same gathered numbers on every process, so every buffer (renorm's
    averages, which set r and d, included) is the same bits everywhere, as torch.nn.SyncBatchNorm's are; merged
    about each process's own centre, float32 buffers came out an ulp apart between the processes."""
    for key, value in ranks[0]["same_bits"][name].items():
        assert torch.equal(ranks[1]["same_bits"][name][key], value), key


def test_eval_never_synchronizes(ranks):
    x = _data((3, 5), 0)[0]
    for rank, r in enumerate(ranks):
        local = _local((x,), (3, 5), rank)[0]
        expected = _layer({}, track_running_stats=False).eval()(local)
        torch.testing.assert_close(r["eval_local"], expected)


def test_synchronize_batch_norm_turns_torch_nn_layers_into_synchronized_ones(ranks):
    """normkit.synchronize_batch_norm on torch.nn.BatchNorm1d and SyncBatchNorm (which torch.nn cannot run on the
    CPU): over 2 gloo processes the model trains as torch.nn's BatchNorm1d on the whole batch in one process."""
    assert ranks[0]["tool_types"] == [normkit.BatchNorm1d, torch.nn.Linear, normkit.BatchNorm]
    single = _torch_model(torch.nn.BatchNorm1d)
    single.load_state_dict(_torch_model().state_dict())
    outputs, grads, state, parameter_grads = _train_model(single, [_data((3, 5), step)[:2] for step in range(STEPS)])
    for step in range(STEPS):
        torch.testing.assert_close(torch.cat([r["tool"][0][step] for r in ranks]), outputs[step], msg=f"output {step}")
        torch.testing.assert_close(torch.cat([r["tool"][1][step] for r in ranks]), grads[step], msg=f"grad {step}")
    for index, expected in enumerate(parameter_grads):  # (local: their sum is the whole batch's)
        torch.testing.assert_close(ranks[0]["tool"][3][index] + ranks[1]["tool"][3][index], expected)
    for r in ranks:
        assert r["tool"][2].keys() == state.keys()
        for key, value in state.items():
            if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
                torch.testing.assert_close(r["tool"][2][key], value, msg=key)


def test_recalibration_leaves_out_the_batches_empty_on_every_process(ranks):
    """recalibrate_running_stats averages the per-batch statistics of the group's batches that hold values (NumPy on
    the concatenated batches). A batch empty on one process only is the peer's batch; one empty on every process
    counted before, and averaged the reset statistics (0/1) in as one more batch; a layer that only such batches
    reached got 0/1 instead of keeping its statistics, and no warning."""
    batches = [batch.numpy() for batch in _recalibration_batches(RECALIBRATIONS["group_empty"]) if len(batch)]
    expected_mean = np.mean([batch.mean(axis=(0, 2)) for batch in batches], axis=0)
    expected_var = np.mean([batch.transpose(1, 0, 2).reshape(FEATURES, -1).var(axis=1, ddof=1) for batch in batches],
                           axis=0)
    for r in ranks:
        state, caught = r["recalibrated"]["group_empty"]
        assert caught == []
        np.testing.assert_allclose(state["running_mean"].numpy(), expected_mean, rtol=1e-12)
        np.testing.assert_allclose(state["running_var"].numpy(), expected_var, rtol=1e-12)
        state, caught = r["recalibrated"]["all_empty"]
        np.testing.assert_array_equal(state["running_mean"].numpy(), np.full(FEATURES, 0.5))
        np.testing.assert_array_equal(state["running_var"].numpy(), np.full(FEATURES, 2.0))
        assert len(caught) == 1 and "no batch reached '0' (BatchNorm)" in caught[0], caught


def test_a_process_refusing_its_input_does_not_leave_its_peers_waiting(refusing_ranks):
    """Process 1 alone gives the layer an input it refuses (another number of features, a batch that is no multiple
    of virtual_batch_size, a mask of another shape, the Keras layer's rank, a Keras mask or array input that is no
    array, a lazy layer's first call, a renorm clipping schedule that fails; eagerly and under torch.compile): it
    raises its own error and process 0, waiting in the merge, gets a ValueError at once (an adjustment whose terms do not fit was refused after the
    merge, and its peer went on, to a backward that paired with process 1's next collective). Before, process 0 waited for the group's timeout (30 minutes
    by default) or its collective paired with process 1's next one and merged statistics of another call."""
    own = {"features": "num_features=4 but", "ghost": "virtual_batch_size=2 must divide",
           "mask": "mask of shape (4, 4) cannot broadcast", "keras_rank": "was built for inputs of rank 3",
           "keras_build": "axis=2 is out of range",
           "adjustment": "adjustment returned a scale of shape (4, 4), which does not broadcast",
           "keras_mask": "expected sequence of length 4",
           "keras_input": "inhomogeneous shape", "lazy_mask": "mask of shape (4, 4) cannot broadcast",
           "compiled_features": "num_features=4 but", "compiled_keras_rank": "was built for inputs of rank 3",
           "schedule": "list index out of range"}
    for name, text in own.items():
        assert refusing_ranks[1]["refusals"][name] is not None and text in refusing_ranks[1]["refusals"][name], name
        error = refusing_ranks[0]["refusals"][name]
        assert error is not None and error.startswith("ValueError"), (name, error)
        assert "another process of the group refused" in error, (name, error)
    # The group still pairs its collectives: a synchronized step afterwards is one process on the whole batch.
    single = _layer({})
    outputs, grads, state = _train(single, [_data((3, 5), step)[:2] + (None,) for step in range(STEPS)])
    for r in refusing_ranks:
        assert not isinstance(r["after_refusals"], str), r["after_refusals"]
    for step in range(STEPS):
        torch.testing.assert_close(torch.cat([r["after_refusals"][0][step] for r in refusing_ranks]), outputs[step])
        torch.testing.assert_close(torch.cat([r["after_refusals"][1][step] for r in refusing_ranks]), grads[step])
    for r in refusing_ranks:
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(r["after_refusals"][2][key], state[key], msg=key)


def test_one_valid_value_under_a_peer_s_mask_is_accepted_on_every_process(refusing_ranks):
    """One valid value per feature over the group, under process 1's mask, while process 0 has no row and passes no
    mask: the group's batch is a masked one, which one process accepts with one valid value. Each process decided
    on its own mask, so process 0 raised the one-value error while process 1 went on and waited for it in the
    backward (the connection closed under it, or its collective paired with process 0's next one)."""
    single = _layer({})
    outputs, grads, state = _train(single, _mixed_mask_batches())
    for rank, r in enumerate(refusing_ranks):
        assert not isinstance(r["mixed_mask"], str), (rank, r["mixed_mask"])
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(r["mixed_mask"][2][key], state[key], msg=f"{rank} {key}")
    torch.testing.assert_close(torch.cat([r["mixed_mask"][0][0] for r in refusing_ranks]), outputs[0])
    torch.testing.assert_close(torch.cat([r["mixed_mask"][1][0] for r in refusing_ranks]), grads[0])
    torch.testing.assert_close(refusing_ranks[0]["mixed_mask"][2]["weight_grad"]
                               + refusing_ranks[1]["mixed_mask"][2]["weight_grad"], state["weight_grad"])


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("layout", [str(torch.contiguous_format), str(torch.channels_last)])
def test_images_of_different_sizes_per_process_equal_the_reference_on_all_positions(ranks, masked, layout):
    """Processes whose images differ in size (multi-scale training) share statistics over every position: the NumPy
    reference in float64 on all positions of both processes side by side (one row, the positions of each channel
    concatenated: batch norm's statistics, output and gradient depend on a channel's positions alone)."""
    parts = _spatial_data()

    def side_by_side(tensors):  # (N, C, H, W) per process -> (1, C, all positions)
        return np.concatenate([t.transpose(0, 1).reshape(FEATURES, -1).numpy() for t in tensors], axis=1)[None]

    x = side_by_side([p[0] for p in parts])
    g = side_by_side([p[1] for p in parts])
    mask = np.concatenate([p[2].reshape(-1).numpy() for p in parts])[None, None] if masked else None
    weight = np.arange(1.0, FEATURES + 1.0)
    running_mean, running_var = np.zeros(FEATURES), np.ones(FEATURES)
    for step in range(STEPS):
        grad_x, grad_w, _ = R.batch_norm_backward(g, x, running_mean, running_var, weight, np.zeros(FEATURES),
                                                  training=True, mask=mask)
        y = R.batch_norm(x, running_mean, running_var, weight, np.zeros(FEATURES), training=True, mask=mask)
        offset = 0
        for rank, (part, r) in enumerate(zip(parts, ranks)):
            outputs, grads, state = r["spatial"][(masked, layout)]
            size = part[0][:, 0].numel()
            for got, want in ((outputs[step], y), (grads[step], grad_x)):
                want = torch.as_tensor(want[0, :, offset:offset + size]).reshape(
                    FEATURES, part[0].shape[0], *part[0].shape[2:]).transpose(0, 1)
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"rank {rank} step {step}")
            offset += size
    got_weight_grad = sum(r["spatial"][(masked, layout)][2]["weight_grad"] for r in ranks)
    # (summed over the processes, as DDP sums it, and over the steps, as _train accumulates it: the same each step)
    torch.testing.assert_close(got_weight_grad, torch.as_tensor(grad_w) * STEPS, rtol=1e-10, atol=1e-10)
    for r in ranks:
        state = r["spatial"][(masked, layout)][2]
        torch.testing.assert_close(state["running_mean"], torch.as_tensor(running_mean), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state["running_var"], torch.as_tensor(running_var), rtol=1e-12, atol=1e-12)
