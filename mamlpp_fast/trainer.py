"""The experiment loop: meta-training epochs, validation, checkpoints, resume and the test protocol.

It follows the authors' `ExperimentBuilder` (experiment_builder.py) and `utils/storage.py`:

- an epoch is `total_iter_per_epoch` meta-updates; `run_train_iter(batch, epoch)` gets
  epoch = current_iter // total_iter_per_epoch;
- after each epoch, validation on the fixed validation tasks: `num_evaluation_tasks // batch_size`
  batches of `get_val_batches`;
- per-epoch statistics `train_<metric>_mean/_std` and `val_<metric>_mean/_std` for every metric the
  learner returns (loss, accuracy, loss_importance_vector_i, and learning_rate in training), then
  `epoch` and `epoch_run_time`, in `logs/summary_statistics.csv`; the lists of every epoch's
  statistics (`per_epoch_statistics`) in `logs/summary_statistics.json`;
- checkpoints `saved_models/train_model_{epoch}` and `saved_models/train_model_latest`, written by the
  learner's `save_model(path, state)`; `state` holds best_val_acc, best_val_iter, current_iter,
  best_epoch, the last epoch's summary statistics and per_epoch_statistics, as the original's;
- after the last epoch, the test protocol: the `max_models_to_save` checkpoints with the best
  validation accuracy are each loaded and run on the same `num_evaluation_tasks` test tasks; their
  logits are averaged per task (an ensemble) and the accuracy over all targets goes to
  `logs/test_summary.csv` (test_accuracy_mean, test_accuracy_std).

What we do differently, on purpose:

- checkpoints and logs are written atomically (temporary file in the same folder, fsync, rename), so an
  interrupted run never leaves a truncated file behind; a checkpoint that cannot be read raises
  `CheckpointError` naming it, and resuming falls back (with a warning) to the newest readable one;
- a checkpoint is written after the epoch's statistics are added to the state (the original saves
  first, so its checkpoint misses the last epoch's entry in per_epoch_statistics);
- earlier outputs are never deleted or overwritten unless asked (`overwrite=True`, the CLI's
  `--overwrite`, which deletes only the files this package wrote): a new run in a folder with
  checkpoints resumes; starting from scratch there, or resuming with a configuration that changes the
  network or the task distribution, raises `ExperimentError`, and so does resuming with other changed
  training keys unless `allow_config_change` (then recorded in config_history.json); one process at a
  time writes an experiment folder (a lock, `mamlpp_fast.experiment`);
- a meta-update the learner skipped (`losses['skipped']`: non-finite loss or gradient, config key
  `nonfinite_policy`) is counted (state 'skipped_iterations', a warning line per epoch) and left out of
  the epoch's statistics, which therefore keep the original's columns;
- `total_epochs_before_pause` ends `run_experiment()` (status "paused") instead of `sys.exit()`;
- ties in validation accuracy are broken deterministically (later epoch first, as the original's
  reversed argsort does on short lists); a top checkpoint that cannot be read is skipped with a
  warning and the next best one is used.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
import threading
import time
import warnings
from typing import Any, Callable

import numpy as np
import tqdm

from .common import CheckpointError, atomic_write, load_checkpoint
from .common import atomic_write_text as _atomic_write_text
from .common import fsync_dir as _fsync_dir
from .errors import ExperimentError  # noqa: F401 (re-exported)
from . import experiment as _xp

__all__ = ["ExperimentBuilder", "ExperimentWriter", "ExperimentError", "CheckpointError", "SHAPE_KEYS",
           "run_experiment", "build_experiment_folder", "describe_learner"]




# Configuration keys that change the shape (or the set) of the learner's tensors: a checkpoint made with
# other values cannot be loaded.
SHAPE_KEYS = (
    "image_channels", "image_height", "image_width", "num_classes_per_set", "cnn_num_filters", "num_stages",
    "conv_padding", "max_pooling", "per_step_bn_statistics", "number_of_training_steps_per_iter",
    "enable_inner_loop_optimizable_bn_params", "learnable_bn_gamma", "learnable_bn_beta",
)

CHECKPOINT_PREFIX = "train_model"
# Evaluation groups (config key evaluation_batch_size) are capped so that one first-layer activation of all
# the tasks of a call stays under this (mini-ImageNet 5-way 5-shot: 135 MB per task -> 15 tasks).
EVAL_ACTIVATION_BYTES = 2 * 1024 ** 3
CONFIG_SNAPSHOT = "config.json"


# ----------------------------------------------------------------------------------------------------
# Small file helpers
# ----------------------------------------------------------------------------------------------------
def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for row in rows:
        writer.writerow(row)
    return buf.getvalue()


def _plain(value: Any) -> Any:
    """numpy scalars and arrays -> Python floats/ints/lists (loadable with torch.load(weights_only=True))."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()  # 0-d tensors
    return value


def _json_safe(value: Any) -> Any:
    value = _plain(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _on_device(value: Any) -> bool:
    """True for a tensor that is not in host memory (reading it would synchronise with the device)."""
    device = getattr(value, "device", None)
    return device is not None and getattr(device, "type", "cpu") != "cpu"


def _host_floats(values: list[Any]) -> list[float]:
    """Python floats of `values`; device tensors among them are copied in one transfer."""
    on_dev = [i for i, v in enumerate(values) if _on_device(v)]
    if not on_dev:
        return [float(v) for v in values]
    import torch

    copied = torch.stack([values[i].detach().reshape(()) for i in on_dev]).cpu().tolist()
    out = list(values)
    for i, v in zip(on_dev, copied):
        out[i] = v
    return [float(v) for v in out]


def build_experiment_folder(experiment_dir: str | os.PathLike, experiment_name: str) -> tuple[str, str, str]:
    """Create <experiment_dir>/<experiment_name>/{saved_models,logs}; return (root, saved_models, logs)."""
    root = _xp.experiment_root(experiment_dir, experiment_name)
    saved_models = os.path.join(root, "saved_models")
    logs = os.path.join(root, "logs")
    folders = ((root, "experiment folder"), (saved_models, "checkpoint folder"), (logs, "log folder"))
    for path, what in folders:  # every obstacle first, so that a refused start creates nothing
        if os.path.lexists(path) and not os.path.isdir(path):
            raise ExperimentError(f"cannot use the {what} {path}: it exists but is a file, not a folder")
    for path, what in folders:
        _xp.ensure_folder(path, what)
    return root, saved_models, logs


def describe_learner(model: Any) -> tuple[str, str]:
    """(learner kind, op backend) of a learner instance, for the start-up line."""
    module = type(model).__module__ or ""
    if module.endswith(".fast"):
        kind = "fast"
    elif module.endswith(".reference"):
        kind = "reference"
    else:
        kind = type(model).__name__
    backend = None
    for attr in ("backend_name", "backend"):
        value = getattr(model, attr, None)
        if isinstance(value, str) and value:
            backend = value
            break
        if value is not None and not callable(value):
            backend = getattr(value, "name", None) or str(value)
            break
    if backend is None:
        if kind == "reference":
            backend = "torch (autograd)"
        else:
            try:
                from .ops import get_backend  # type: ignore

                b = get_backend(device=getattr(model, "device", None))
                backend = getattr(b, "name", None) or str(b)
            except Exception:  # noqa: BLE001 - only for display
                backend = "unknown"
    return kind, str(backend)


class _TrainBar:
    """The training progress bar, drawn by a background thread.

    The loop only counts: after each meta-update it adds one to `count` and keeps the update's losses in
    `last` (two attribute stores; no clock read, no formatting, no write to the terminal). A daemon thread
    wakes once per refresh interval of the bar and, when updates were counted since its last step, moves
    the bar by them with the last one's loss and accuracy. A draw (formatting, write and flush) costs
    ~0.4 ms with the caches a meta-update leaves behind; on the loop's thread it ran in series with the
    learner, here it runs while the learner does. tqdm serialises the bar's output with its own lock, so
    log lines written through `tqdm.write` never interleave with a draw. A disabled bar starts no thread.
    `close()` stops the thread, then shows every counted update on the calling thread."""

    __slots__ = ("bar", "count", "last", "_shown", "_stop", "_thread")

    def __init__(self, bar: tqdm.tqdm):
        self.bar, self.count, self.last, self._shown = bar, 0, None, 0
        self._stop = threading.Event()
        self._thread = None
        if not bar.disable:
            interval = float(bar.mininterval)
            # The thread decides when to draw: tqdm draws whenever update() is called.
            bar.mininterval = 0.0
            self._thread = threading.Thread(target=self._run, args=(interval,), name="mamlpp-progress",
                                            daemon=True)
            self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._step()

    def _step(self) -> None:
        count, last = self.count, self.last  # written by the loop's thread only; read once here
        if count > self._shown and not self.bar.disable:
            if last is not None:
                self.bar.set_postfix(ExperimentBuilder._postfix(last), refresh=False)
            self.bar.update(count - self._shown)
        self._shown = count

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._step()
        self.bar.close()


# ----------------------------------------------------------------------------------------------------
# Who writes the experiment's files
# ----------------------------------------------------------------------------------------------------
class ExperimentWriter:
    """Takes the experiment folder's lock and writes the experiment's files for an ExperimentBuilder.

    This one (the default) is a process that writes everything itself. A data-parallel run hands each
    rank's builder a `mamlpp_fast.distributed.RankZeroWriter` instead: rank 0 writes, the others write
    nothing and wait for rank 0's checkpoints before reading them."""

    @property
    def writes(self) -> bool:
        """Whether this process writes the experiment's files."""
        return True

    def lock(self, root: str, command: str, log: Callable[[str], None] | None = None) -> "_xp.LockHandle":
        """This process's share of the experiment folder's lock (mamlpp_fast.experiment)."""
        return _xp.acquire_lock(root, command, log=log)

    def write_text(self, path: str, text: str) -> None:
        _atomic_write_text(path, text)

    def copy(self, src: str, dst: str) -> None:
        """`dst` becomes a copy of `src`, written atomically."""
        with open(src, "rb") as f:
            atomic_write(dst, lambda out: shutil.copyfileobj(f, out))

    def save_model(self, model: Any, path: str, state: dict) -> None:
        # The learners' save_model writes atomically (common.atomic_torch_save): temp file, fsync, rename.
        model.save_model(model_save_dir=path, state=state)

    def wait(self) -> None:
        """Return once the files other processes write for this experiment are on disk (nothing to wait
        for when this process writes them all)."""


# ----------------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------------
class ExperimentBuilder:
    """Runs one experiment of the original's design on any learner with the API of DESIGN.md.

    Arguments:
        args: the configuration Namespace (`mamlpp_fast.config.load_args`).
        data: a `MetaLearningSystemDataLoader` instance, or the class (or any callable taking
            `(args=..., current_iter=...)`), as the original passes it.
        model: the learner (`MAMLFewShotClassifier`, fast or reference).
        device: the torch device the learner runs on (for the start-up line).
        overwrite: start from scratch even where earlier outputs exist, deleting the files this package
            wrote there first (checkpoints, logs, plots, configuration records; anything else is kept
            and listed). Without it earlier outputs are never deleted.
        allow_config_change: on resume, accept training keys that differ from the experiment's recorded
            configuration (the change is recorded in config_history.json); without it they are refused.
        config_path: the configuration file, for the start-up line and the log.
        progress: show tqdm progress bars (stderr).
        log: function printing one line (default: tqdm.write to stdout).
        writer: who takes the folder's lock and writes the files (default: this process,
            `ExperimentWriter()`; a data-parallel run passes each rank a `RankZeroWriter`).

    Example:
        >>> builder = ExperimentBuilder(args, MetaLearningSystemDataLoader, model, device)  # doctest: +SKIP
        >>> result = builder.run_experiment()                                              # doctest: +SKIP
        >>> result["test_accuracy_mean"]                                                   # doctest: +SKIP
    """

    def __init__(self, args: Any, data: Any, model: Any, device: Any = None, *, overwrite: bool = False,
                 config_path: str | os.PathLike | None = None, progress: bool = True,
                 log: Callable[[str], None] | None = None, allow_config_change: bool = False,
                 writer: ExperimentWriter | None = None):
        self.args, self.model, self.device = args, model, device
        self.writer = writer if writer is not None else ExperimentWriter()
        self.overwrite = bool(overwrite)
        self.allow_config_change = bool(allow_config_change)
        self.config_path = None if config_path is None else os.fspath(config_path)
        self.progress = progress
        self._log_fn = log
        if getattr(args, "experiment_name", None) in (None, "", "None"):
            from .config import ConfigError

            raise ConfigError("config key 'experiment_name' is required to train or test "
                              "(it names the output folder)")
        self.iters_per_epoch = int(args.total_iter_per_epoch)
        self.total_iters = int(args.total_epochs) * self.iters_per_epoch
        self.max_models_to_save = int(getattr(args, "max_models_to_save", 5))
        self.num_eval_batches = int(int(args.num_evaluation_tasks) / int(args.batch_size))
        if self.num_eval_batches < 1:
            from .config import ConfigError

            raise ConfigError(f"config key 'num_evaluation_tasks' ({args.num_evaluation_tasks}) must be at least "
                              f"'batch_size' ({args.batch_size}): evaluation uses num_evaluation_tasks // "
                              "batch_size batches")
        self.augment_flag = "omniglot" in str(args.dataset_name).lower()
        self.experiment_dir = getattr(args, "experiment_dir", None) or "Experiments"
        self.root = _xp.experiment_root(self.experiment_dir, args.experiment_name)

        self.state: dict[str, Any] = {"best_val_acc": 0.0, "best_val_iter": 0, "current_iter": 0}
        self.summary_header: list[str] | None = None
        self.summary_rows: list[list[Any]] = []
        self.resumed_from: str | None = None
        self._config_change: list | None = None
        self._config_record_missing = False
        self._lock = self._acquire_lock()
        try:
            with _xp.os_errors_as_experiment_errors(self.root):
                self._prepare_folder()
        except BaseException:
            self._lock.release()
            raise

        # The data loader starts where the checkpoint left off (tasks are drawn per iteration index).
        current_iter = int(self.state["current_iter"])
        if isinstance(data, type) or (callable(data) and not hasattr(data, "get_train_batches")):
            self.data = data(args=args, current_iter=current_iter)
        else:
            self.data = data
            if current_iter:
                self.data.continue_from_iter(current_iter)

        self.state["best_epoch"] = int(self.state["best_val_iter"] / self.iters_per_epoch)
        self.epoch = int(self.state["current_iter"] / self.iters_per_epoch)
        self.epochs_done_in_this_run = 0
        self.start_time = time.time()
        self._announce()

    # -- output -------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self._log_fn is not None:
            self._log_fn(msg)
        else:
            tqdm.tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    def _bar(self, **kwargs: Any) -> tqdm.tqdm:
        interactive = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        # miniters=1: the bar is drawn at the first update after `mininterval` seconds (the training bar is
        # drawn by a thread of its own once per that interval: _TrainBar).
        return tqdm.tqdm(disable=not self.progress, mininterval=0.1 if interactive else 5.0, miniters=1,
                         dynamic_ncols=interactive, file=sys.stderr, **kwargs)

    def _announce(self) -> None:
        kind, backend = describe_learner(self.model)
        device = self.device if self.device is not None else getattr(self.model, "device", "?")
        self.log(f"mamlpp: learner={kind} backend={backend} device={device} dataset={self.args.dataset_name} "
                 f"config={self.config_path or '-'} output={self.root}")
        if self.resumed_from:
            self.log(f"mamlpp: resuming from {self.resumed_from} (iteration {self.state['current_iter']} of "
                     f"{self.total_iters}, epoch {self.epoch})")

    # -- folder, resume -----------------------------------------------------------------------------
    @property
    def saved_models_filepath(self) -> str:
        return os.path.join(self.root, "saved_models")

    @property
    def logs_filepath(self) -> str:
        return os.path.join(self.root, "logs")

    def checkpoint_path(self, idx: Any) -> str:
        return os.path.join(self.saved_models_filepath, f"{CHECKPOINT_PREFIX}_{idx}")

    def _numbered_checkpoints(self) -> list[int]:
        out = []
        folder = self.saved_models_filepath
        if not os.path.isdir(folder):
            return out
        for name in os.listdir(folder):
            if name.startswith(CHECKPOINT_PREFIX + "_"):
                tail = name[len(CHECKPOINT_PREFIX) + 1:]
                if tail.isdigit():
                    out.append(int(tail))
        return sorted(out)

    def _existing_outputs(self) -> list[str]:
        """The checkpoints and logs an earlier run of this package left (not the user's own files)."""
        ours, _ = _xp.tool_outputs(self.root)
        return [os.path.join(self.root, rel) for rel in ours
                if rel.split(os.sep)[0] in ("saved_models", "logs") and not os.path.basename(rel).startswith(".tmp_")]

    def _acquire_lock(self) -> "_xp.LockHandle":
        """This process's share of the experiment folder's lock (see mamlpp_fast.experiment). `test` on a
        folder that does not exist takes none (there is nothing to protect, and it creates nothing)."""
        evaluate_only = bool(getattr(self.args, "evaluate_on_test_set_only", False))
        if evaluate_only and not os.path.isdir(self.root):
            return _xp.LockHandle(None)
        return self.writer.lock(self.root, "test" if evaluate_only else "train", log=self.log)

    def _continue_mode(self) -> Any:
        """continue_from_epoch -> "latest" ('latest', -2), "scratch" ('from_scratch', -1) or an epoch number."""
        cont = getattr(self.args, "continue_from_epoch", "latest")
        cont_s = str(cont).strip().lower()
        if cont_s in ("latest", "-2"):
            return "latest"
        if cont_s in ("from_scratch", "-1", "none", ""):
            return "scratch"
        try:
            n = int(cont_s)
        except ValueError:
            from .config import ConfigError

            raise ConfigError(f"config key 'continue_from_epoch' must be 'latest', 'from_scratch' or an epoch "
                              f"number, got {cont!r}") from None
        return n if n >= 0 else "scratch"

    def _prepare_folder(self) -> None:
        """Decide between a fresh start, resuming and refusing; load the checkpoint when resuming.

        Without `overwrite`, nothing written by an earlier run is deleted or replaced: 'latest' resumes,
        'from_scratch' in a folder with outputs is refused, and continuing from epoch N is refused while
        later checkpoints exist. `overwrite` deletes this experiment's saved_models/ and logs/ and starts
        from scratch, or, with an explicit epoch N, lets the run replace the checkpoints after N.
        """
        mode = self._continue_mode()
        evaluate_only = bool(getattr(self.args, "evaluate_on_test_set_only", False))
        existing = self._existing_outputs() if os.path.isdir(self.root) else []

        if evaluate_only:
            if self.overwrite:
                raise ExperimentError("--overwrite cannot be combined with testing only (it would delete the "
                                      "checkpoints to test)")
            if not self._numbered_checkpoints():
                raise ExperimentError(f"no checkpoints to test in {self.saved_models_filepath} (train first, or "
                                      "point --experiment-dir/experiment_name at a trained experiment)")
            self._resume_latest()
        elif isinstance(mode, int):
            later = [n for n in self._numbered_checkpoints() if n > mode]
            if later and not self.overwrite:
                raise ExperimentError(
                    f"continuing {self.root} from epoch {mode} would replace its later checkpoints "
                    f"(train_model_{later[0]}...); pass --overwrite to allow that, or resume from the latest")
            self._load(mode, load_checkpoint(self.checkpoint_path(mode)))  # CheckpointError names the file
        else:
            if self.overwrite:
                self._remove_earlier_outputs()
                existing = []
                mode = "scratch"
            has_checkpoint = bool(self._numbered_checkpoints()) or os.path.exists(self.checkpoint_path("latest"))
            if existing and (mode == "scratch" or not has_checkpoint):
                raise ExperimentError(
                    f"experiment folder {self.root} already holds outputs of an earlier run ({len(existing)} files, "
                    f"e.g. {existing[0]}){'' if has_checkpoint else ' but no checkpoint to resume from'}; not "
                    "overwriting them. " + ("Resume it (continue_from_epoch 'latest'), choose" if has_checkpoint
                                            else "Choose") +
                    " another experiment_name/--experiment-dir, or pass --overwrite to delete them and start from "
                    "scratch")
            if mode == "latest" and has_checkpoint:
                self._resume_latest()

        if evaluate_only:  # `test` writes nothing but its own outputs (logs/test_summary.csv)
            self._load_summary_rows(keep_aside=False)
            return
        build_experiment_folder(self.experiment_dir, self.args.experiment_name)
        self._load_summary_rows()
        if self.resumed_from is None or self._config_change or self._config_record_missing:
            self._write_config_snapshot()

    def _remove_earlier_outputs(self) -> None:
        """--overwrite: delete exactly the files this package wrote; list what is kept."""
        removed, kept = _xp.remove_tool_outputs(self.root)
        if removed:
            self.log(f"mamlpp: --overwrite: deleted {len(removed)} files this tool wrote in {self.root} "
                     "(checkpoints, logs, plots, configuration)")
        if kept:
            shown = ", ".join(kept[:10]) + (f", ... ({len(kept)} files)" if len(kept) > 10 else "")
            self.log(f"mamlpp: --overwrite: kept files this tool did not write: {shown}")

    def _recorded_config(self) -> dict | None:
        path = os.path.join(self.root, CONFIG_SNAPSHOT)
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            raise ExperimentError(f"cannot read the experiment's recorded configuration {path}: {e}; restore it, "
                                  "or pass --overwrite to start from scratch") from None
        if not isinstance(saved, dict):
            raise ExperimentError(f"the experiment's recorded configuration {path} is not a JSON object")
        return saved

    def _check_config_against_record(self, ckpt_path: str, iteration: Any = "?") -> list:
        """Compare the whole configuration with the recorded one (config.json): network/task keys
        refused, training keys refused unless allow_config_change (then recorded), free keys named.
        Returns the network/task differences (refused by the caller, with the tensor check)."""
        saved = self._recorded_config()
        if saved is None:
            self._config_record_missing = True
            return []
        current = {k: _json_safe(v) for k, v in vars(self.args).items()}
        diffs = _xp.compare_configs(saved, current)
        if diffs["refused"]:
            return diffs["refused"]
        evaluate_only = bool(getattr(self.args, "evaluate_on_test_set_only", False))
        if diffs["training"]:
            listed = _xp.format_diffs(diffs["training"])
            if evaluate_only:
                self.log(f"mamlpp: training keys differ from the experiment's recorded configuration (no effect "
                         f"on testing): {listed}")
            elif not self.allow_config_change:
                raise ExperimentError(
                    f"resuming {self.root} (checkpoint {ckpt_path}) with training keys that differ from the "
                    f"configuration its earlier epochs were trained with ({os.path.join(self.root, CONFIG_SNAPSHOT)}): "
                    f"{listed}. Use the recorded values, pass --allow-config-change to continue with the new ones "
                    "(the change is recorded in config_history.json), or --overwrite to start from scratch")
            else:
                self._config_change = diffs["training"]
                self.log(f"mamlpp: configuration change allowed (--allow-config-change) at iteration "
                         f"{iteration}: {listed}; recorded in "
                         f"{os.path.join(self.root, _xp.CONFIG_HISTORY)}")
        if diffs["free"]:
            self.log("mamlpp: keys that only affect evaluation, reporting, paths or the implementation differ from "
                     "the experiment's recorded configuration (used as given, not recorded): "
                     + _xp.format_diffs(diffs["free"]))
        return diffs["refused"]

    def _peek(self, idx: Any) -> dict | None:
        path = self.checkpoint_path(idx)
        if not os.path.exists(path):
            return None
        try:
            return load_checkpoint(path)
        except CheckpointError as e:
            warnings.warn(f"{e}; ignoring it and looking for an older checkpoint", RuntimeWarning, stacklevel=3)
            self.log(f"mamlpp: warning: {e}; ignoring it")
            return None

    def _resume_latest(self) -> None:
        """Load the newest readable checkpoint: train_model_latest, or the highest numbered one if newer."""
        best_idx, best_state = None, None
        latest = self._peek("latest")
        if latest is not None:
            best_idx, best_state = "latest", latest
        for n in reversed(self._numbered_checkpoints()):
            st = self._peek(n)
            if st is None:
                continue
            if best_state is None or int(st.get("current_iter", 0)) > int(best_state.get("current_iter", 0)):
                best_idx, best_state = n, st
            break  # the highest readable numbered checkpoint is the newest numbered one
        if best_state is None:
            raise CheckpointError(f"no readable checkpoint in {self.saved_models_filepath}: every file is truncated "
                                  "or corrupt (see the warnings above); pass --overwrite to start from scratch")
        self._load(best_idx, best_state)

    def _check_compatible(self, idx: Any, ckpt: dict) -> None:
        path = self.checkpoint_path(idx)
        refused = self._check_config_against_record(path, ckpt.get("current_iter", "?"))
        diffs = [_xp.format_diffs(refused)] if refused else []
        network = ckpt.get("network", {})
        current = self.model.state_dict()
        tensor_diffs = []
        for key in sorted(set(network) | set(current)):
            a, b = network.get(key), current.get(key)
            if a is None or b is None:
                tensor_diffs.append(f"{key} {'missing from the checkpoint' if a is None else 'not in this model'}")
            elif tuple(a.shape) != tuple(b.shape):
                tensor_diffs.append(f"{key}: {tuple(a.shape)} in the checkpoint, {tuple(b.shape)} now")
        if tensor_diffs:
            detail = "; ".join(diffs) if diffs else "see tensors"
            shown = "; ".join(tensor_diffs[:4]) + (f"; ... ({len(tensor_diffs)} tensors)" if len(tensor_diffs) > 4 else "")
            raise ExperimentError(
                f"the configuration does not match the experiment in {self.root} (checkpoint {path}): {detail}. "
                f"Tensors: {shown}. Use another experiment_name/--experiment-dir, the experiment's own config, "
                "or --overwrite to start from scratch")
        if refused:
            raise ExperimentError(
                f"the configuration does not match the experiment in {self.root} (checkpoint {path}): keys that "
                f"change the network or the task distribution differ: {diffs[0]}. Use the experiment's own "
                "config, another experiment_name/--experiment-dir, or --overwrite to start from scratch")

    def _load(self, idx: Any, ckpt: dict) -> None:
        self._check_compatible(idx, ckpt)
        path = self.checkpoint_path(idx)
        try:
            state = self.model.load_model(model_save_dir=self.saved_models_filepath, model_name=CHECKPOINT_PREFIX,
                                          model_idx=idx)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - name the file whatever went wrong
            raise CheckpointError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from None
        state = dict(state) if state is not None else dict(ckpt)
        state.pop("network", None)
        state.pop("optimizer", None)
        state.setdefault("best_val_acc", 0.0)
        state.setdefault("best_val_iter", 0)
        state.setdefault("current_iter", 0)
        self.state = state
        self.resumed_from = path

    def _write_config_snapshot(self) -> None:
        """config.json = the configuration in force; config_history.json = every one the experiment had.

        Written at a fresh start, on resume when the record is missing, and when a change is allowed
        (--allow-config-change); an unchanged resume and `test` write neither."""
        snap = {k: _json_safe(v) for k, v in sorted(vars(self.args).items())}
        hist_path = os.path.join(self.root, _xp.CONFIG_HISTORY)
        history: list = []
        fresh = self.resumed_from is None
        if not fresh and os.path.exists(hist_path):
            try:
                with open(hist_path) as f:
                    history = json.load(f)
            except (OSError, ValueError):
                history = []
            if not isinstance(history, list):
                history = []
        if fresh:
            event = "start"
        elif self._config_change:
            event = "change"
        else:
            event = "recorded on resume (no earlier record)"
        entry: dict[str, Any] = {"event": event, "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                 "iteration": int(self.state.get("current_iter", 0)),
                                 "epoch": int(self.state.get("current_iter", 0)) // self.iters_per_epoch}
        if self._config_change:
            entry["changed"] = {k: {"from": a, "to": b} for k, a, b in self._config_change}
        entry["config"] = snap
        history.append(entry)
        self.writer.write_text(hist_path, json.dumps(history, indent=1) + "\n")
        self.writer.write_text(os.path.join(self.root, CONFIG_SNAPSHOT), json.dumps(snap, indent=2) + "\n")

    # -- statistics files ---------------------------------------------------------------------------
    @property
    def summary_csv_path(self) -> str:
        return os.path.join(self.logs_filepath, "summary_statistics.csv")

    def _load_summary_rows(self, keep_aside: bool = True) -> None:
        """Keep the CSV rows of the epochs the loaded state has done; save any later rows aside (unless
        `keep_aside` is false: `test` writes nothing there)."""
        path = self.summary_csv_path
        epochs_done = int(self.state["current_iter"]) // self.iters_per_epoch
        if not os.path.exists(path):
            return
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            return
        header, body = rows[0], [r for r in rows[1:] if r]
        keep = body
        if "epoch" in header:
            col = header.index("epoch")
            keep = []
            for r in body:
                try:
                    if int(float(r[col])) <= epochs_done:
                        keep.append(r)
                except (ValueError, IndexError):
                    pass
        if len(keep) != len(body) and keep_aside:
            aside = path + f".before_resume_{time.strftime('%Y%m%d-%H%M%S')}"
            shutil.copyfile(path, aside)
            self.log(f"mamlpp: {path} had {len(body) - len(keep)} rows past the resumed epoch {epochs_done}; "
                     f"a copy is kept in {aside}")
        self.summary_header, self.summary_rows = header, keep

    def _append_summary(self, summary: dict[str, Any]) -> None:
        if self.summary_header is None:
            self.summary_header = list(summary.keys())
        header = self.summary_header
        for key in summary:
            if key not in header:
                header.append(key)
        self.summary_rows.append([_plain(summary.get(k, "")) for k in header])
        self.writer.write_text(self.summary_csv_path, _csv_text(header, self.summary_rows))
        self.writer.write_text(os.path.join(self.logs_filepath, "summary_statistics.json"),
                               json.dumps(_json_safe(self.state.get("per_epoch_statistics", {}))))

    # -- checkpoints --------------------------------------------------------------------------------
    def _save_one(self, final_path: str, state: dict) -> None:
        self.writer.save_model(self.model, final_path, dict(state))

    def save_models(self, epoch: int, state: dict) -> None:
        """train_model_{epoch}, then train_model_latest (a copy), each written atomically."""
        numbered = self.checkpoint_path(int(epoch))
        self._save_one(numbered, state)
        self.writer.copy(numbered, self.checkpoint_path("latest"))

    # -- loops --------------------------------------------------------------------------------------
    @staticmethod
    def _summary(total_losses: dict[str, list[Any]], phase: str) -> dict[str, float]:
        out = {}
        for key, values in total_losses.items():
            values = _host_floats(values)
            out[f"{phase}_{key}_mean"] = float(np.mean(values))
            out[f"{phase}_{key}_std"] = float(np.std(values))
        return out

    @staticmethod
    def _accumulate(total_losses: dict[str, list[Any]], losses: dict[str, Any]) -> None:
        # A value still on the device (e.g. the reference learner's 0-d loss on a GPU) is kept as it is and
        # copied with the others at the end of the epoch (_summary): no synchronisation per meta-update.
        for key, value in losses.items():
            total_losses.setdefault(key, []).append(value if _on_device(value) else float(value))

    @staticmethod
    def _columns(updates: list[dict[str, Any]]) -> dict[str, list[Any]]:
        """The losses dicts of an epoch's meta-updates, as one list per key (keys in order of first
        appearance), the values as the learner returned them (_summary converts them)."""
        columns: dict[str, list[Any]] = {}
        for losses in updates:
            for key, value in losses.items():
                columns.setdefault(key, []).append(value)
        return columns

    @staticmethod
    def _postfix(losses: dict[str, Any]) -> dict[str, str]:
        """Progress-bar numbers: host values only (a value on the device is left out, never copied)."""
        out = {}
        for key, label in (("loss", "loss"), ("accuracy", "acc")):
            value = losses.get(key)
            if value is not None and not _on_device(value):
                out[label] = f"{float(value):.4f}"
        return out

    def _set_postfix(self, bar: tqdm.tqdm, losses: dict[str, Any]) -> None:
        if not bar.disable:
            bar.set_postfix(self._postfix(losses), refresh=False)

    # -- batches and evaluation -----------------------------------------------------------------------
    def _torch_device(self):
        import torch

        dev = self.device if self.device is not None else getattr(self.model, "device", "cpu")
        return torch.device(dev)

    @property
    def tasks_per_batch(self) -> int:
        """Tasks of one of the original's batches (num_of_gpus * batch_size * samples_per_iter)."""
        return int(getattr(self.data, "tasks_per_batch", self.args.batch_size))

    def _task_batches(self, set_name: str, total_batches: int, augment: bool, tasks_per_item: int | None = None):
        """The tasks of get_<set_name>_batches, prepared in the background (config key
        `num_dataprovider_workers` processes, 0: this one) and copied to the device (through pinned
        memory on a CUDA device) two batches ahead (mamlpp_fast.data.prefetch; on a CPU device our loader's
        batches are used as they come). A data loader without
        `batch_loader` (not ours) is read through its get_*_batches generators, re-cut to
        `tasks_per_item` tasks."""
        from .data.prefetch import prefetch_to_device, regroup_batches

        dev = self._torch_device()
        make = getattr(self.data, "batch_loader", None)
        if make is not None:
            host = make(set_name, total_batches, augment_images=augment, tasks_per_item=tasks_per_item,
                        num_workers=int(getattr(self.args, "num_dataprovider_workers", 0) or 0),
                        pin_memory=dev.type == "cuda")
            if dev.type == "cpu":
                return host  # CPU tensors already: nothing to copy (one generator less per batch)
        else:
            host = getattr(self.data, f"get_{set_name}_batches")(total_batches=total_batches, augment_images=augment)
            if tasks_per_item is not None and tasks_per_item != self.tasks_per_batch:
                host = regroup_batches(host, tasks_per_item)
        return prefetch_to_device(host, dev, depth=2)

    def evaluation_group_size(self) -> int | None:
        """Tasks per evaluation call: the config key `evaluation_batch_size` for a learner that has
        `evaluation_logits` (the fast learner); None (the original's batches, one run_validation_iter
        call each) for other learners and with `bn_backup_aliasing`, where evaluation changes the
        running statistics batch by batch."""
        if not hasattr(self.model, "evaluation_logits") or getattr(self.args, "bn_backup_aliasing", False):
            return None
        wanted = int(getattr(self.args, "evaluation_batch_size", 0) or self.tasks_per_batch)
        # Memory bound: a call holds a few activations of the first layer's size for every task, so the
        # group is capped where one such activation of all its tasks reaches EVAL_ACTIVATION_BYTES (never
        # below the training batch, whose second-order meta-update needs far more).
        a = self.args
        itemsize = 8 if str(getattr(a, "dtype", "float32")) == "float64" else 4
        per_task = (int(a.num_classes_per_set) * (int(a.num_samples_per_class) + int(a.num_target_samples))
                    * int(a.cnn_num_filters) * int(a.image_height) * int(a.image_width) * itemsize)
        fits = max(self.tasks_per_batch, EVAL_ACTIVATION_BYTES // max(per_task, 1))
        return max(1, min(wanted, fits))

    def evaluate_tasks(self, set_name: str, desc: str, keep_logits: bool = False) -> dict[str, Any]:
        """Run the learner on the fixed `num_evaluation_tasks` tasks of `set_name` ("val" or "test").

        Returns {"losses": one dict per batch of the original's size (tasks_per_batch) with the values
        run_validation_iter returns for it (loss, accuracy, loss_importance_vector_i), "logits": list of
        per-task float64 arrays (n_t, N) or None, "targets": list of per-task int64 arrays (n_t,) or None}.

        With the fast learner the tasks go `evaluation_group_size()` per call (evaluation_logits), the
        results stay on the device, and one device-to-host transfer at the end brings back the metrics
        of every batch (and the logits with keep_logits): per-task results, and so the statistics, are
        the same for any grouping. Other learners: one run_validation_iter call per batch, as the
        original."""
        import torch

        per_call = self.evaluation_group_size()
        batches = self._task_batches(set_name, self.num_eval_batches, False, per_call)
        out: dict[str, Any] = {"losses": [], "logits": [] if keep_logits else None,
                               "targets": [] if keep_logits else None}
        total = self.num_eval_batches * self.args.batch_size // self.tasks_per_batch * self.tasks_per_batch
        try:
            with self._bar(total=total, desc=desc, leave=False, unit="task") as bar:
                if per_call is None:
                    for batch in batches:
                        losses, per_task = self.model.run_validation_iter(data_batch=tuple(batch[:4]))
                        losses.pop("skipped", None)
                        out["losses"].append(losses)
                        if keep_logits:
                            y = batch[3].cpu().numpy() if isinstance(batch[3], torch.Tensor) else np.asarray(batch[3])
                            for t, p in enumerate(per_task):
                                out["logits"].append(np.asarray(p, dtype=np.float64))
                                out["targets"].append(y[t].reshape(-1).astype(np.int64))
                        bar.update(len(per_task))
                        self._set_postfix(bar, losses)
                    return out
                logits, targets = [], []
                for batch in batches:
                    preds, y = self.model.evaluation_logits(tuple(batch[:4]))
                    logits.append(preds)
                    targets.append(y)
                    bar.update(len(preds))
        finally:
            batches.close()
        if not logits:
            return out
        all_logits, all_targets = torch.cat(logits), torch.cat(targets)
        group = self.tasks_per_batch
        n_groups = all_logits.shape[0] // group
        metrics = [self.model.evaluation_metrics(all_logits[g * group:(g + 1) * group],
                                                 all_targets[g * group:(g + 1) * group]) for g in range(n_groups)]
        dtype = all_logits.dtype
        importance = self.model.get_per_step_loss_importance_vector().to(dtype)
        parts = [torch.stack([m[0] for m in metrics]).to(dtype), torch.stack([m[1] for m in metrics]).to(dtype),
                 importance.reshape(-1)]
        if keep_logits:
            parts += [all_targets.to(dtype).reshape(-1), all_logits.reshape(-1)]
        host = torch.cat(parts).cpu().numpy()  # the one device-to-host transfer of the pass
        loss, acc = host[:n_groups], host[n_groups:2 * n_groups]
        imp = host[2 * n_groups:2 * n_groups + importance.numel()]
        for g in range(n_groups):
            losses = {"loss": float(loss[g]), "accuracy": float(acc[g])}
            for i, value in enumerate(imp):
                losses[f"loss_importance_vector_{i}"] = float(value)
            out["losses"].append(losses)
        if keep_logits:
            k = 2 * n_groups + importance.numel()
            y = host[k:k + all_targets.numel()].astype(np.int64).reshape(all_targets.shape[0], -1)
            lg = host[k + all_targets.numel():].reshape(tuple(all_logits.shape)).astype(np.float64)
            out["logits"] = [lg[t] for t in range(lg.shape[0])]
            out["targets"] = [y[t] for t in range(y.shape[0])]
        return out

    def validate(self) -> dict[str, float]:
        """One pass over the fixed validation tasks; returns val_<metric>_mean/_std."""
        total: dict[str, list[float]] = {}
        for losses in self.evaluate_tasks("val", f"val   epoch {self.epoch + 1}")["losses"]:
            self._accumulate(total, losses)
        if not total:
            raise RuntimeError("the data loader produced no validation batches")
        return self._summary(total, "val")

    def _end_of_epoch(self, train_losses: dict[str, float], train_seconds: float | None = None) -> None:
        t_val = time.perf_counter()
        val_losses = self.validate()
        val_seconds = time.perf_counter() - t_val
        if val_losses["val_accuracy_mean"] > self.state["best_val_acc"]:
            self.state["best_val_acc"] = val_losses["val_accuracy_mean"]
            self.state["best_val_iter"] = self.state["current_iter"]
            self.state["best_epoch"] = int(self.state["best_val_iter"] / self.iters_per_epoch)
            self.log(f"mamlpp: best validation accuracy so far: {val_losses['val_accuracy_mean']:.4f}")
        self.epoch += 1
        epoch_summary = dict(train_losses)
        epoch_summary.update(val_losses)
        self.state.update(epoch_summary)
        per_epoch = self.state.setdefault("per_epoch_statistics", {})
        for key, value in epoch_summary.items():
            per_epoch.setdefault(key, []).append(value)
        self.state = _plain(self.state)
        t_ckpt = time.perf_counter()
        self.save_models(self.epoch, self.state)
        ckpt_seconds = time.perf_counter() - t_ckpt
        row = dict(epoch_summary)
        row["epoch"] = self.epoch
        row["epoch_run_time"] = time.time() - self.start_time
        # Where the epoch's time went (wall seconds; CSV only, like epoch_run_time), after the original's
        # columns.
        row["epoch_train_seconds"] = float("nan") if train_seconds is None else train_seconds
        row["epoch_val_seconds"] = val_seconds
        row["epoch_checkpoint_seconds"] = ckpt_seconds
        self._append_summary(row)
        self.start_time = time.time()
        self.log("mamlpp: epoch {} -> {} (train {} s, validation {:.2f} s, checkpoint {:.2f} s)".format(
            self.epoch, ", ".join(f"{k}: {v:.4f}" for k, v in epoch_summary.items() if k.endswith("_mean") and
                                  ("loss" in k or "accuracy" in k) and "importance" not in k),
            "?" if train_seconds is None else f"{train_seconds:.2f}", val_seconds, ckpt_seconds))

    def train(self) -> str:
        """Meta-train until total_epochs (or total_epochs_before_pause epochs in this run).

        Returns "done" or "paused"."""
        if self.state["current_iter"] >= self.total_iters:
            return "done"
        pause_after = int(getattr(self.args, "total_epochs_before_pause", 10 ** 9) or 10 ** 9)
        total_epochs = int(self.args.total_epochs)
        remaining = self.total_iters - int(self.state["current_iter"])
        stream_start = getattr(self.data, "total_train_iters_produced", None)
        # Our loader's training batches all hold tasks_per_batch tasks: counting batches is enough there.
        per_batch = self.tasks_per_batch if getattr(self.data, "batch_loader", None) is not None else None
        consumed_tasks = consumed_batches = 0
        batches = self._task_batches("train", remaining, self.augment_flag)
        # The loop's own work per meta-update is kept to a minimum (it runs in series with the learner and
        # with caches the learner has just evicted, where every line costs many times its warm cost): the
        # losses dicts are kept as returned and summarised at the epoch's end, and the bar is drawn by a
        # thread of its own (_TrainBar).
        updates: list[dict[str, Any]] = []
        skipped = 0
        bar = None
        iters_per_epoch = self.iters_per_epoch
        current_iter = int(self.state["current_iter"])
        t_train = time.perf_counter()
        try:
            for batch in batches:
                consumed_batches += 1
                if per_batch is None:
                    consumed_tasks += len(batch[0])
                if bar is None:
                    bar = _TrainBar(self._bar(total=iters_per_epoch, initial=current_iter % iters_per_epoch,
                                              desc=f"train epoch {self.epoch + 1}/{total_epochs}"))
                losses, _ = self.model.run_train_iter(data_batch=tuple(batch[:4]), epoch=current_iter // iters_per_epoch)
                if losses.pop("skipped", False):
                    # A non-finite meta-update the learner withheld (nonfinite_policy 'skip'): counted,
                    # and left out of the epoch's statistics (its loss is not a number).
                    skipped += 1
                    self.state["skipped_iterations"] = int(self.state.get("skipped_iterations", 0)) + 1
                else:
                    updates.append(losses)
                current_iter += 1
                self.state["current_iter"] = current_iter
                bar.count += 1
                bar.last = losses
                if current_iter % iters_per_epoch == 0:
                    train_seconds = time.perf_counter() - t_train
                    bar.close()
                    bar = None
                    if skipped:
                        self.log(f"mamlpp: warning: {skipped} of {self.iters_per_epoch} meta-updates of epoch "
                                 f"{self.epoch + 1} were skipped (non-finite loss or gradient)")
                    self._end_of_epoch(self._summary(self._columns(updates), "train"), train_seconds)
                    updates = []
                    skipped = 0
                    t_train = time.perf_counter()
                    self.epochs_done_in_this_run += 1
                    if current_iter >= self.total_iters:
                        break
                    if self.epochs_done_in_this_run >= pause_after:
                        self.log(f"mamlpp: paused after {self.epochs_done_in_this_run} epochs "
                                 "(total_epochs_before_pause); run the same command again to continue")
                        return "paused"
        finally:
            if bar is not None:
                bar.close()
            batches.close()
            if stream_start is not None:
                # The prefetcher reads ahead: the stream position is what was used, not what was read.
                self.data.total_train_iters_produced = stream_start + (
                    consumed_tasks if per_batch is None else consumed_batches * per_batch)
        if self.state["current_iter"] < self.total_iters:
            raise RuntimeError(f"the data loader stopped after iteration {self.state['current_iter']} of "
                               f"{self.total_iters}")
        return "done"

    # -- test protocol ------------------------------------------------------------------------------
    @property
    def test_summary_path(self) -> str:
        return os.path.join(self.logs_filepath, "test_summary.csv")

    def _ranked_epochs(self) -> list[tuple[int, float]]:
        """(epoch, val accuracy) of every epoch with statistics, best first (ties: later epoch first)."""
        stats = self.state.get("per_epoch_statistics", {})
        val_acc = np.asarray(stats.get("val_accuracy_mean", []), dtype=np.float64)
        if val_acc.size == 0:
            # A checkpoint of the original misses its last epoch's statistics; the CSV has them all.
            if self.summary_header and "val_accuracy_mean" in self.summary_header:
                col = self.summary_header.index("val_accuracy_mean")
                ecol = self.summary_header.index("epoch")
                pairs = [(int(float(r[ecol])), float(r[col])) for r in self.summary_rows]
                pairs.sort(key=lambda p: p[1], reverse=True)
                return pairs
            return []
        order = np.argsort(val_acc, kind="stable")[::-1]
        return [(int(i) + 1, float(val_acc[i])) for i in order]

    def evaluate_test_set_using_the_best_models(self, top_n_models: int | None = None) -> dict[str, float]:
        """The original's test protocol: an ensemble of the top-n validation checkpoints on the test tasks."""
        self.writer.wait()  # every checkpoint is on disk
        top_n = int(top_n_models or self.max_models_to_save)
        ranked = self._ranked_epochs()
        if not ranked:
            raise ExperimentError(f"no per-epoch validation statistics in {self.root}: nothing to choose test models from")
        chosen: list[int] = []
        for epoch, acc in ranked:
            if len(chosen) >= top_n:
                break
            path = self.checkpoint_path(epoch)
            try:
                load_checkpoint(path)
            except CheckpointError as e:
                warnings.warn(f"{e}; skipping it in the test ensemble", RuntimeWarning, stacklevel=2)
                self.log(f"mamlpp: warning: {e}; skipping it in the test ensemble")
                continue
            chosen.append(epoch)
        if not chosen:
            raise CheckpointError(f"none of the best validation checkpoints in {self.saved_models_filepath} is readable")
        self.log("mamlpp: test ensemble of epochs " + ", ".join(
            f"{e} (val acc {a:.4f})" for e, a in ranked if e in chosen))

        per_model_preds: list[list[np.ndarray]] = []
        targets: list[np.ndarray] | None = None
        for m, epoch in enumerate(chosen):
            try:
                self.model.load_model(model_save_dir=self.saved_models_filepath, model_name=CHECKPOINT_PREFIX,
                                      model_idx=epoch)
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"cannot load checkpoint {self.checkpoint_path(epoch)}: "
                                      f"{type(e).__name__}: {e}") from None
            result = self.evaluate_tasks("test", f"test  model {m + 1}/{len(chosen)} (epoch {epoch})",
                                         keep_logits=True)
            preds, these_targets = result["logits"], result["targets"]
            if targets is None:
                targets = these_targets
            elif len(targets) != len(these_targets) or any(
                    not np.array_equal(a, b) for a, b in zip(targets, these_targets)):
                raise RuntimeError("the test tasks differ between two passes of get_test_batches: the ensemble "
                                   "needs the same tasks for every model")
            per_model_preds.append(preds)

        ensemble = np.mean(np.stack([np.stack(p) for p in per_model_preds]), axis=0)  # (tasks, N*T, N)
        correct = np.equal(ensemble.argmax(-1), np.stack(targets))
        result = {"test_accuracy_mean": float(np.mean(correct)), "test_accuracy_std": float(np.std(correct))}
        self._write_test_summary(result)
        self.log(f"mamlpp: test accuracy {result['test_accuracy_mean']:.4f} +- {result['test_accuracy_std']:.4f} "
                 f"({len(targets)} tasks, {len(chosen)} models) -> {self.test_summary_path}")
        return result

    def _write_test_summary(self, result: dict[str, float]) -> None:
        if not self.writer.writes:
            return
        text = _csv_text(list(result.keys()), [list(result.values())])
        path = self.test_summary_path
        if os.path.exists(path):
            with open(path, newline="") as f:
                old = f.read()
            if old != text:
                aside = path[:-4] + f"_{time.strftime('%Y%m%d-%H%M%S')}.csv"
                shutil.copyfile(path, aside)
                self.log(f"mamlpp: the earlier test summary is kept in {aside}")
        self.writer.write_text(path, text)

    def read_test_summary(self) -> dict[str, float] | None:
        if not os.path.exists(self.test_summary_path):
            return None
        with open(self.test_summary_path, newline="") as f:
            rows = list(csv.reader(f))
        if len(rows) < 2:
            return None
        return {k: float(v) for k, v in zip(rows[0], rows[1])}

    # -- everything ---------------------------------------------------------------------------------
    def run_experiment(self) -> dict[str, Any]:
        """Train (unless evaluate_on_test_set_only), then run the test protocol.

        Returns {"status": "done"|"paused"|"tested", "current_iter", "best_val_acc", "best_epoch",
        "test_accuracy_mean", "test_accuracy_std" (when tested), "experiment_folder"}."""
        try:
            with _xp.os_errors_as_experiment_errors(self.root):
                return self._run_experiment()
        finally:
            self._lock.release()

    def close(self) -> None:
        """Give back this builder's share of the experiment folder's lock (run_experiment does it too)."""
        self._lock.release()

    def _run_experiment(self) -> dict[str, Any]:
        result: dict[str, Any] = {"experiment_folder": self.root}
        evaluate_only = bool(getattr(self.args, "evaluate_on_test_set_only", False))
        start_iter = int(self.state["current_iter"])
        status = "tested" if evaluate_only else self.train()
        result.update(status=status, current_iter=int(self.state["current_iter"]),
                      best_val_acc=float(self.state.get("best_val_acc", 0.0)),
                      best_epoch=int(self.state.get("best_epoch", 0)))
        if status == "paused":
            return result
        previous = self.read_test_summary()
        if not evaluate_only and start_iter >= self.total_iters and previous is not None:
            self.log(f"mamlpp: experiment already complete; test results in {self.test_summary_path}: "
                     f"{previous} (use `mamlpp test` to run the test protocol again)")
            result.update(previous)
            return result
        result.update(self.evaluate_test_set_using_the_best_models())
        return result


def run_experiment(args: Any, *, config_path: str | os.PathLike | None = None, overwrite: bool = False,
                   progress: bool = True, model: Any = None, data: Any = None, device: Any = None,
                   log: Callable[[str], None] | None = None, allow_config_change: bool = False) -> dict[str, Any]:
    """Build the data loader, the learner and the experiment from `args`, and run it.

    `args.learner` picks the learner ("fast" falls back to "reference", with a warning, when the fast
    learner is not available); `args.device` the device. `model`/`data` may be given to reuse instances.
    The experiment folder's lock is taken before the dataset is loaded, so a second run on a busy
    folder stops at once.
    """
    from .common import resolve_device

    dev = device if device is not None else resolve_device(getattr(args, "device", "auto"))
    if getattr(dev, "type", None) == "cuda":
        import torch

        if not torch.cuda.is_available():
            from .config import ConfigError

            raise ConfigError(f"config key 'device' asks for {getattr(args, 'device', dev)!r} but torch sees no CUDA "
                              "device (use --device cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            from .config import ConfigError

            raise ConfigError(f"config key 'device' asks for {str(dev)!r} but torch sees {torch.cuda.device_count()} "
                              "CUDA device(s)")
    lock = _early_lock(args, log)
    try:
        return _build_and_run(args, dev, data, model, config_path=config_path, overwrite=overwrite, progress=progress,
                              log=log, allow_config_change=allow_config_change)
    finally:
        lock.release()


def _early_lock(args: Any, log: Callable[[str], None] | None, ranks: int = 1) -> "_xp.LockHandle":
    """The experiment folder's lock, taken before anything slow (a `test` of a missing folder takes none)."""
    if getattr(args, "experiment_name", None) in (None, "", "None"):
        return _xp.LockHandle(None)  # ExperimentBuilder reports the missing name
    root = _xp.experiment_root(getattr(args, "experiment_dir", None) or "Experiments", args.experiment_name)
    evaluate_only = bool(getattr(args, "evaluate_on_test_set_only", False))
    if evaluate_only and not os.path.isdir(root):
        return _xp.LockHandle(None)
    return _xp.acquire_lock(root, "test" if evaluate_only else "train", log=log, ranks=ranks)


def _build_and_run(args: Any, dev: Any, data: Any, model: Any, **kw: Any) -> dict[str, Any]:
    if data is None:
        from .data import MetaLearningSystemDataLoader

        data = MetaLearningSystemDataLoader(args=args, current_iter=0)  # fails early on a missing dataset
    if model is None:
        cls = learner_class(getattr(args, "learner", "fast"))
        model = cls(im_shape=(2, args.image_channels, args.image_height, args.image_width), device=dev, args=args)
    builder = ExperimentBuilder(args, data, model, dev, **kw)
    return builder.run_experiment()


def learner_class(name: str):
    """The learner class for `name` ("fast" or "reference")."""
    if name == "reference":
        from .reference import MAMLFewShotClassifier

        return MAMLFewShotClassifier
    try:
        from .fast import MAMLFewShotClassifier
    except ImportError as e:
        warnings.warn(f"the fast learner is not available ({e}); using the reference learner", RuntimeWarning,
                      stacklevel=2)
        from .reference import MAMLFewShotClassifier
    return MAMLFewShotClassifier
