"""synchronized=True in real gloo groups of 4 processes: DDP training, subgroups, uneven/empty/padded ranks, errors.

One spawn of 4 processes runs every case (processes are the slow part). Ranks 0-1 and 2-3 form two
groups (dist.new_group) that train on different data, so a statistic shared across groups shows. Each
process saves what it saw; the tests replay each group's whole batches in one process (torch.nn's
layers where they apply, else a normkit layer without synchronization) and compare.
"""

import datetime
import os
import sys
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import normkit
import normkit.keras
from oracle import errors_of, spawn_processes

WORLD = 4
GROUPS = ((0, 1), (2, 3))
STEPS = 3
FEATURES = 3


def _group_of(rank):
    return next(index for index, members in enumerate(GROUPS) if rank in members)


# -- DDP training of a small CNN ---------------------------------------------------------------------

# name: (normalization layer of the distributed model, of the single-process one, batch permutation for the
# single process or None). Each group's batch is 8 images, 4 per process.
def _keras(channels, **options):
    layer = normkit.keras.BatchNormalization(axis=1, **options)
    layer.build((8, channels, 6, 6))
    return layer


def _contiguous_ghost_order(batch=8, processes=2, virtual=2):
    # Ghost j of the union is every process's ghost j (processes' contiguous ghosts of `virtual` rows): in
    # this order of the whole batch, the union's ghost j is contiguous ghost j of virtual * processes rows.
    local = batch // processes
    return [p * local + j * virtual + i for j in range(local // virtual) for p in range(processes)
            for i in range(virtual)]


DDP_CASES = {
    "torch_nn_oracle": (lambda c, g: normkit.BatchNorm2d(c, synchronized=True, process_group=g),
                        lambda c: nn.BatchNorm2d(c), None),
    "keras": (lambda c, g: _keras(c, synchronized=True, process_group=g), lambda c: _keras(c), None),
    "renorm": (lambda c, g: normkit.BatchNorm2d(c, renorm=True, renorm_clipping={"rmax": 1.2, "dmax": 0.3},
                                                synchronized=True, process_group=g),
               lambda c: normkit.BatchNorm2d(c, renorm=True, renorm_clipping={"rmax": 1.2, "dmax": 0.3}), None),
    # Strided ghost j of each process's 4 rows (rows j, j + 2) with the other process's: strided ghost j of
    # the 8 concatenated rows with virtual_batch_size 4.
    "ghost_strided": (lambda c, g: normkit.BatchNorm2d(c, virtual_batch_size=2, synchronized=True, process_group=g),
                      lambda c: normkit.BatchNorm2d(c, virtual_batch_size=4), None),
    "ghost_contiguous": (lambda c, g: normkit.BatchNorm2d(c, virtual_batch_size=2, ghost_layout="contiguous",
                                                          synchronized=True, process_group=g),
                         lambda c: normkit.BatchNorm2d(c, virtual_batch_size=4, ghost_layout="contiguous"),
                         _contiguous_ghost_order()),
}


def _cnn(norm):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), norm(4), nn.ReLU(), nn.Conv2d(4, 3, 3), norm(3),
                         nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).double()


def _images(group, step):
    generator = torch.Generator().manual_seed(100 * group + step)
    x = torch.randn(8, 2, 6, 6, generator=generator, dtype=torch.float64) * (1 + group) + group
    target = torch.randn(8, 2, generator=generator, dtype=torch.float64)
    return x, target


def _fit(model, batches, scale=1.0):
    """SGD with momentum on mean-squared-error means (DDP averages the processes' gradients: equal halves), each
    loss times ``scale``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, target in batches:
        optimizer.zero_grad()
        (scale * nn.functional.mse_loss(model(x), target)).backward()
        optimizer.step()
    return model


def _ddp_case(name, rank, group):
    norm = DDP_CASES[name][0]
    index, local = _group_of(rank), rank % 2
    rows = slice(4 * local, 4 * local + 4)
    # broadcast_buffers=False: each process keeps its own running statistics, which must agree by themselves.
    model = DistributedDataParallel(_cnn(lambda c: norm(c, group)), process_group=group, broadcast_buffers=False)
    _fit(model, [tuple(t[rows] for t in _images(index, step)) for step in range(STEPS)])
    model.eval()  # running statistics: each process's rows normalized alone
    with torch.no_grad():
        evaluated = model(_images(index, STEPS)[0][rows])
    return {"state": model.module.state_dict(), "eval": evaluated}


# Each group's 8 images split unevenly between its two processes.
UNEVEN_ROWS = (3, 5)


def _ddp_uneven_case(rank, group):
    """DDP with uneven local batches, each process's mean loss scaled by the number of processes times its share
    of the group's batch (docs/decisions.md): DDP's average of the gradients is then the whole batch's mean loss's."""
    local = rank % 2
    start = sum(UNEVEN_ROWS[:local])
    rows = slice(start, start + UNEVEN_ROWS[local])
    norm = DDP_CASES["torch_nn_oracle"][0]
    model = DistributedDataParallel(_cnn(lambda c: norm(c, group)), process_group=group, broadcast_buffers=False)
    _fit(model, [tuple(t[rows] for t in _images(_group_of(rank), step)) for step in range(STEPS)],
         scale=len(UNEVEN_ROWS) * UNEVEN_ROWS[local] / sum(UNEVEN_ROWS))
    return model.module.state_dict()


def _ddp_oracle(name, group):
    _, norm, order = DDP_CASES[name]
    batches = [_images(group, step) for step in range(STEPS)]
    if order is not None:  # (the loss is a mean over rows: a permutation of the batch changes nothing else)
        batches = [tuple(t[order] for t in batch) for batch in batches]
    model = _fit(_cnn(norm), batches).eval()
    with torch.no_grad():
        evaluated = model(_images(group, STEPS)[0])
    return {"state": model.state_dict(), "eval": evaluated}


# -- layer cases in the world of 4 (process_group=None) and in the two groups -------------------------

# name: (local batch sizes of the 4 processes, layer options, mask rule, dtype, in the two groups).
# mask rule: None, "random", or "rank1_padding" (every position of process 1 is padding), "all_padding".
LAYER_CASES = {
    "uneven_empty": ((0, 3, 5, 2), {}, None, torch.float64, False),
    "padding_rank": ((2, 3, 5, 2), {}, "rank1_padding", torch.float64, False),
    "padding_rank_renorm": ((2, 3, 5, 2), {"renorm": True, "renorm_clipping": {"rmax": 1.5, "dmax": 0.5}},
                            "rank1_padding", torch.float64, False),
    "all_padding": ((2, 3, 5, 2), {}, "all_padding", torch.float64, False),
    "empty_and_masked": ((0, 4, 1, 3), {}, "random", torch.float64, False),
    "ghost_four": ((4, 4, 4, 4), {"virtual_batch_size": 2}, None, torch.float64, False),
    "float16": ((3, 5, 2, 6), {}, None, torch.float16, False),
    "bfloat16": ((3, 5, 2, 6), {}, "random", torch.bfloat16, False),
    "subgroups": ((3, 5, 6, 1), {}, None, torch.float64, True),
    "subgroups_masked": ((3, 5, 6, 1), {"momentum": None}, "random", torch.float64, True),
}


def _layer_data(name, step):
    sizes, _, rule, dtype, _ = LAYER_CASES[name]
    generator = torch.Generator().manual_seed(1000 + 10 * list(LAYER_CASES).index(name) + step)
    shape = (sum(sizes), FEATURES, 4)
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * 3 + 2).to(dtype)
    g = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    mask = None
    if rule is not None:
        mask = torch.rand((shape[0], shape[2]), generator=generator) > 0.3
        if rule == "rank1_padding":
            mask[sizes[0]:sum(sizes[:2])] = False
        elif rule == "all_padding":
            mask[:] = False
    return x, g, mask


def _layer(options, dtype, **extra):
    # Half-precision inputs meet float32 parameters and buffers (the mixed-precision setting).
    layer = normkit.BatchNorm(FEATURES, **options, **extra).to(torch.float64 if dtype == torch.float64
                                                                   else torch.float32)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, FEATURES + 1.0))
        layer.bias.copy_(torch.linspace(-0.5, 0.5, FEATURES))
    return layer


def _slice(batch, start, size):
    return tuple(None if t is None else t[start:start + size] for t in batch)


def _steps(layer, batches, call=None):
    outputs, grads = [], []
    for x, g, mask in batches:
        x = x.clone().requires_grad_()
        y = layer(x, mask=mask) if call is None else call(x)
        y.backward(g)
        outputs.append(y.detach())
        grads.append(x.grad)
    return {"outputs": outputs, "grads": grads, "weight_grad": layer.weight.grad, "bias_grad": layer.bias.grad,
            "state": layer.state_dict()}


def _layer_case(name, rank, groups):
    sizes, options, _, dtype, grouped = LAYER_CASES[name]
    start = sum(sizes[:rank])
    layer = _layer(options, dtype, synchronized=True, process_group=groups[_group_of(rank)] if grouped else None)
    return _steps(layer, [_slice(_layer_data(name, step), start, sizes[rank]) for step in range(STEPS)])


# -- float32 data far from zero in the world of 4 -----------------------------------------------------

# name: (local batch sizes of the 4 processes at each step, mask rule). Mean 1e4, std 1e-2; the oracle is float64 on
# the same float32 values. "one_valid": process 0's single row has one valid position per feature.
FAR_CASES = {
    # Process 0 holds nothing: the peers' means (at different centres) merged about zero on it.
    "empty_process": (((0, 4, 4, 4), (0, 3, 5, 2)), None),
    # Empty first, then data: its own recentering check had found nothing to look at.
    "empty_first": (((0, 4, 4, 4), (4, 4, 4, 4)), None),
    # No spread on process 0 (its check sees none, so it did not recenter), while the union has some.
    "no_local_spread": (((1, 4, 4, 4), (1, 4, 4, 4)), "one_valid"),
}


def _far_layer_data(name, step):
    sizes, rule = FAR_CASES[name][0][step], FAR_CASES[name][1]
    generator = torch.Generator().manual_seed(2000 + 10 * list(FAR_CASES).index(name) + step)
    shape = (sum(sizes), FEATURES, 4)
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * 1e-2 + 1e4).float()
    g = torch.randn(shape, generator=generator, dtype=torch.float64).float()
    mask = None
    if rule == "one_valid":
        mask = torch.rand((shape[0], shape[2]), generator=generator) > 0.3
        mask[0] = torch.tensor([True, False, False, False])
    return x, g, mask


def _far_case(name, rank):
    steps = FAR_CASES[name][0]
    layer = _layer({"momentum": None}, torch.float32, synchronized=True)
    return _steps(layer, [_slice(_far_layer_data(name, step), sum(sizes[:rank]), sizes[rank])
                          for step, sizes in enumerate(steps)])


# -- what must fail, and what must not communicate ---------------------------------------------------

def _disagreements(rank):
    """Calls where the processes disagree; every process records the error it got (all must raise)."""
    x = torch.randn(4, FEATURES, 2, dtype=torch.float64)
    transposed = (3, 2) if rank == 1 else (2, 3)
    calls = {
        "features": lambda: normkit.BatchNorm(FEATURES + (rank == 3), synchronized=True).double()(
            torch.randn(4, FEATURES + (rank == 3), 2, dtype=torch.float64)),
        "dtype": lambda: normkit.BatchNorm(FEATURES, synchronized=True).to(
            torch.float32 if rank == 2 else torch.float64)(x.to(torch.float32 if rank == 2 else torch.float64)),
        "ghost_uneven": lambda: normkit.BatchNorm(FEATURES, virtual_batch_size=2, synchronized=True).double()(
            torch.randn(6 if rank == 1 else 4, FEATURES, 2, dtype=torch.float64)),
        "ghost_empty_rank": lambda: normkit.BatchNorm(FEATURES, virtual_batch_size=2, synchronized=True).double()(
            torch.randn(0 if rank == 0 else 4, FEATURES, 2, dtype=torch.float64)),
        # Statistics of shape (1, 2, 3, 1) here and (1, 3, 2, 1) on process 1: the same rank and number of values.
        "transposed": lambda: normkit.BatchNorm(transposed, axis=(1, 2), synchronized=True).double()(
            torch.randn(4, *transposed, 2, dtype=torch.float64)),
        # Statistics of one shape, settings that differ on process 1 (each merged silently before)
        "ghost_layout": lambda: normkit.BatchNorm(FEATURES, virtual_batch_size=2, synchronized=True,
                                                  ghost_layout="contiguous" if rank == 1 else "strided").double()(x),
        "eps": lambda: normkit.BatchNorm(FEATURES, eps=1e-3 if rank == 1 else 1e-5, synchronized=True).double()(x),
        "renorm": lambda: normkit.BatchNorm(FEATURES, renorm=rank == 1, synchronized=True).double()(x),
        "running_variance_rule": lambda: normkit.BatchNorm(FEATURES, unbiased_running_var=rank != 1,
                                                           synchronized=True).double()(x),
    }
    return errors_of(calls)


def _quiet_checks(rank, quiet, impatient):
    """Process 0 alone calls layers that must not communicate, on a group whose collectives time out fast:
    a collective there would raise (recorded) instead of passing."""
    if rank != 0:
        return {}
    x = torch.randn(6, FEATURES, 2, dtype=torch.float64)
    seen = {"input": x}
    layer = _layer({}, torch.float64, synchronized=True, process_group=quiet)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        layer.running_var.copy_(torch.tensor([2.0, 0.5, 3.0]))
    for label, call in {"eval": lambda: layer.eval()(x), "frozen": lambda: layer.train().freeze()(x)}.items():
        try:
            seen[label] = (call().detach(), layer.state_dict())
        except Exception as error:  # noqa: BLE001
            seen[label] = f"{type(error).__name__}: {error}"
    keras = normkit.keras.BatchNormalization(axis=1, synchronized=True, process_group=quiet)
    keras.build(tuple(x.shape))
    keras.double()
    for label, call in {"keras_inference": lambda: keras(x, training=False),
                        "keras_not_trainable": lambda: setattr(keras, "trainable", False) or keras(x, training=True)
                        }.items():
        try:
            seen[label] = call().detach()
        except Exception as error:  # noqa: BLE001
            seen[label] = f"{type(error).__name__}: {error}"
    return seen


def _train_eval_disagreement(rank, impatient):
    """Process 0 trains, process 1 evaluates, on a group with a 2 s timeout: process 0 must get an error."""
    if rank not in (0, 1):
        return None
    layer = normkit.BatchNorm(FEATURES, synchronized=True, process_group=impatient)
    if rank == 1:
        layer.eval()
    try:
        layer(torch.randn(4, FEATURES, 2))
        return None
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {error}"


def _outsider(rank, groups):
    """Processes 2 and 3 train a layer synchronized over the group of processes 0 and 1, which they are not members
    of: each normalizes its own batch (as torch.nn.SyncBatchNorm does) and says why, once."""
    if _group_of(rank) == 0:
        return None
    layer = _layer({}, torch.float64, synchronized=True, process_group=groups[0])
    x = torch.randn(5, FEATURES, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [layer(x).detach() for _ in range(2)]
    return {"input": x, "outputs": outputs, "state": layer.state_dict(),
            "warnings": [str(warning.message) for warning in caught]}


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {"failures": {}}
    try:
        # Every process creates every group, in the same order (torch.distributed's rule).
        groups = [dist.new_group(list(members)) for members in GROUPS]
        quiet = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=5))
        impatient = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=2))
        for name in DDP_CASES:
            results[f"ddp/{name}"] = _ddp_case(name, rank, groups[_group_of(rank)])
        results["ddp/uneven"] = _ddp_uneven_case(rank, groups[_group_of(rank)])
        for name in LAYER_CASES:
            results[f"layer/{name}"] = _layer_case(name, rank, groups)
        for name in FAR_CASES:
            results[f"far/{name}"] = _far_case(name, rank)
        results["outsider"] = _outsider(rank, groups)
        results["disagreements"] = _disagreements(rank)
        # The world group still works after the refusals (every process raised before the gather).
        results["layer/after_errors"] = _layer_case("uneven_empty", rank, groups)
        results["quiet"] = _quiet_checks(rank, quiet, impatient)
        results["train_eval"] = _train_eval_disagreement(rank, impatient)
        dist.barrier()  # (on the world group: the timed-out group is not used again)
    except Exception:  # noqa: BLE001 (saved, so the test shows it rather than a bare exit code)
        results["failures"]["worker"] = traceback.format_exc()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gloo4")
    spawn_processes(_worker, WORLD, args=(str(folder / "store"), str(folder)), deadline=240)
    results = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for rank, r in enumerate(results):
        assert not r["failures"], f"process {rank}: {r['failures']}"
    return results


pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build"),
              pytest.mark.skipif(sys.platform == "win32", reason="gloo file store test runs on POSIX")]


@pytest.mark.parametrize("name", list(DDP_CASES))
def test_ddp_training_equals_one_process_on_the_whole_batches(ranks, name):
    for group, members in enumerate(GROUPS):
        expected = _ddp_oracle(name, group)
        for rank in members:
            state = ranks[rank][f"ddp/{name}"]["state"]
            assert list(state) == list(expected["state"])
            for key, value in expected["state"].items():
                torch.testing.assert_close(state[key], value, msg=f"group {group} rank {rank} {key}")
        evaluated = torch.cat([ranks[rank][f"ddp/{name}"]["eval"] for rank in members])
        torch.testing.assert_close(evaluated, expected["eval"], msg=f"group {group} eval")


def test_ddp_training_on_uneven_local_batches_with_the_documented_loss_scale(ranks):
    """The recipe docs/decisions.md gives for uneven local batches: each process's mean loss times the number of
    processes times its share of the batch. (It said "by its share" alone, which trains on the whole batch's mean
    loss divided by the number of processes: DDP averages, and the merge's gradient already sums over them.)"""
    for group, members in enumerate(GROUPS):
        expected = _ddp_oracle("torch_nn_oracle", group)["state"]
        for rank in members:
            for key, value in expected.items():
                torch.testing.assert_close(ranks[rank]["ddp/uneven"][key], value, msg=f"group {group} rank {rank} {key}")


def _layer_oracle(name, batches, processes, dtype=None):
    _, options, _, case_dtype, _ = LAYER_CASES[name]
    dtype = dtype or case_dtype
    if "virtual_batch_size" in options:  # strided ghost j of the concatenated batch is every process's ghost j
        options = {**options, "virtual_batch_size": options["virtual_batch_size"] * processes}
    if options or any(mask is not None for _, _, mask in batches) or dtype != torch.float64:
        return _steps(_layer(options, dtype), batches)
    # torch.nn's layer on the whole batch (what torch.nn.SyncBatchNorm computes), from the same parameters.
    layer = nn.BatchNorm1d(FEATURES).double()
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, FEATURES + 1.0))
        layer.bias.copy_(torch.linspace(-0.5, 0.5, FEATURES))
    return _steps(layer, batches, call=layer)


@pytest.mark.parametrize("name", list(LAYER_CASES) + ["after_errors"])
def test_layer_statistics_shared_by_the_group_only(ranks, name):
    case = "uneven_empty" if name == "after_errors" else name
    sizes, _, _, _, grouped = LAYER_CASES[case]
    pools = GROUPS if grouped else (tuple(range(WORLD)),)
    for members in pools:
        first = sum(sizes[:members[0]])
        batches = [_slice(_layer_data(case, step), first, sum(sizes[r] for r in members)) for step in range(STEPS)]
        expected = _layer_oracle(case, batches, len(members))
        got = [ranks[r][f"layer/{name}"] for r in members]
        for step in range(STEPS):
            torch.testing.assert_close(torch.cat([r["outputs"][step] for r in got]), expected["outputs"][step],
                                       msg=f"{members} output {step}")
            torch.testing.assert_close(torch.cat([r["grads"][step] for r in got]), expected["grads"][step],
                                       msg=f"{members} input gradient {step}")
        # Parameter gradients are each process's own (DDP sums or averages them): their sum is the whole batch's.
        for key in ("weight_grad", "bias_grad"):
            torch.testing.assert_close(sum(r[key] for r in got), expected[key], msg=f"{members} {key}")
        for r in got:
            assert list(r["state"]) == list(expected["state"])
            for key, value in expected["state"].items():
                torch.testing.assert_close(r["state"][key], value, msg=f"{members} {key}")


@pytest.mark.parametrize("name", list(FAR_CASES))
def test_float32_far_from_zero_whatever_each_process_holds(ranks, name):
    """Float32 data at mean 1e4, std 1e-2: every process's outputs, input gradients and running statistics are
    those of float64 on the same values to float32's precision, whatever its own rows say. A process with nothing
    (empty, or empty at its first step) or without spread of its own (one valid value per feature) did not
    recenter, or merged its peers' means about zero: outputs 6e-2 off, input gradients 1e1, and running variances
    2e-2 off (and unlike the peers')."""
    batches = [tuple(None if t is None else t.double() if t.is_floating_point() else t
                     for t in _far_layer_data(name, step)) for step in range(len(FAR_CASES[name][0]))]
    expected = _steps(_layer({"momentum": None}, torch.float64), batches)
    for step in range(len(batches)):
        got = torch.cat([r[f"far/{name}"]["outputs"][step] for r in ranks]).double()
        torch.testing.assert_close(got, expected["outputs"][step], rtol=1e-5, atol=1e-5, msg=f"output {step}")
        got = torch.cat([r[f"far/{name}"]["grads"][step] for r in ranks]).double()
        torch.testing.assert_close(got, expected["grads"][step], rtol=1e-5, atol=1e-3, msg=f"input gradient {step}")
    for rank, r in enumerate(ranks):
        state = r[f"far/{name}"]["state"]
        assert bool((state["running_var"] >= 0).all()), rank
        torch.testing.assert_close(state["running_var"].double(), expected["state"]["running_var"], rtol=1e-3, atol=0,
                                   msg=f"process {rank} running_var")
        torch.testing.assert_close(state["running_mean"].double(), expected["state"]["running_mean"], rtol=1e-6,
                                   atol=0, msg=f"process {rank} running_mean")


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_half_precision_statistics_are_merged_in_float32(ranks, name):
    # The float32 running statistics match those of the same (exactly widened) values in float64 to float32's
    # tolerance: statistics or a merge in half precision would be off by ~1e-3 (bfloat16: ~1e-2).
    batches = [tuple(t if t is None or not t.is_floating_point() else t.double() for t in
                     _layer_data(name, step)) for step in range(STEPS)]
    expected = _layer_oracle(name, batches, WORLD, dtype=torch.float64)["state"]
    for rank, r in enumerate(ranks):
        assert r[f"layer/{name}"]["outputs"][0].dtype == LAYER_CASES[name][3]
        for key in ("running_mean", "running_var"):
            assert r[f"layer/{name}"]["state"][key].dtype == torch.float32
            torch.testing.assert_close(r[f"layer/{name}"]["state"][key], expected[key].float(), msg=f"{rank} {key}")


def test_a_process_outside_the_layer_s_group_normalizes_its_batch_and_says_why(ranks):
    """Its batch alone, as torch.nn.BatchNorm1d on it (torch.nn.SyncBatchNorm's rule for a non-member), with one
    warning naming the cause: it said no process group was initialized, while one was, without this process."""
    for rank in (2, 3):
        seen = ranks[rank]["outsider"]
        oracle = nn.BatchNorm1d(FEATURES).double()
        with torch.no_grad():
            oracle.weight.copy_(torch.arange(1.0, FEATURES + 1.0))
            oracle.bias.copy_(torch.linspace(-0.5, 0.5, FEATURES))
        for output in seen["outputs"]:
            torch.testing.assert_close(output, oracle(seen["input"]), msg=f"process {rank}")
        for key, value in oracle.state_dict().items():
            torch.testing.assert_close(seen["state"][key], value, msg=f"process {rank} {key}")
        assert len(seen["warnings"]) == 1, seen["warnings"]
        assert f"on process {rank}, which is not a member of the layer's process_group" in seen["warnings"][0], \
            seen["warnings"]


@pytest.mark.parametrize("name", ["features", "dtype", "ghost_uneven", "ghost_empty_rank", "transposed",
                                  "ghost_layout", "eps", "renorm", "running_variance_rule"])
def test_disagreeing_processes_all_get_a_clear_error(ranks, name):
    # Without the check, gloo aborted one process (std::terminate) and gave the others garbage statistics.
    for rank, r in enumerate(ranks):
        error = r["disagreements"][name]
        assert error is not None and error.startswith("ValueError") and "disagree" in error, (rank, error)


def test_eval_and_frozen_layers_do_not_communicate(ranks):
    seen = dict(ranks[0]["quiet"])
    x = seen.pop("input")
    assert set(seen) == {"eval", "frozen", "keras_inference", "keras_not_trainable"}
    for label, value in seen.items():
        assert not isinstance(value, str), f"{label}: {value}"  # (a collective would have timed out)
    # torch.nn's layer in eval, with the same parameters and running statistics.
    for label in ("eval", "frozen"):
        y, state = seen[label]
        assert int(state["num_batches_tracked"]) == 0  # (nothing was updated)
        oracle = nn.BatchNorm1d(FEATURES).double()
        oracle.load_state_dict(state)
        torch.testing.assert_close(y, oracle.eval()(x), msg=label)
    # The Keras layer's initial moving statistics (0 and 1) and epsilon (1e-3).
    oracle = nn.BatchNorm1d(FEATURES, eps=1e-3).double().eval()
    for label in ("keras_inference", "keras_not_trainable"):
        torch.testing.assert_close(seen[label], oracle(x), msg=label)


def test_a_process_training_alone_gets_the_group_timeout_error(ranks):
    # Process 1 evaluates (no collective) while process 0 trains: process 0 waits for a peer that never
    # comes, and the group's timeout (2 s here; torch's default is 30 min for gloo) ends the wait with an error.
    assert ranks[1]["train_eval"] is None
    error = ranks[0]["train_eval"]
    assert error is not None and error.startswith("RuntimeError"), error


def test_torch_nn_syncbatchnorm_refuses_cpu_inputs():
    # Why the CPU oracle above is torch.nn's layer on the whole batch: torch.nn.SyncBatchNorm's own
    # kernels (batch_norm_stats, batch_norm_gather_stats_with_counts, ...) exist for GPUs only.
    with pytest.raises(NotImplementedError):
        torch.batch_norm_stats(torch.randn(4, FEATURES, 2), 1e-5)
