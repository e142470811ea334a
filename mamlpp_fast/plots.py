"""`mamlpp plot-lrs <experiment>`: charts of what a MAML++ experiment learned, from its files alone.

    mamlpp plot-lrs Experiments/omniglot_5_1 [--epoch N ... | --epoch best] [--out DIR]

Reads `<experiment>/saved_models/train_model_{N}` and `<experiment>/logs/summary_statistics.csv`
(plus `<experiment>/config.json`, the trainer's snapshot of the configuration, when present) and
writes PNGs (matplotlib, Agg backend, no display needed) into `<experiment>/plots/` or `--out`:

- `lslr.png`: the learned per-layer, per-step inner-loop learning rates (LSLR, the tensors
  `inner_loop_optimizer.names_learning_rates_dict.*`, entries 0..S-1; the last entry of each
  (S+1,) vector is never used). One panel per selected epoch, one bar group per adapted tensor, one
  bar per inner step, as in the charts of the MAML++ blog post;
- `msl.png`: the multi-step-loss importance of each inner step over the epochs (the CSV columns
  `train_loss_importance_vector_{i}_mean` when logged, else computed from the configuration with
  `mamlpp_fast.common.msl_importance_vector`);
- `curves.png`: train and validation loss and accuracy per epoch.

Why from files: the charts are for experiments that ran elsewhere (a cluster, the original's code;
its checkpoints have the same keys), so nothing here needs the learner or a GPU.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from typing import Any, Sequence

import numpy as np
from .errors import PlotError  # noqa: F401 (re-exported)

__all__ = ["main", "load_lslr", "read_summary", "plot_experiment", "PlotError"]

LR_PREFIX = "inner_loop_optimizer.names_learning_rates_dict."




def _checkpoints(saved_models: str) -> dict[int, str]:
    out = {}
    if os.path.isdir(saved_models):
        for name in os.listdir(saved_models):
            m = re.fullmatch(r"train_model_(\d+)", name)
            if m:
                out[int(m.group(1))] = os.path.join(saved_models, name)
    return dict(sorted(out.items()))


def load_lslr(path: str, num_steps: int | None = None) -> dict[str, np.ndarray]:
    """{adapted tensor name: learning rates of steps 0..S-1} from one checkpoint (S = num_steps, else
    the vector length minus the unused last entry)."""
    from .common import load_checkpoint

    network = load_checkpoint(path)["network"]
    out = {}
    for key, value in network.items():
        if key.startswith(LR_PREFIX):
            v = value.detach().cpu().double().numpy().reshape(-1)
            s = num_steps if num_steps is not None else max(len(v) - 1, 1)
            out[key[len(LR_PREFIX):]] = v[:s]
    if not out:
        raise PlotError(f"checkpoint {path} has no {LR_PREFIX}* tensors (no LSLR learning rates)")
    return out


def read_summary(path: str) -> dict[str, np.ndarray]:
    """Columns of logs/summary_statistics.csv as float arrays (non-numeric cells become NaN)."""
    if not os.path.isfile(path):
        raise PlotError(f"no per-epoch statistics: {path} not found")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise PlotError(f"{path} has no epoch rows")
    header, body = rows[0], [r for r in rows[1:] if r]
    cols = {}
    for i, h in enumerate(header):
        vals = []
        for r in body:
            try:
                vals.append(float(r[i]))
            except (ValueError, IndexError):
                vals.append(np.nan)
        cols[h] = np.asarray(vals)
    return cols


def _short(name: str) -> str:
    """layer_dict-conv0-conv-weight -> conv0.weight; layer_dict-linear-weights -> linear.weights."""
    parts = name.replace("layer_dict-", "").split("-")
    return f"{parts[0]}.{parts[-1]}" if len(parts) > 1 else name


def _load_config(root: str) -> dict[str, Any]:
    path = os.path.join(root, "config.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            return {}
    return {}


def _select_epochs(available: dict[int, str], requested: Sequence[str] | None, summary: dict | None,
                   saved_models: str) -> list[int]:
    if not available:
        raise PlotError(f"no checkpoints train_model_<epoch> in {saved_models}")
    if not requested:
        return list(available)
    chosen = []
    for r in requested:
        if str(r).lower() == "best":
            if not summary or "val_accuracy_mean" not in summary or "epoch" not in summary:
                raise PlotError("--epoch best needs val_accuracy_mean and epoch in logs/summary_statistics.csv")
            acc, ep = summary["val_accuracy_mean"], summary["epoch"]
            order = [int(ep[i]) for i in np.argsort(acc, kind="stable")[::-1] if int(ep[i]) in available]
            if not order:
                raise PlotError(f"no checkpoint in {saved_models} for the epochs of the summary")
            chosen.append(order[0])
        else:
            try:
                n = int(r)
            except ValueError:
                raise PlotError(f"--epoch must be an epoch number or 'best', got {r!r}") from None
            if n not in available:
                raise PlotError(f"no checkpoint for epoch {n}: {os.path.join(saved_models, f'train_model_{n}')} "
                                f"not found (available: {list(available)})")
            chosen.append(n)
    return list(dict.fromkeys(chosen))


def plot_experiment(root: str, out: str | None = None, epochs: Sequence[str] | None = None) -> list[str]:
    """Write lslr.png, msl.png and curves.png for the experiment folder `root`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .common import msl_importance_vector

    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise PlotError(f"experiment folder not found: {root}")
    saved_models = os.path.join(root, "saved_models")
    summary_path = os.path.join(root, "logs", "summary_statistics.csv")
    summary = read_summary(summary_path) if os.path.isfile(summary_path) else None
    config = _load_config(root)
    out = os.path.abspath(out or os.path.join(root, "plots"))
    written = []

    # Everything a chart needs is checked before the output folder is created: a folder that is not
    # an experiment gets nothing written into it.
    available = _checkpoints(saved_models)
    chosen = _select_epochs(available, epochs, summary, saved_models)
    if summary is None:
        raise PlotError(f"no per-epoch statistics: {summary_path} not found")
    steps = config.get("number_of_training_steps_per_iter")
    per_epoch = {e: load_lslr(available[e], steps) for e in chosen}
    if os.path.lexists(out) and not os.path.isdir(out):
        raise PlotError(f"output folder {out} is a file")
    os.makedirs(out, exist_ok=True)

    # --- LSLR learning rates, one panel per epoch
    names = list(per_epoch[chosen[0]])
    s = len(per_epoch[chosen[0]][names[0]])
    ncols = min(len(chosen), 3)
    nrows = (len(chosen) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(6.0, 0.7 * len(names) * ncols + 2), 3.6 * nrows),
                             squeeze=False, sharey=True)
    x = np.arange(len(names))
    width = 0.8 / s
    colors = plt.cm.viridis(np.linspace(0.1, 0.9, s))
    for ax, e in zip(axes.flat, chosen):
        for step in range(s):
            ax.bar(x - 0.4 + width * (step + 0.5), [per_epoch[e][n][step] for n in names], width,
                   color=colors[step], label=f"step {step}")
        ax.set_xticks(x)
        ax.set_xticklabels([_short(n) for n in names], rotation=45, ha="right", fontsize=8)
        ax.set_title(f"epoch {e}")
        ax.axhline(float(config.get("task_learning_rate", 0.1)), color="grey", lw=0.8, ls="--")
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("inner learning rate")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Learned per-layer per-step inner-loop learning rates (LSLR)")
    fig.tight_layout()
    path = os.path.join(out, "lslr.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    # --- MSL importance over epochs
    msl = None
    if summary is not None:
        cols = sorted((int(m.group(1)), k) for k in summary
                      if (m := re.fullmatch(r"train_loss_importance_vector_(\d+)_mean", k)))
        if cols:
            msl = np.stack([summary[k] for _, k in cols], axis=1)
            ep_axis = summary.get("epoch", np.arange(1, len(msl) + 1))
    if msl is None:
        need = ("number_of_training_steps_per_iter", "multi_step_loss_num_epochs", "total_epochs")
        if not all(k in config for k in need):
            raise PlotError(f"no train_loss_importance_vector_i_mean columns in {summary_path} and no "
                            f"{os.path.join(root, 'config.json')} with {', '.join(need)} to compute them from")
        total = int(config["total_epochs"])
        msl = np.stack([msl_importance_vector(int(config["number_of_training_steps_per_iter"]),
                                              int(config["multi_step_loss_num_epochs"]), e) for e in range(total)])
        ep_axis = np.arange(1, total + 1)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i in range(msl.shape[1]):
        ax.plot(ep_axis, msl[:, i], marker="o", ms=3, label=f"step {i}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("importance of the step's target loss")
    ax.set_title("Multi-step loss (MSL) importance vector")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "msl.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    # --- loss and accuracy curves
    if summary is None:
        raise PlotError(f"no per-epoch statistics: {summary_path} not found")
    ep = summary.get("epoch", np.arange(1, len(next(iter(summary.values()))) + 1))
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 4))
    for phase, style in (("train", "-"), ("val", "--")):
        for ax, metric in ((ax_l, "loss"), (ax_a, "accuracy")):
            mean, std = summary.get(f"{phase}_{metric}_mean"), summary.get(f"{phase}_{metric}_std")
            if mean is None:
                continue
            ax.plot(ep, mean, style, marker="o", ms=3, label=phase)
            if std is not None:
                ax.fill_between(ep, mean - std, mean + std, alpha=0.2)
    for ax, metric in ((ax_l, "loss"), (ax_a, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(os.path.basename(root))
    fig.tight_layout()
    path = os.path.join(out, "curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mamlpp plot-lrs", description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", help="experiment folder (holding saved_models/ and logs/)")
    p.add_argument("--epoch", action="append", metavar="N|best",
                   help="epoch checkpoint(s) to chart (repeatable; default: every epoch checkpoint)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: <experiment>/plots)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `mamlpp plot-lrs`; exit status 0, or 2 with one line on stderr."""
    from .common import CheckpointError

    opts = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        paths = plot_experiment(opts.experiment, opts.out, opts.epoch)
    except (PlotError, CheckpointError) as e:
        print(f"mamlpp: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the output folder cannot be created or written (permission, space)
        print(f"mamlpp: error: cannot write the plots to {e.filename or opts.out or opts.experiment}: "
              f"{e.strerror or e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
