"""Regenerate docs/results.md (and its figures) by running the lab's experiments: `python tools/make_results.py`.

Every number in docs/results.md comes from this script; edit the experiments here, never the page by hand.
It takes about 20 minutes on a 2-core CPU. The MNIST experiments use the real MNIST test set in
../shared/datasets/mnist (split: train = first 8,000 images, test = last 2,000) and are left out, with a
note on the page, where that folder is absent.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from normkit import kernels, recalibrate_running_stats
from normkit.lab.batches import prepare_data, recalibration_batches
from normkit.lab.board import preactivations
from normkit.lab.checkpoint import load_checkpoint, model_from_checkpoint
from normkit.lab.compare import compare, comparison_table
from normkit.lab.config import TrainConfig
from normkit.lab.data import atomic_write_bytes, load_dataset, split_test_set
from normkit.lab.plots import plot_curves
from normkit.lab.train import evaluate, run
from normkit.registry import NORM_NAMES

ROOT = Path(__file__).resolve().parents[1]
SHARED_MNIST = ROOT.parent / "shared" / "datasets" / "mnist"
SEEDS = [0, 1, 2, 3, 4]
MORE_SEEDS = list(range(5, 15))  # the classic recipe only: how often a seed reaches 0.97
CLASSIC = dict(model="lenet", activation="sigmoid", optimizer="rmsprop", batch_size=64, epochs=5, val_split=0.2)


def machine() -> str:
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else [platform.processor()]
    return f"{len(names)}-core CPU ({names[0] if names else 'unknown'}), torch {torch.__version__}, 1 torch thread"


def experiment(norms, seeds, out, **options):
    started = time.perf_counter()
    # overwrite: this script regenerates every run, an interrupted earlier one included.
    results = compare(norms, seeds, out=str(out), quiet=True, tensorboard=False, threads=1, overwrite=True, **options)
    print(f"  {out.name}: {len(norms) * len(seeds)} runs in {time.perf_counter() - started:.0f} s", flush=True)
    return results


def accuracies(results, norm):
    return [metrics["test_accuracy"] for metrics in results[norm].values()]


def mean_history(results, norm):
    histories = [m["history"] for m in results[norm].values()]
    return [{"epoch": i + 1, **{k: statistics.fmean(h[i][k] for h in histories)
                                for k in ("loss", "accuracy", "val_loss", "val_accuracy")}}
            for i in range(len(histories[0]))]


def figure(results, name, title):
    path = ROOT / "docs" / "figures" / f"{name}.png"
    plot_curves({norm: mean_history(results, norm) for norm in results}, path, title=title)
    return f"![{title}](figures/{name}.png)"


def paired(results, first, second):
    """Per-seed difference of test accuracy between two norms trained on the same seeds."""
    differences = [results[first][s]["test_accuracy"] - results[second][s]["test_accuracy"] for s in results[first]]
    return max(abs(d) for d in differences), statistics.fmean(differences)


@torch.no_grad()
def accuracy(model, images, labels, batch_statistics=False, batch_size=1000):
    """Accuracy in eval mode (running statistics), or with ``batch_statistics`` in training mode, i.e. each
    batch normalized by its own statistics (a diagnostic: a test image's prediction then depends on the other
    images of its batch). Running statistics are saved and restored, so the model is left unchanged."""
    saved = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.train(batch_statistics)
    correct = sum((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
                  for i in range(0, len(labels), batch_size))
    model.load_state_dict(saved)
    model.eval()
    return correct / len(labels)


def evaluations(results, norm, out, splits):
    """Per seed: validation and test accuracy with the running statistics the run ended with, with running
    statistics recalibrated on the 6,400 training images (precise BN) and with test-batch statistics."""
    rows = {}
    for seed, metrics in results[norm].items():
        payload = load_checkpoint(out / f"{norm}-seed{seed}" / "checkpoint.pt")
        model, cfg = model_from_checkpoint(payload)
        cfg = cfg.resolved()
        data = prepare_data(cfg, splits)
        row = {"val running": metrics["history"][-1]["val_accuracy"], "test running": metrics["test_accuracy"],
               "test batch": accuracy(model, *data.test, batch_statistics=True, batch_size=cfg.batch_size)}
        # What `normkit train --recalibrate -1` does after the last epoch: every training batch, in order.
        recalibrate_running_stats(model, recalibration_batches(data.train[0], cfg, -1))
        row["val recalibrated"], row["test recalibrated"] = accuracy(model, *data.val), accuracy(model, *data.test)
        rows[seed] = row
    return rows


def diagnosis_table(configs, seeds):
    header = ["configuration", "evaluated with", "val acc e5", "test accuracy"] + [f"seed {s}" for s in seeds] \
        + ["seeds >= 0.97"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, rows in configs.items():
        for mode, what in (("running", "running statistics (eval mode, as trained)"),
                           ("recalibrated", "running statistics recalibrated on the training images"),
                           ("batch", "test-batch statistics, batches of 64 (diagnostic only)")):
            tests = [rows[s][f"test {mode}"] for s in seeds]
            val = f"{statistics.fmean(rows[s][f'val {mode}'] for s in seeds):.4f}" if mode != "batch" else ""
            lines.append("| " + " | ".join([label, what, val, f"{statistics.fmean(tests):.4f}"]
                                           + [f"{t:.4f}" for t in tests] + [f"{sum(t >= 0.97 for t in tests)} of {len(tests)}"]) + " |")
    return "\n".join(lines) + "\n"


def _stats(rows, key):
    values = [row[key] for _, row in sorted(rows.items())]
    worst = min(sorted(rows.items()), key=lambda item: item[1][key])
    return statistics.fmean(values), worst[1][key], worst[0], sum(v >= 0.97 for v in values)


def diagnosis(configs):
    classic, keras = list(configs.values())[:2]
    mean_run, min_run, seed_run, n_run = _stats(classic, "test running")
    mean_rec, min_rec, seed_rec, n_rec = _stats(classic, "test recalibrated")
    mean_bat, min_bat, _, n_bat = _stats(classic, "test batch")
    worst_gain = classic[seed_run]["test recalibrated"] - classic[seed_run]["test running"]
    k_run, k_min, k_seed, k_n = _stats(keras, "test running")
    k_rec, _, _, k_rec_n = _stats(keras, "test recalibrated")
    # Choose on validation accuracy only: every (configuration, evaluation) pair that needs no test batches.
    candidates = {(label, mode): statistics.fmean(row[f"val {mode}"] for row in rows.values())
                  for label, rows in configs.items() for mode in ("running", "recalibrated")}
    (best_label, best_mode), best_val = max(candidates.items(), key=lambda item: item[1])
    best_mean, best_min, best_seed, best_n = _stats(configs[best_label], f"test {best_mode}")
    full = [f"{label} with {mode} statistics" for label, rows in configs.items() for mode in ("running", "recalibrated")
            if all(row[f"test {mode}"] >= 0.97 for row in rows.values())]
    seeds = sorted(classic)
    return ["### Why the sigmoid recipe falls short of 0.97", "",
            "Each trained network evaluated three ways: in eval mode with the running statistics it ended training "
            "with (what every other table reports, and what Keras' `evaluate` does); with its running statistics "
            "recalibrated, i.e. replaced by the average of its batch statistics over the 6,400 training images in "
            "batches of 64 with the final weights (\"precise BN\", `normkit.recalibrate_running_stats`, what "
            "`normkit train --recalibrate -1` does; no weight changes); and in training mode, each test batch of 64 normalized by its own statistics. The "
            "last is a diagnostic, not an evaluation: a test image's prediction then depends on the other test "
            "images in its batch. `keras` is normkit.BatchNorm with Keras' BatchNormalization defaults (momentum "
            "0.99, i.e. 0.01 on the new batch, epsilon 1e-3, biased moving variance), the layer the classic notebook "
            "used. The BN momentum only changes the running statistics, never a training step. "
            f"Seeds {', '.join(map(str, seeds))}.", "",
            diagnosis_table(configs, seeds),
            f"- **The running statistics, not the weights, cost most of the gap.** Classic recipe: eval mode "
            f"{mean_run:.4f} ({n_run} of {len(seeds)} seeds >= 0.97, worst seed {seed_run} at {min_run:.4f}); the same "
            f"weights with recalibrated running statistics {mean_rec:.4f} ({n_rec} of {len(seeds)}, worst seed "
            f"{seed_rec} at {min_rec:.4f}); with test-batch statistics {mean_bat:.4f} ({n_bat} of {len(seeds)}, "
            f"worst {min_bat:.4f}). Seed {seed_run} gains {worst_gain:+.4f} from recalibration alone: its \"unlucky last "
            "epoch\" is running averages that mix batch statistics of older weights (RMSprop moves every weight by "
            "about lr per step until the last one, and 5 epochs here are only 500 steps).",
            f"- **Keras' BN defaults are worse here, not better:** `keras` in eval mode {k_run:.4f} ({k_n} of "
            f"{len(seeds)} seeds >= 0.97, worst seed {k_seed} at {k_min:.4f}); recalibrated {k_rec:.4f} ({k_rec_n} of "
            f"{len(seeds)}; `batch` recalibrated: {mean_rec:.4f}). Momentum 0.99 averages over about 100 steps, a whole "
            "epoch of this 6,400-image split (the classic notebook trained on 60,000 images: 750 steps per epoch), so "
            "its running statistics lag further behind the weights.",
            f"- **Learning rate:** chosen on mean validation accuracy among every configuration and both "
            f"evaluations that use no test batches, the best is {best_label} with {best_mode} statistics (validation "
            f"{best_val:.4f}); its test accuracy is {best_mean:.4f}, {best_n} of {len(seeds)} seeds >= 0.97 "
            f"(worst seed {best_seed} at {best_min:.4f}).",
            ("- **Target on every seed:** reached by " + "; ".join(full) + "." if full else
             "- **Target on every seed:** no configuration here reaches 0.97 test accuracy on all "
             f"{len(seeds)} seeds with a valid evaluation (running or recalibrated statistics). With recalibrated "
             f"statistics the classic recipe averages {mean_rec:.4f} but {len(seeds) - n_rec} of {len(seeds)} seeds "
             f"{'stays' if len(seeds) - n_rec == 1 else 'stay'} below 0.97 (worst {min_rec:.4f}, i.e. {round((0.97 - min_rec) * 2000)} of 2,000 test images short); "
             f"test-batch statistics, not a valid evaluation, reach 0.97 on {n_bat} of {len(seeds)}."), ""]


def more_seeds(first, extra):
    """The classic recipe's two valid evaluations on ten more seeds, and on all fifteen."""
    groups = {f"seeds {SEEDS[0]}-{SEEDS[-1]}": first, f"seeds {MORE_SEEDS[0]}-{MORE_SEEDS[-1]}": extra,
              "all": {**first, **extra}}
    lines = ["### The classic recipe on more seeds", "",
             f"The same training (`batch`, lr 1e-3) on seeds {MORE_SEEDS[0]} to {MORE_SEEDS[-1]}, evaluated as above, "
             "to see how often a seed reaches 0.97.", "",
             "| seeds | running statistics: mean | >= 0.97 | worst | recalibrated: mean | >= 0.97 | worst |",
             "|---|---|---|---|---|---|---|"]
    for label, rows in groups.items():
        cells = [label]
        for key in ("test running", "test recalibrated"):
            mean, worst, _, passing = _stats(rows, key)
            cells += [f"{mean:.4f}", f"{passing} of {len(rows)}", f"{worst:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def conclusion(configs):
    classic = list(configs.values())[0]
    mean_rec, min_rec, _, n_rec = _stats(classic, "test recalibrated")
    return ["With the classic sigmoid recipe, 5 epochs on 6,400 images leave LeNet + BN's eval-mode accuracy short "
            "of 0.97 on most seeds, mainly because its running statistics lag the weights (see above: recalibrated "
            f"on the training images, the same weights score {mean_rec:.4f} on average, {n_rec} of {len(classic)} seeds "
            f">= 0.97, worst {min_rec:.4f}; `normkit train --recalibrate -1` does this after training, so the target "
            f"is met on {n_rec} of {len(classic)} seeds, not on all); with ReLU every seed passes 0.97. normkit's BN and torch.nn's BN give "
            "the same accuracies (the trained weights are bit-for-bit equal: plain normkit.BatchNorm runs the same "
            "ATen kernel), and every configuration without BN is behind after 5 epochs, by far with sigmoid."]

SMALL_BATCH_SIZES = [2, 8, 64]
SMALL_BATCH_NORMS = ["batch", "renorm", "layer", "group", "none"]


def small_batches(runs, mnist):
    """BN's small-batch weakness and the normalizations that fix it: one epoch at several batch sizes."""
    table = {}
    for size in SMALL_BATCH_SIZES:
        results = experiment(SMALL_BATCH_NORMS, SEEDS[:3], runs / f"mnist-batch{size}",
                             **{**CLASSIC, "batch_size": size, "epochs": 1}, **mnist)
        table[size] = {norm: accuracies(results, norm) for norm in SMALL_BATCH_NORMS}

    def cell(values):
        return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"

    lines = ["### Small batches: BN's weakness and its fixes (LeNet, sigmoid, 1 epoch, seeds 0, 1, 2)", "",
             "The same training for one epoch at batch sizes " + ", ".join(map(str, SMALL_BATCH_SIZES))
             + " (so smaller batches take more, noisier steps). BN normalizes with the statistics of a "
             "handful of images in training and with running averages at test time; LayerNorm and GroupNorm "
             "use each image's own statistics, the same in training and at test; Batch Renormalization "
             "corrects the batch statistics toward the running ones (the paper's clipping schedule at 1/50 of "
             "its step counts: plain BN for 100 steps, then rmax 1 -> 3 by step 800 and dmax 0 -> 5 by step 500; "
             "renorm_momentum 0.1; "
             "one epoch is 3,200 steps at batch 2, 800 at batch 8, 100 at batch 64). Test accuracy:", "",
             "| batch size | " + " | ".join(f"`{n}`" for n in SMALL_BATCH_NORMS) + " |",
             "|---|" + "---|" * len(SMALL_BATCH_NORMS)]
    for size, row in table.items():
        lines.append(f"| {size} | " + " | ".join(cell(row[n]) for n in SMALL_BATCH_NORMS) + " |")
    smallest, largest = SMALL_BATCH_SIZES[0], SMALL_BATCH_SIZES[-1]
    mean = {size: {n: statistics.fmean(v) for n, v in row.items()} for size, row in table.items()}
    lines += ["", f"From batch {largest} to batch {smallest}, `batch` goes from {mean[largest]['batch']:.4f} to "
              f"{mean[smallest]['batch']:.4f} ({mean[smallest]['batch'] - mean[largest]['batch']:+.4f}), `renorm` "
              f"from {mean[largest]['renorm']:.4f} to {mean[smallest]['renorm']:.4f}, `layer` from "
              f"{mean[largest]['layer']:.4f} to {mean[smallest]['layer']:.4f} and `group` from "
              f"{mean[largest]['group']:.4f} to {mean[smallest]['group']:.4f}. The best at each batch size: "
              + ", ".join(f"batch {size} `{best}` ({mean[size][best]:.4f})" for size, best in
                          ((size, max(SMALL_BATCH_NORMS, key=lambda n: mean[size][n])) for size in SMALL_BATCH_SIZES))
              + f"; at batch {largest} `batch` "
              f"({mean[largest]['batch']:.4f}) is {'ahead of' if mean[largest]['batch'] > max(mean[largest]['layer'], mean[largest]['group']) else 'not ahead of'} "
              f"both batch-independent norms.", ""]
    return lines


NON_IID_NORMS = ["batch", "renorm", "group", "none"]
NON_IID_CLASSES = [4, 2, 1]


def non_iid_batches(runs, mnist, shuffled):
    """The Batch Renormalization paper's non-i.i.d. minibatches: batches of K classes each (--batch-classes K);
    ``shuffled``: the same norms' runs on shuffled batches (the every-norm experiment, same seeds)."""
    table = {"shuffled": {norm: accuracies(shuffled, norm) for norm in NON_IID_NORMS}}
    for k in NON_IID_CLASSES:
        results = experiment(NON_IID_NORMS, SEEDS[:3], runs / f"mnist-batch-classes{k}", **CLASSIC, **mnist,
                             batch_classes=k)
        table[f"{k} {'class' if k == 1 else 'classes'} per batch"] = {norm: accuracies(results, norm)
                                                                      for norm in NON_IID_NORMS}
    mean = {row: {norm: statistics.fmean(values) for norm, values in cells.items()} for row, cells in table.items()}

    def cell(values):
        return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"

    two = "2 classes per batch"
    lines = ["### Non-i.i.d. batches (the Batch Renormalization paper's experiment; LeNet, sigmoid, seeds 0, 1, 2)", "",
             "`normkit train --batch-classes K`: every training batch of 64 holds 64 / K images of each of K classes "
             "only, so its statistics are far from the whole data's; "
             "Ioffe (2017) trains BN this way and finds its test accuracy falls, because in training each image is "
             "normalized by its batch's statistics and at test time by the running averages, and that Batch "
             "Renormalization, which corrects the batch statistics toward the running ones, recovers much of it. "
             "Validation and test batches are mixed, evaluation uses the running statistics (eval mode), and "
             "`renorm` is the registry's (the paper's clipping schedule at 1/50 of its step counts, "
             "renorm_momentum 0.1). The shuffled row is the runs of \"Every normalization\" above. Test accuracy:",
             "", "| batches | " + " | ".join(f"`{n}`" for n in NON_IID_NORMS) + " |",
             "|---|" + "---|" * len(NON_IID_NORMS)]
    for row, cells in table.items():
        lines.append(f"| {row} | " + " | ".join(cell(cells[n]) for n in NON_IID_NORMS) + " |")
    change = {norm: mean[two][norm] - mean["shuffled"][norm] for norm in NON_IID_NORMS}
    renorm_verdict = ("recovers part of BN's loss, as in the paper" if change["renorm"] > change["batch"]
                      else "does not recover BN's loss at this scale (the paper's runs are ~100 times longer; the "
                           "clipping here opens over 800 steps)")
    lines += ["", "From shuffled batches to 2 classes per batch: "
              + ", ".join(f"`{norm}` {mean['shuffled'][norm]:.4f} -> {mean[two][norm]:.4f} ({change[norm]:+.4f})"
                          for norm in NON_IID_NORMS)
              + f". Renorm {renorm_verdict}. `group` (each image's own statistics, the same in training and at test "
              f"time) and `none` have no batch statistics to mismatch: what they lose comes from training on batches "
              f"of K classes only, where each step's gradient sees K classes.", ""]
    return lines


FIGURE1_SEEDS = [0, 1, 2]
FIGURE1 = dict(model="mlp", activation="sigmoid", optimizer="sgd", lr=0.5, batch_size=60, epochs=30, val_split=0.2)
FIGURE1_EVERY = 20        # steps between two measurements
FIGURE1_PERCENTILES = (0.15, 0.5, 0.85)


def bn_paper_figure1(runs, mnist, splits):
    """Ioffe & Szegedy (2015), Figure 1: the MLP's test accuracy during training, and the distribution of the
    input of one sigmoid of the last hidden layer (15th, 50th, 85th percentiles over the test images)."""
    test_images, test_labels = splits.test
    traces = {}
    for norm in ("none", "batch"):
        for seed in FIGURE1_SEEDS:
            trace = traces.setdefault(norm, {}).setdefault(seed, [])

            def measure(step, model, trace=trace):
                if step % FIGURE1_EVERY == 0:
                    last_sigmoid = list(preactivations(model, test_images).values())[-1]
                    quantiles = torch.quantile(last_sigmoid[:, 0], torch.tensor(FIGURE1_PERCENTILES))
                    trace.append((step, evaluate(model, test_images, test_labels)[1], *quantiles.tolist()))

            total_steps = run(TrainConfig(norm=norm, seed=seed, out=str(runs / "mnist-figure1" / f"{norm}-seed{seed}"),
                                          quiet=True, tensorboard=False, threads=1, overwrite=True, **FIGURE1, **mnist),
                              splits=splits, on_step=measure)["steps"]
    steps = [row[0] for row in traces["none"][FIGURE1_SEEDS[0]]]
    mean_accuracy = {norm: [statistics.fmean(by_seed[s][i][1] for s in FIGURE1_SEEDS) for i in range(len(steps))]
                     for norm, by_seed in traces.items()}

    import matplotlib
    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    fig, (acc_axes, *dist_axes) = plt.subplots(1, 3, figsize=(13, 3.8), sharex=True)
    for norm, label in (("none", "without BN"), ("batch", "with BN")):
        acc_axes.plot(steps, mean_accuracy[norm], label=label)
    acc_axes.set(title="(a) test accuracy (mean of 3 seeds)", xlabel="training step", ylim=(0.7, 1.0))
    acc_axes.legend()
    for axes, (norm, label) in zip(dist_axes, (("none", "(b) without BN"), ("batch", "(c) with BN"))):
        rows = traces[norm][FIGURE1_SEEDS[0]]
        for column, percentile in enumerate(FIGURE1_PERCENTILES, start=2):
            axes.plot(steps, [row[column] for row in rows], color="C0", alpha=0.4 + 0.6 * (percentile == 0.5))
        axes.set(title=f"{label}: sigmoid input, 15/50/85th pct", xlabel="training step", ylim=(-3, 3))
    for axes in (acc_axes, *dist_axes):
        axes.grid(alpha=0.3)
    fig.tight_layout()
    path = ROOT / "docs" / "figures" / "bn-paper-figure1.png"
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())

    def crossing(norm, level):
        return next((step for step, value in zip(steps, mean_accuracy[norm]) if value >= level), None)

    def at(norm, step):
        """Seed 0's median and 15-85th percentile width of the traced sigmoid input at the measurement nearest step."""
        row = min(traces[norm][FIGURE1_SEEDS[0]], key=lambda r: abs(r[0] - step))
        return row[3], row[4] - row[2]

    lines = ["### The BN paper's Figure 1 (MNIST MLP, 784 -> 3 x 100 sigmoid -> 10)", "",
             f"Section 4.1 of Ioffe & Szegedy (2015): the MLP trained with SGD on batches of 60, with and without BN, "
             f"(a) its test accuracy as training progresses and (b, c) the distribution, over the test images, of the "
             f"input of one sigmoid of the last hidden layer (unit 0; the 15th, 50th and 85th percentiles; the "
             f"network in eval mode). Here: {FIGURE1['epochs']} epochs of the 6,400 training images "
             f"({total_steps} steps; the paper ran 50,000 steps on 60,000 images), SGD lr {FIGURE1['lr']} without "
             f"momentum (the paper gives no learning rate), Glorot-uniform weights (the paper: small Gaussian ones), "
             f"measured every {FIGURE1_EVERY} steps; accuracy is the mean of seeds "
             f"{', '.join(map(str, FIGURE1_SEEDS))}, the distributions are seed {FIGURE1_SEEDS[0]}'s. "
             "`normkit.lab.train.run(..., on_step=...)` takes the measurements.", "",
             "![BN paper Figure 1 on the MNIST split](figures/bn-paper-figure1.png)", "",
             "| | without BN | with BN |", "|---|---|---|"]
    for level in (0.8, 0.9, 0.93):
        cells = [f"{crossing(norm, level)}" if crossing(norm, level) is not None else "not reached"
                 for norm in ("none", "batch")]
        lines.append(f"| first step with mean test accuracy >= {level} | " + " | ".join(cells) + " |")
    lines.append("| final test accuracy (mean) | " + " | ".join(f"{mean_accuracy[n][-1]:.4f}" for n in ("none", "batch"))
                 + " |")
    for step in (steps[0], steps[len(steps) // 10], steps[len(steps) // 2], steps[-1]):
        cells = [f"median {at(n, step)[0]:+.2f}, 15-85 width {at(n, step)[1]:.2f}" for n in ("none", "batch")]
        lines.append(f"| sigmoid input at step {step} (seed {FIGURE1_SEEDS[0]}) | " + " | ".join(cells) + " |")
    w0n, w1n = at("none", steps[0])[1], at("none", steps[-1])[1]
    w0b, w1b = at("batch", steps[0])[1], at("batch", steps[-1])[1]
    lines += ["", f"Without BN the sigmoid's input starts narrow (15-85 width {w0n:.2f} at step {steps[0]}: every test "
              f"image gives nearly the same value) and widens to {w1n:.2f} while the layers below it learn; with BN "
              f"the input is standardized from the first step (width {w0b:.2f} at step {steps[0]}, {w1b:.2f} at the "
              f"end, the change being BN's own gamma and beta at work). BN reaches mean test accuracy 0.9 at step "
              f"{crossing('batch', 0.9)}, without BN at step {crossing('none', 0.9)}. Two differences from the paper's "
              "panels: the BN panel jitters from one measurement to the next, because in eval mode the layer uses "
              "running averages over about the last 10 batches (momentum 0.1) of a network whose weights still move "
              "fast at this learning rate; and over this short run both networks end at similar accuracy, where the "
              "paper's 50,000 steps leave the BN network ahead."]
    lines.append("")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=str(ROOT / "runs" / "results"), help="where the run directories go")
    args = parser.parse_args()
    # ATen's paths whether or not this machine built the fused kernel (which a built kernel takes by default): the
    # two compute the same function to float rounding, and a few hundred training steps turn rounding into
    # different last digits, so the page must not depend on what the machine has built.
    kernels.disable()
    runs = Path(args.runs)
    started = time.perf_counter()
    page = ["# Results", "",
            "Generated by `python tools/make_results.py` (do not edit by hand). "
            f"Machine: {machine()}; ATen's paths (the fused kernel off). Every run: LeNet (conv 6 -> norm -> act -> pool -> conv 16 -> norm -> act -> pool "
            "-> dense 120 -> norm -> act -> dense 84 -> norm -> act -> dense 10), Keras' RMSprop (lr 1e-3, rho 0.9, "
            "eps 1e-7), batch 64, 5 epochs, the last 20% of the training images held out for validation, "
            "Glorot-uniform initialization. Test accuracy is mean ± sample standard deviation over seeds; "
            "`val acc eN` is the mean validation accuracy after epoch N. `batch` is normkit.BatchNorm, `torch` is "
            "torch.nn.BatchNorm; both use PyTorch's defaults (momentum 0.1, eps 1e-5). `keras` is normkit.BatchNorm with "
            "Keras' defaults (momentum 0.99 = 0.01 on the new batch, eps 1e-3).", ""]

    print("digits", flush=True)
    digits = experiment(["batch", "none"], SEEDS[:3], runs / "digits", dataset="digits", **CLASSIC)
    page += ["## Digits (embedded): LeNet + BN vs no normalization, sigmoid", "",
             "scikit-learn's 1,797 8x8 digits resized to 28x28; fixed stratified split (1,437 train, of which "
             "1,149 train and 288 validation; 360 test). Seeds 0, 1, 2. This is `normkit train` with "
             "`--norm batch` and `--norm none`.", "", comparison_table(digits),
             figure(digits, "lab-digits", "LeNet, sigmoid, digits: batch vs none (mean of 3 seeds)"), ""]

    if not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        page += ["## MNIST", "", f"Not run: the MNIST sample was not found at {SHARED_MNIST}.", ""]
    else:
        with tempfile.TemporaryDirectory() as data_dir:
            split_test_set(SHARED_MNIST, Path(data_dir) / "mnist", train_count=8000)
            mnist = dict(dataset="mnist", data_dir=data_dir)
            page += ["## MNIST (real test set split: train = first 8,000, test = last 2,000)", "",
                     "The 10,000 MNIST test images split in two: 6,400 train / 1,600 validation (the last 20% of the "
                     "8,000) / 2,000 test. The last 2,000 MNIST test images are the harder half's end (the "
                     "first 5,000 are the cleaner ones), so these accuracies are below full-MNIST numbers. "
                     f"Seeds {', '.join(map(str, SEEDS))}.", ""]
            claims, by_activation = [], {}
            for activation in ("sigmoid", "relu"):
                print(f"mnist {activation}", flush=True)
                results = experiment(["batch", "torch", "none"], SEEDS, runs / f"mnist-{activation}",
                                     **{**CLASSIC, "activation": activation}, **mnist)
                by_activation[activation] = results
                table = dict(results)
                if activation == "sigmoid":
                    # The CLI path: `normkit train --recalibrate -1`, the same training, then precise BN.
                    recalibrated = experiment(["batch"], SEEDS, runs / "mnist-sigmoid-recalibrate",
                                              **CLASSIC, **mnist, recalibrate=-1)["batch"]
                    table = {"batch": results["batch"], "batch + recalibrate": recalibrated,
                             **{k: v for k, v in results.items() if k != "batch"}}
                    rec = [m["test_accuracy"] for m in recalibrated.values()]
                    recalibrate_claim = (
                        f"`batch + recalibrate` is `normkit train --recalibrate -1`: the `batch` runs' training, then "
                        f"the BN running statistics recomputed over the {recalibrated[SEEDS[0]]['recalibration']['batches']} training "
                        f"batches of 64 with the final weights "
                        f"(the same weights: its validation curve is `batch`'s). Test accuracy "
                        f"{statistics.fmean(rec):.4f}, {sum(a >= 0.97 for a in rec)} of {len(rec)} seeds >= 0.97 "
                        f"(the issue's target), worst seed {min(rec):.4f}; before recalibration "
                        f"{statistics.fmean(m['test_accuracy_before_recalibration'] for m in recalibrated.values()):.4f}.")
                largest, mean = paired(results, "batch", "torch")
                gap = statistics.fmean(accuracies(results, "batch")) - statistics.fmean(accuracies(results, "none"))
                label = "the classic recipe" if activation == "sigmoid" else "ReLU instead of sigmoid"
                bn = accuracies(results, "batch")
                claims.append(f"- LeNet + normkit BN, {activation}: test accuracy {statistics.fmean(bn):.4f} "
                              f"(seeds: {min(bn):.4f} to {max(bn):.4f}); {sum(a >= 0.97 for a in bn)} of {len(bn)} "
                              f"seeds reach 0.97. torch.nn BN: largest per-seed difference {largest:.4f}. "
                              f"No normalization: {statistics.fmean(accuracies(results, 'none')):.4f} ({gap:+.4f} for BN).")
                if activation == "sigmoid":
                    claims.append(f"- The same with `--recalibrate -1` (precise BN after the last epoch): test accuracy "
                                  f"{statistics.fmean(rec):.4f} (seeds: {min(rec):.4f} to {max(rec):.4f}); "
                                  f"{sum(a >= 0.97 for a in rec)} of {len(rec)} seeds reach 0.97.")
                page += [f"### LeNet, {activation} ({label})", "", comparison_table(table),
                         f"normkit's BN vs torch.nn's BN, same seed: largest test-accuracy difference {largest:.4f} "
                         f"(mean {mean:+.4f}). BN over no normalization: {gap:+.4f} test accuracy."
                         + (" " + recalibrate_claim if activation == "sigmoid" else ""), "",
                         figure(results, f"lab-mnist-{activation}",
                                f"LeNet, {activation}, MNIST split: normkit BN, torch.nn BN, none "
                                f"(mean of {len(SEEDS)} seeds)"), ""]
            print("mnist sigmoid diagnosis", flush=True)
            splits = load_dataset("mnist", data_dir)
            configs = {"`batch`, lr 1e-3 (the classic recipe)": evaluations(by_activation["sigmoid"], "batch",
                                                                            runs / "mnist-sigmoid", splits)}
            keras = experiment(["keras"], SEEDS, runs / "mnist-sigmoid-keras", **CLASSIC, **mnist)
            configs["`keras`, lr 1e-3 (Keras' BN defaults)"] = evaluations(keras, "keras", runs / "mnist-sigmoid-keras",
                                                                            splits)
            for lr in (2e-3, 3e-3):
                out = runs / f"mnist-sigmoid-lr{lr:g}"
                configs[f"`batch`, lr {lr:.0e}".replace("e-0", "e-")] = evaluations(
                    experiment(["batch"], SEEDS, out, **CLASSIC, **mnist, lr=lr), "batch", out, splits)
            page += diagnosis(configs)
            print("mnist sigmoid, more seeds", flush=True)
            out = runs / "mnist-sigmoid-more-seeds"
            extra = evaluations(experiment(["batch"], MORE_SEEDS, out, **CLASSIC, **mnist), "batch", out, splits)
            page += more_seeds(configs["`batch`, lr 1e-3 (the classic recipe)"], extra)
            page += ["### Summary", "", *claims, "", *conclusion(configs), ""]
            print("mnist every norm", flush=True)
            every = experiment(list(NORM_NAMES), SEEDS[:3], runs / "mnist-every-norm", **CLASSIC, **mnist)
            page += ["### Every normalization in the registry (LeNet, sigmoid, seeds 0, 1, 2)", "",
                     "`layer` is LayerNorm over (C, H, W) in conv blocks; `instance` normalizes the conv blocks only "
                     "(dense blocks have no spatial axes and go unnormalized); `group` uses the largest divisor of C "
                     "up to 32 that leaves at least 2 channels per group; `renorm` is Batch Renormalization with the "
                     "paper's clipping schedule at 1/50 of its step counts (plain BN for the first 100 steps, then rmax 1 -> 3 by step "
                     "800 and dmax 0 -> 5 by step 500) and renorm_momentum 0.1 (docs/decisions.md: why); "
                     "`ghost` uses virtual batches of 16; `keras` is normkit.BatchNorm with Keras' defaults (momentum 0.99, "
                     "i.e. 0.01 on the new batch, eps 1e-3), whose running statistics still give their initial values (mean 0, variance 1) a "
                     "weight of 0.99^100 = 37% after the first epoch's 100 steps, hence its low early validation "
                     "accuracy.", "", comparison_table(every), ""]
            print("mnist small batches", flush=True)
            page += small_batches(runs, mnist)
            print("mnist non-i.i.d. batches", flush=True)
            page += non_iid_batches(runs, mnist, every)
            print("mnist mlp", flush=True)
            mlp = experiment(["batch", "none"], SEEDS[:3], runs / "mnist-mlp", **{**CLASSIC, "model": "mlp"}, **mnist)
            page += ["### The BN paper's MLP (784 -> 3 x 100 sigmoid -> 10, seeds 0, 1, 2)", "",
                     comparison_table(mlp), ""]
            print("mnist bn paper figure 1", flush=True)
            page += bn_paper_figure1(runs, mnist, splits)

    page += [f"Total time: {time.perf_counter() - started:.0f} s.", ""]
    (ROOT / "docs" / "results.md").write_text("\n".join(page))
    print(f"wrote {ROOT / 'docs' / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
