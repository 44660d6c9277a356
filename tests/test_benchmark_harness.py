"""The benchmark harness's arithmetic (timing, medians, ratios, IQRs, verdicts, units, byte counts) on controlled inputs: the smoke runs cannot see a wrong number."""

import statistics
import sys
import types
from collections import Counter

import numpy as np
import pytest
import torch

from benchmark_scripts import BENCHMARKS, load_script as _load


sys.path.insert(0, str(BENCHMARKS))
try:
    import common  # (the module the scripts import: they find it in sys.modules)
finally:
    sys.path.remove(str(BENCHMARKS))


@pytest.fixture(autouse=True)
def _threads_restored():
    """The scripts' main() sets torch's thread count (--threads, default 1) for the whole process: put it back, or
    every later test in the session runs single-threaded (ATen's float32 sums then round differently)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class Clock:
    """A virtual perf_counter: contenders advance it by their cost; ``queue`` models asynchronous (GPU) work
    that only a synchronize bills."""

    def __init__(self):
        self.now, self.pending, self.log = 0.0, 0.0, []

    def __call__(self):
        return self.now

    def synchronize(self, *args):
        self.now += self.pending
        self.pending = 0.0
        self.log.append("sync")


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(common.time, "perf_counter", clock)
    return clock


def contender(clock, name, costs, asynchronous=False):
    """A callable costing ``costs(call_index)`` seconds of virtual time, logged under ``name``."""
    count = [0]

    def call():
        cost = costs(count[0])
        count[0] += 1
        clock.log.append(name)
        if asynchronous:
            clock.pending += cost
        else:
            clock.now += cost
    return call


# --- statistics helpers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 2, 5, 8, 31])
def test_quantile_is_numpy_s_linear_percentile(size):
    values = list(np.random.default_rng(size).lognormal(size=size))
    for q in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
        assert common.quantile(values, q) == pytest.approx(np.percentile(values, 100 * q))
    assert np.isnan(common.quantile([], 0.5))


def test_comparison_ratio_is_the_median_of_paired_ratios_with_their_iqr():
    rng = np.random.default_rng(0)
    a, b = list(rng.lognormal(size=9)), list(rng.lognormal(size=9))
    result = common.Comparison({"a": 0.0, "b": 0.0}, {"a": a, "b": b}, 9, 1)
    paired = np.array(a) / np.array(b)
    assert result.paired("a", "b") == pytest.approx(list(paired))
    assert result.ratio("a", "b") == pytest.approx(np.median(paired))
    assert result.ratio_iqr("a", "b") == pytest.approx(tuple(np.percentile(paired, [25, 75])))
    # The median of paired ratios, not the ratio of medians.
    assert result.ratio("a", "b") != pytest.approx(np.median(a) / np.median(b))


def test_fmt_us_units():
    cases = {3.4e-7: "0 µs", 2.4e-6: "2 µs", 999.4e-6: "999 µs", 1.0e-3: "1.00 ms", 1.234e-3: "1.23 ms",
             9.994e-3: "9.99 ms", 10.0e-3: "10.0 ms", 12.34e-3: "12.3 ms", 1.5: "1,500.0 ms"}
    assert {seconds: common.fmt_us(seconds) for seconds in cases} == cases
    assert common.fmt_ratio(1.23456) == "1.235" and common.fmt_ratio(None) == "n/a"
    assert common.fmt_ratio(float("nan")) == "n/a"


# --- compare on a virtual clock --------------------------------------------------------------------------------

def test_compare_times_per_call_medians_and_paired_ratios(clock):
    rng = np.random.default_rng(3)
    jitter = rng.uniform(0.8, 1.25, size=10_000)
    jitter[:5] = jitter[-5:] = 1.0  # warm-up and the single calls that set the calls per sample
    contenders = {"fast": contender(clock, "fast", lambda i: 1e-3 * jitter[i]),
                  "slow": contender(clock, "slow", lambda i: 3e-3 * jitter[-1 - i])}
    result = common.compare(contenders, budget_s=0.0, min_rounds=11, warmup=2)
    assert result.rounds == 11 and len(result.samples["fast"]) == len(result.samples["slow"]) == 11
    assert result.calls_per_sample == 4  # ceil(sample_s / fastest single call), 4 ms
    for name, base in (("fast", 1e-3), ("slow", 3e-3)):
        # per-call seconds (a sample's total over its calls), each between the cheapest and dearest call
        assert all(0.8 * base <= t <= 1.25 * base for t in result.samples[name]), name
        assert len(set(result.samples[name])) > 5  # (varied samples: a median differs from mean and min)
        assert result.medians[name] == statistics.median(result.samples[name])
    paired = np.array(result.samples["slow"]) / np.array(result.samples["fast"])
    assert result.ratio("slow", "fast") == pytest.approx(np.median(paired))
    assert 2.0 < result.ratio("slow", "fast") < 4.5


def test_compare_interleaves_contenders_and_rotates_who_goes_first(clock):
    names = ["a", "b", "c"]
    contenders = {name: contender(clock, name, lambda i: 1e-3) for name in names}
    result = common.compare(contenders, budget_s=0.0, min_rounds=9, warmup=1)
    calls = result.calls_per_sample
    timed = clock.log[len(names) * (1 + 3):]  # after the warm-up and the three single calls of each
    samples = [timed[i] for i in range(0, len(timed), calls)]
    assert all(timed[i:i + calls] == [timed[i]] * calls for i in range(0, len(timed), calls))
    rounds = [samples[i:i + len(names)] for i in range(0, len(samples), len(names))]
    assert len(rounds) == 9 and all(sorted(r) == names for r in rounds)  # every round: each contender once
    firsts = [r[0] for r in rounds]
    assert {name: firsts.count(name) for name in names} == {"a": 3, "b": 3, "c": 3}


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 6])
def test_round_orders_balance_who_goes_first_and_who_follows_whom(count):
    orders = common.round_orders(count)
    assert all(sorted(order) == list(range(count)) for order in orders)
    firsts = [order[0] for order in orders]
    assert all(firsts.count(position) == firsts.count(0) for position in range(count))
    follows = Counter(pair for order in orders for pair in zip(order, order[1:]))
    if count > 1:
        assert set(follows) == {(a, b) for a in range(count) for b in range(count) if a != b}
        assert len(set(follows.values())) == 1  # (every ordered pair adjacent equally often)


def test_a_contender_that_slows_the_next_one_bills_each_neighbour_alike(clock):
    """'big' leaves the caches cold: whoever runs right after it takes 1.5x. Balanced orders put each of the three
    others behind it equally often, so their paired ratios keep their true values (a plain rotation billed one of
    them every round: 'c / a' read 1.25 there, one cold call in each sample of two)."""
    previous = []

    def slowed(name, seconds):
        def cost(i):
            cold = previous and previous[-1] == "big"
            previous.append(name)
            return seconds * (1.5 if cold else 1.0)
        return contender(clock, name, cost)
    contenders = {name: slowed(name, seconds) for name, seconds in (("a", 1e-3), ("b", 1e-3), ("big", 8e-3),
                                                                      ("c", 1e-3))}
    result = common.compare(contenders, budget_s=0.0, min_rounds=40, warmup=1)
    for name in ("b", "c"):
        assert result.ratio(name, "a") == pytest.approx(1.0)


def test_compare_pairs_cancel_drift_in_the_machine_s_load(clock):
    """The load triples halfway through: paired ratios stay the true 2.0 (all of A, then all of B would not)."""
    load = lambda: 1.0 if clock.now < 0.25 else 3.0  # noqa: E731
    contenders = {"a": contender(clock, "a", lambda i: 1e-3 * load()),
                  "b": contender(clock, "b", lambda i: 2e-3 * load())}
    result = common.compare(contenders, budget_s=0.0, min_rounds=41, warmup=1)
    assert result.ratio("b", "a") == pytest.approx(2.0)
    assert result.ratio_iqr("b", "a") == pytest.approx((2.0, 2.0))


def test_compare_warms_up_before_it_times(clock):
    """The first calls are cold (50x): warm-up takes them, so neither the calls per sample nor a sample sees them."""
    contenders = {"a": contender(clock, "a", lambda i: 50e-3 if i < 5 else 1e-3),
                  "b": contender(clock, "b", lambda i: 1e-3)}
    result = common.compare(contenders, budget_s=0.0, min_rounds=5, warmup=5)
    assert result.calls_per_sample == 4
    assert result.samples["a"] == pytest.approx([1e-3] * 5)


def test_compare_waits_for_the_device_on_cuda(clock, monkeypatch):
    """GPU work is asynchronous: only torch.cuda.synchronize, before and after every sample, bills it."""
    monkeypatch.setattr(torch.cuda, "synchronize", clock.synchronize)
    contenders = {"a": contender(clock, "a", lambda i: 1e-3, asynchronous=True),
                  "b": contender(clock, "b", lambda i: 2e-3, asynchronous=True)}
    result = common.compare(contenders, budget_s=0.0, min_rounds=5, warmup=2, device="cuda")
    assert result.samples["a"] == pytest.approx([1e-3] * 5)
    assert result.samples["b"] == pytest.approx([2e-3] * 5)
    assert result.ratio("b", "a") == pytest.approx(2.0)


# --- the scripts' rows and tables --------------------------------------------------------------------------------

def fake_compare(samples):
    """A stand-in for common.compare returning ``samples`` (name -> per-round seconds) for whatever it is given."""
    def compare(contenders, **options):
        assert set(samples) == set(contenders), sorted(contenders)
        medians = {name: statistics.median(values) for name, values in samples.items()}
        return common.Comparison(medians, {k: list(v) for k, v in samples.items()}, len(samples["normkit"]), 1)
    return compare


def test_bench_batchnorm_row_is_normkit_over_torch_nn_and_its_verdict(monkeypatch):
    bench = _load("bench_batchnorm.py")
    monkeypatch.setattr(bench, "compare", fake_compare({"normkit": [3e-6, 2e-6, 4e-6], "torch.nn": [1e-6] * 3}))
    [train, infer, *_] = bench.run(types.SimpleNamespace(only="(64,120)", device="cpu", budget=0.0, min_rounds=3))
    assert (train["ratio"], train["q1"], train["q3"]) == pytest.approx((3.0, 2.5, 3.5))
    assert train["normkit"] == 3e-6 and train["torch.nn"] == 1e-6 and infer["mode"] == "infer"
    rows = [dict(train, ratio=r, q1=q1, q3=q3, permuted_ratio=p) for r, q1, q3, p in
            [(1.04, 1.10, 1.20, 1.10), (1.05, 1.0, 1.1, None), (1.06, 1.0, 1.04, 0.9)]]
    lines = bench.table(rows).splitlines()[2:]
    assert [line.split("|")[8].strip() for line in lines] == ["yes", "yes", "**no**"]
    assert lines[0].split("|")[7].strip() == "1.100-1.200" and lines[0].split("|")[9].strip() == "1.100"


def test_bench_sample_norms_row_and_verdict(monkeypatch):
    bench = _load("bench_sample_norms.py")
    monkeypatch.setattr(bench, "compare", fake_compare({"normkit": [1e-6, 1e-6, 1e-6], "torch.nn": [2e-6] * 3}))
    [train, _] = bench.run(types.SimpleNamespace(only="LayerNorm(120)", device="cpu", budget=0.0, min_rounds=3))
    assert (train["ratio"], train["q1"], train["q3"]) == pytest.approx((0.5, 0.5, 0.5))
    rows = [dict(train, ratio=r, q1=q1, q3=q3) for r, q1, q3 in [(1.04, 1.2, 1.3), (1.05, 0.9, 1.0), (1.06, 1.0, 1.0)]]
    lines = bench.table(rows).splitlines()[2:]
    assert [line.split("|")[7].strip() for line in lines] == ["yes", "yes", "**no**"]


def test_bench_variants_baseline_ratios_and_verdicts(monkeypatch):
    bench = _load("bench_variants.py")
    samples = {"normkit": [4e-6] * 3, "torch.nn transpose": [3e-6] * 3, "torch.nn reshape": [2e-6] * 3,
               "normkit + kernels": [1e-6] * 3, "keras": [20e-6] * 3}
    monkeypatch.setattr(bench, "compare", fake_compare(samples))
    noop = lambda: None  # noqa: E731
    spec = [("axis=-1", (64, 50, 120), lambda: ({name: noop for name in samples if name != "normkit + kernels"}
                                                | {"normkit": noop}, ["torch.nn transpose", "torch.nn reshape"], None))]
    monkeypatch.setattr(bench, "rows_spec", lambda keras, device: spec)
    [row] = bench.run(types.SimpleNamespace(only="", device="cpu", budget=0.0, min_rounds=3, fused=True), None)
    assert row["baseline"] == "torch.nn reshape" and row["torch.nn"] == 2e-6  # the faster of the two
    assert row["others"] == {"torch.nn transpose": 3e-6}
    assert row["ratio"] == pytest.approx(2.0) and row["fused_ratio"] == pytest.approx(0.5)
    assert row["keras_ratio"] == pytest.approx(5.0) and row["keras_fused_ratio"] == pytest.approx(20.0)

    def verdicts(**values):
        cells = bench.table([dict(row, **values)], "keras").splitlines()[2].split("|")
        return cells[8].strip(), cells[12].strip()
    # <= 1.5 and >= 3 take the better of normkit without and with its kernels.
    assert verdicts(ratio=1.6, fused_ratio=1.5, keras_ratio=2.9, keras_fused_ratio=3.0) == ("yes", "yes")
    assert verdicts(ratio=1.5, fused_ratio=1.6, keras_ratio=3.0, keras_fused_ratio=2.9) == ("yes", "yes")
    assert verdicts(ratio=1.51, fused_ratio=1.6, keras_ratio=2.99, keras_fused_ratio=1.0) == ("**no**", "**no**")


def test_bench_compile_and_op_floor_ratios_are_to_their_baselines(monkeypatch, capsys):
    compile_bench = _load("bench_compile.py")
    names = ["torch.nn", "torch.nn compiled", "normkit compiled", "normkit renorm compiled", "normkit ghost compiled"]
    samples = {name: [float(i + 1) * 1e-6] * 3 for i, name in enumerate(names)}
    monkeypatch.setattr(compile_bench, "compare",
                        lambda contenders, **o: common.Comparison({n: v[0] for n, v in samples.items()}, samples, 3, 1))
    monkeypatch.setattr(compile_bench, "contenders", lambda shape, device: {})
    compile_bench.main(["--shapes", "64,120"])
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row == "| (64,120) | 1 µs (0.500) | 2 µs (1.000) | 3 µs (1.500) | 4 µs (2.000) | 5 µs (2.500) |"

    floor = _load("bench_op_floor.py")
    floor_samples = {"torch.nn": [2e-6] * 3, "minimal_ghost": [3e-6] * 3, "normkit_ghost": [5e-6] * 3}
    monkeypatch.setattr(floor, "compare", lambda contenders, **o: common.Comparison(
        {n: v[0] for n, v in floor_samples.items()}, floor_samples, 3, 1))
    monkeypatch.setattr(floor, "build_contenders", lambda args: {})
    floor.main(["--no-fused"])
    rows = capsys.readouterr().out.strip().splitlines()[-3:]
    assert rows == ["| torch.nn | 2 µs | 1.000 |", "| minimal_ghost | 3 µs | 1.500 |", "| normkit_ghost | 5 µs | 2.500 |"]


# --- bench_memory: bytes kept for backward -----------------------------------------------------------------------

def test_kept_for_backward_counts_each_saved_storage_once_without_the_input():
    memory = _load("bench_memory.py")
    x = torch.randn(8, 4, requires_grad=True)

    def call(t):
        y = t.exp()        # saves y (its result)
        z = y * y[:, :]    # saves y twice (itself and a view of it): one storage
        return t * z       # saves t (the input: not counted) and z
    assert memory.kept_for_backward(call, x) == 2 * x.untyped_storage().nbytes()
    assert memory.measure((call, x, ()), cuda=False) == {"kept": 2.0}


def test_kept_for_backward_of_torch_batchnorm1d_is_its_hand_count():
    memory = _load("bench_memory.py")
    layer = torch.nn.BatchNorm1d(5)
    x = torch.randn(16, 5, requires_grad=True)
    node = layer(x).grad_fn  # what autograd keeps: input, weight, running stats, saved mean and invstd
    saved = [node._saved_weight, node._saved_running_mean, node._saved_running_var, node._saved_result1,
             node._saved_result2]
    expected = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}.values())
    assert expected == 5 * 5 * 4
    assert memory.kept_for_backward(layer, x) == expected


@pytest.mark.parametrize("shape", [(64, 50, 120), (32, 8, 8, 16)])
def test_ghost_batches_of_features_last_data_keep_no_input_sized_copy_without_the_kernels(shape):
    """Keras' strided ghost groups of (N, *, C) data with axis=-1: a group's features are not adjacent in memory,
    and ATen's kernel kept the (V*S, G*C) copy it was given (1.004 input sizes at (64, 50, 120)); normalized on
    the free (V, G, S, C) view, per-feature vectors only are kept (functional._ghost_positions)."""
    import normkit
    import normkit.keras
    import normkit.kernels
    memory = _load("bench_memory.py")
    x = (torch.randn(shape) + 0.5).requires_grad_()
    layers = [normkit.BatchNorm(shape[-1], axis=-1, virtual_batch_size=16),
              normkit.keras.BatchNormalization(virtual_batch_size=16)]
    with normkit.kernels.switched(False):
        for layer in layers:
            assert memory.kept_for_backward(layer, x) < 0.05 * x.untyped_storage().nbytes()


# --- bench_lab -----------------------------------------------------------------------------------------------------

def test_lab_rates_are_images_per_second_alternating_who_goes_first(monkeypatch):
    lab = _load("bench_lab.py")
    clock = Clock()
    monkeypatch.setattr(lab.time, "perf_counter", clock)
    batches = [(None, torch.zeros(64, dtype=torch.long)) for _ in range(5)]

    def step(name, seconds):
        def call(images, labels):
            clock.log.append(name)
            clock.now += seconds
        return call
    steps = {"batch": step("batch", 0.01), "torch": step("torch", 0.02)}
    rates = lab.interleaved_rates(steps, batches, 4, lambda: None)
    assert rates == {"batch": pytest.approx([6400.0] * 4), "torch": pytest.approx([3200.0] * 4)}
    firsts = clock.log[::5][::2]  # the first step of each round's first measurement
    assert firsts == ["batch", "torch", "batch", "torch"]
