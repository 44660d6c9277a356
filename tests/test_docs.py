"""The tutorial's examples (docs/learn.md) run as doctests, its quoted results are results.md's cells, keras.md's opening
and porting examples, tools.md's examples and the README's run, and the names, paths and Layout the docs give exist, so
a doc that drifts from the code fails CI."""

import collections
import doctest
import importlib.util
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import normkit

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


def test_learn_md_figures_are_results_md_figures():
    # Sections 4 and 5 quote measured accuracies from docs/results.md, which tools/make_results.py regenerates: every
    # four-decimal figure of the tutorial's prose must still be one of that page's (a regeneration once left lab.md
    # quoting a number the table no longer held).
    prose = re.sub(r"```.*?```", "", DOC.read_text(), flags=re.S)
    figures = set(re.findall(r"(?<![\d.])0\.\d{4}(?!\d)", prose))
    results = set(re.findall(r"(?<![\d.])0\.\d{4}(?!\d)", DOC.with_name("results.md").read_text()))
    assert len(figures) >= 10
    assert figures <= results, f"learn.md quotes figures results.md does not hold: {sorted(figures - results)}"


def _results_tables():
    # results.md's tables by section heading: {heading: {row label: {column header: cell}}}, backticks dropped
    tables, heading = {}, None
    for line in DOC.with_name("results.md").read_text().splitlines():
        if line.startswith("#"):
            heading, header = line.lstrip("# ").strip(), None
        elif line.startswith("|") and heading is not None:
            cells = [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not set(line) <= set("|- "):
                tables.setdefault(heading, {})[cells[0]] = dict(zip(header, cells))
    return tables


# Each figure the tutorial quotes (a regex on its prose with one group) and the results.md cell it stands for:
# (heading prefix, row, column). A cell "mean ± sd" matches a quote of the mean alone.
LEARN_MD_QUOTES = [
    (r"\(`normkit train`, seeds 0-2\): test accuracy (\S+ ± \S+) with BN", "Digits", "batch", "test accuracy"),
    (r"with BN, (\S+ ± \S+) without, which is chance", "Digits", "none", "test accuracy"),
    (r"with sigmoids, (\S+ ± \S+) with BN", "LeNet, sigmoid", "batch", "test accuracy"),
    (r"with BN against (\S+ ± \S+) without; with ReLU", "LeNet, sigmoid", "none", "test accuracy"),
    (r"the gap is smaller, (\S+ ± \S+) against", "LeNet, relu", "batch", "test accuracy"),
    (r"the gap is smaller, \S+ ± \S+ against (\S+ ± \S+)\.", "LeNet, relu", "none", "test accuracy"),
    (r"with BN first reaches mean test accuracy 0\.9 at step (\d+)", "The BN paper's Figure 1",
     "first step with mean test accuracy >= 0.9", "with BN"),
    (r"reaches mean test accuracy 0\.9 at step \d+, without BN at step (\d+)", "The BN paper's Figure 1",
     "first step with mean test accuracy >= 0.9", "without BN"),
    (r"on the MNIST split from (\S+) to \S+ with the same weights", "LeNet, sigmoid", "batch", "test accuracy"),
    (r"on the MNIST split from \S+ to (\S+) with the same weights", "LeNet, sigmoid", "batch + recalibrate",
     "test accuracy"),
    (r"BN's test accuracy falls from (\S+) to \S+, while LayerNorm", "Small batches", "64", "batch"),
    (r"BN's test accuracy falls from \S+ to (\S+), while LayerNorm", "Small batches", "2", "batch"),
    (r"LayerNorm's is (\S+) at batch 2", "Small batches", "2", "layer"),
    (r"LayerNorm is best at batch 2 \((\S+)\)", "Small batches", "2", "layer"),
    (r"batch renormalization at batch 8 \((\S+)\)", "Small batches", "8", "renorm"),
    (r"plain BN at batch 64 \((\S+)\)", "Small batches", "64", "batch"),
    (r"BN's test accuracy falls from (\S+) \(shuffled\)", "Non-i.i.d. batches", "shuffled", "batch"),
    (r"\(shuffled\) to (\S+), batch renormalization's", "Non-i.i.d. batches", "2 classes per batch", "batch"),
    (r"batch renormalization's from (\S+) to", "Non-i.i.d. batches", "shuffled", "renorm"),
    (r"batch renormalization's from \S+ to (\S+), and", "Non-i.i.d. batches", "2 classes per batch", "renorm"),
    (r"one class per batch BN falls to (\S+) where", "Non-i.i.d. batches", "1 class per batch", "batch"),
    (r"where renorm keeps (\S+)\.", "Non-i.i.d. batches", "1 class per batch", "renorm"),
]


def test_learn_md_quotes_the_results_md_cells_it_names():
    # The check above only finds each quoted figure somewhere in results.md; a regeneration that moved numbers
    # between rows (BN's and renorm's, batch 2's and batch 64's) would pass it. Here each quote is read against the
    # cell its sentence names.
    prose = " ".join(re.sub(r"```.*?```", "", DOC.read_text(), flags=re.S).split())
    tables = _results_tables()
    for pattern, heading, row, column in LEARN_MD_QUOTES:
        match = re.search(pattern, prose)
        assert match, f"learn.md no longer says {pattern!r}: update LEARN_MD_QUOTES with the prose"
        (table,) = [rows for title, rows in tables.items() if title.startswith(heading)]
        cell = table[row][column]
        quoted = match.group(1)
        assert quoted == (cell if "±" in quoted else cell.split(" ±")[0]), (pattern, quoted, heading, row, column, cell)


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


def test_keras_md_porting_example_runs(tmp_path, monkeypatch):
    # The porting example names a live Keras layer and a saved layer's config, build config and weights: give it a
    # built layer with Keras' interface and that layer's own saved form, and model.keras the saved Keras model of
    # tests/data. to_keras needs Keras 3 (tests/test_keras_port.py runs it against the real one): without Keras its
    # line is left out.
    pytest.importorskip("h5py")
    block = re.findall(r"```python\n(.*?)```", KERAS_DOC.read_text(), re.S)[1]
    if importlib.util.find_spec("keras") is None:
        block = "\n".join(line for line in block.splitlines() if "to_keras(ours)" not in line)
    monkeypatch.chdir(tmp_path)
    shutil.copy(DOC.parents[1] / "tests" / "data" / "keras_bn_model.keras", tmp_path / "model.keras")
    torch.manual_seed(0)
    live = normkit.keras.BatchNormalization(momentum=0.9)
    live(torch.randn(8, 3), training=True)
    namespace = {"keras_layer": live, "config": live.keras_config(), "build_config": live.get_build_config(),
                 "weights": live.get_weights()}
    exec(compile(block, str(KERAS_DOC), "exec"), namespace)
    # ("ours" is the second line's: the layer rebuilt from the saved form, equal to the live one)
    assert [w.tolist() for w in namespace["ours"].get_weights()] == [w.tolist() for w in live.get_weights()]
    assert namespace["ours"].get_build_config() == live.get_build_config()
    assert sorted(namespace["layers"]) == ["block/bn_inner", "bn_conv", "bn_renorm"]


TOOLS_DOC = DOC.with_name("tools.md")


def _tools_model():
    # A model whose BN layers sit where the fold example's comment names them: features.1 and features.4.
    return torch.nn.Sequential(collections.OrderedDict(
        features=torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                                     torch.nn.Conv2d(6, 4, 3), torch.nn.BatchNorm2d(4)),
        pool=torch.nn.AdaptiveAvgPool2d(1), flatten=torch.nn.Flatten(), head=torch.nn.Linear(4, 2)))


def test_tools_md_examples_run():
    # tools.md's examples are plain Python naming a model and a loader: give them small ones and check their comments.
    # (synchronize_batch_norm's needs a process group; tests/test_distributed.py runs that one.)
    convert, _, fold, freeze, recalibrate = re.findall(r"```python\n(.*?)```", TOOLS_DOC.read_text(), re.S)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)

    original = _tools_model()
    weights = [m.weight for m in original.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    namespace = {"normkit": normkit, "torchvision_model": original}
    exec(compile(convert, str(TOOLS_DOC), "exec"), namespace)
    back = [m for m in namespace["model"].modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert [type(m) for m in back] == [torch.nn.BatchNorm2d] * 2  # torch.nn's again, with the same tensors
    assert all(m.weight is w for m, w in zip(back, weights))

    model = _tools_model()
    model(x)  # (running statistics other than the initial ones)
    namespace = {"normkit": normkit, "model": model}
    exec(compile(fold, str(TOOLS_DOC), "exec"), namespace)
    assert namespace["folded"] == ["features.1", "features.4"]
    torch.testing.assert_close(namespace["fast"](x), model(x))

    model = normkit.convert_batch_norm(_tools_model(), "normkit")
    namespace = {"normkit": normkit, "model": model}
    exec(compile(freeze, str(TOOLS_DOC), "exec"), namespace)
    bn = model.features[1]
    assert model.training and bn.training and not bn.weight.requires_grad
    before = bn.running_mean.clone()
    model(x)
    assert torch.equal(bn.running_mean, before)  # "BN still uses running statistics and updates nothing"

    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    batches = [torch.randn(4, 3, 5, 5) * 2 + 1 for _ in range(5)]
    namespace = {"normkit": normkit, "model": model, "train_loader": [(b, torch.zeros(4)) for b in batches]}
    exec(compile(recalibrate, str(TOOLS_DOC), "exec"), namespace)
    torch.testing.assert_close(model[0].running_mean, torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0))
    torch.testing.assert_close(model[0].running_var,
                               torch.stack([b.var((0, 2, 3)) for b in batches]).mean(0))  # (unbiased, as torch.nn's)


README = DOC.parents[1] / "README.md"


def test_readme_example_runs(tmp_path, monkeypatch):
    # The README's example, up to its fused-kernel lines (enable() compiles the CPU kernel: tests/test_kernels.py),
    # with the objects it names: a model and loader, a saved Keras model as model.keras, and for `keras_layer` a
    # built layer with Keras' interface (from_keras against the real Keras: tests/test_keras_port.py).
    pytest.importorskip("h5py")
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    block = block[:block.index("import normkit.kernels")]
    monkeypatch.chdir(tmp_path)
    shutil.copy(DOC.parents[1] / "tests" / "data" / "keras_bn_model.keras", tmp_path / "model.keras")
    keras_layer = normkit.keras.BatchNormalization(momentum=0.9)
    keras_layer(torch.randn(8, 3), training=True)
    torch.manual_seed(0)
    namespace = {"keras_layer": keras_layer, "model": _tools_model(),
                 "train_loader": [(torch.randn(4, 3, 8, 8), torch.zeros(4)) for _ in range(3)]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (synchronized layers without a process group say so)
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["y"].shape == (4, 10, 64)
    assert namespace["ported"].get_weights()[2].tolist() == keras_layer.get_weights()[2].tolist()
    assert namespace["saved"]["bn_conv"].bn.axis == 1
    assert namespace["folded"] == ["features.1", "features.4"]
    assert isinstance(namespace["norm"], normkit.GroupNorm)


def test_readme_layout_names_files_that_exist():
    # The README's Layout is a learner's map of the repository: every file or folder it names (one per line, nested
    # by indentation), and every script its tools/ entry names, must be there.
    block = README.read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    root, parents, named = README.parent, [], []
    for line in block.splitlines():
        match = re.match(r"( {4,})([\w./-]+(?:\.py|/))(?:\s|$)", line)
        if match is None:
            continue
        indent = len(match.group(1))
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = (parents[-1][1] if parents else root) / match.group(2)
        named.append(path)
        if match.group(2).endswith("/"):
            parents.append((indent, path))
    tools = re.search(r"^    tools/(.*?)^    \S", block, re.S | re.M).group(1)
    named += [root / "tools" / script for script in re.findall(r"\w+\.(?:py|sh)", tools)]
    assert len(named) >= 40
    missing = [str(path.relative_to(root)) for path in named if not path.exists()]
    assert not missing, f"README's Layout names what the repository lacks: {missing}"


def _resolve(dotted):
    # The object a dotted name like normkit.stats.RenormClipping.paper_schedule stands for: its longest importable
    # module prefix, then attributes
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(dotted)


def test_docs_name_objects_and_files_that_exist():
    # A learner follows the docs' pointers: every normkit.* name (not torch.ops.normkit.*, a registered operator)
    # must import or be an attribute, and every repository path (src/..., docs/..., tests/..., tools/...,
    # benchmarks/...) must be there (benchmarks/common.compare: a function of benchmarks/common.py).
    root = README.parent
    names, paths = set(), set()
    for doc in [README, *sorted(DOC.parent.glob("*.md"))]:
        text = doc.read_text()
        names |= {name.rstrip(".") for name in re.findall(r"(?<![\w.])normkit(?:\.[A-Za-z_]\w*)+", text)}
        paths |= set(re.findall(r"(?<![\w/.~])((?:src|docs|tests|tools|benchmarks)/[\w/.-]*[\w/])", text))
    assert len(names) >= 30 and len(paths) >= 30
    unresolved = []
    for name in sorted(names):
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            unresolved.append(name)
    assert not unresolved, f"the docs name what normkit lacks: {unresolved}"
    missing = [path for path in sorted(paths)
               if not (root / path).exists() and not (root / path).with_suffix(".py").exists()]
    assert not missing, f"the docs name paths the repository lacks: {missing}"


LAB_DOC = DOC.with_name("lab.md")


def _documented_commands():
    # The example command lines: lab.md's indented blocks (a trailing backslash continues a line, "  # ..." comments
    # it) and the full commands the tutorial and the README quote in backticks (lab.md's own backticked ones are
    # usage synopses and fragments: `normkit evaluate --checkpoint FILE [--dataset D] ...`).
    commands = []
    for block in re.findall(r"(?:^    .*\n)+", LAB_DOC.read_text(), re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s#\s", line.strip())[0].strip()
            if line.startswith("normkit "):
                commands.append(line)
    for doc in (DOC, README):
        commands += [" ".join(command.split()) for command in re.findall(r"`(normkit [^`]+)`", doc.read_text())]
    return commands


def test_documented_commands_parse_and_their_settings_are_valid():
    # A renamed flag, a dropped choice or a value the lab now refuses would leave these examples failing on a user's
    # first try; parsing and resolving the settings reads no data and writes nothing. (Whether their --norm-option
    # keywords build the layers is a run's own check: tests/lab/test_norm_options.py.)
    import shlex

    from normkit.cli import build_parser
    from normkit.lab.config import TrainConfig

    commands = _documented_commands()
    assert len(commands) >= 20 and any("--norm-option unbiased_running_var=false" in c for c in commands)
    parser = build_parser()
    for command in commands:
        try:
            args = parser.parse_args(shlex.split(command)[1:])
        except SystemExit:
            pytest.fail(f"a documented command does not parse: {command}")
        if args.command == "train":
            TrainConfig(**{k: v for k, v in vars(args).items() if k != "command"}).resolved()
