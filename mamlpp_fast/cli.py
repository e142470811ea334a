"""`mamlpp`: train, test and benchmark MAML++ from the original's experiment JSON files.

    mamlpp train --config configs/omniglot_maml++_5_way_1_shot.json [--dataset-dir D] [--experiment-dir E]
                 [--learner fast|reference] [--backend auto|native|triton|torch] [--device auto|cpu|cuda]
                 [--total-epochs N] [--total-iter-per-epoch N] [--num-evaluation-tasks N] [--overwrite]
                 [--allow-config-change]
    mamlpp test  --config X.json [same options]       # the test protocol only, from saved checkpoints
    mamlpp plot-lrs <experiment folder> [--epoch N|best] [--out DIR]   # learned LSLR rates, MSL, curves
    python -m bench.run [...]                          # benchmarks: from a checkout (bench/ is not installed)
    torchrun --nproc_per_node R -m mamlpp_fast train --config X.json   # data-parallel (tasks over ranks)

The original's command line works with the command swapped (`python train_maml_system.py` ->
`mamlpp`, or `mamlpp train`): `--name_of_args_json_file X.json` is `--config X.json`, the environment
variable DATASET_DIR is the dataset folder, and any other `--key value` flag of the original
(`--batch_size 4`, `--gpu_to_use 0`, `--continue_from_epoch latest`, ...) overrides that key of the
JSON file. Unlike the original (whose JSON wins over its flags), flags given on the command line win.

Logging is configured here, once (`_configure_logging`): warnings by default; `-v` shows the package's
INFO messages (which op backend and convolution implementation run, ...), `-vv` DEBUG too.

Exit status: 0 on success; 2 for a configuration, dataset, checkpoint or experiment-folder problem
(one line on stderr, no traceback); 130 when interrupted.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser", "parse_overrides"]

PROG = "mamlpp"

# Our flags -> config keys.
_FLAG_KEYS = {
    "dataset_dir": "dataset_dir",
    "experiment_dir": "experiment_dir",
    "experiment_name": "experiment_name",
    "learner": "learner",
    "backend": "backend",
    "device": "device",
    "dtype": "dtype",
    "total_epochs": "total_epochs",
    "total_iter_per_epoch": "total_iter_per_epoch",
    "num_evaluation_tasks": "num_evaluation_tasks",
    "continue_from_epoch": "continue_from_epoch",
    "seed": "seed",
}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "--name_of_args_json_file", dest="config", metavar="X.json",
                   help="experiment JSON in the original's format (also --name_of_args_json_file)")
    p.add_argument("--dataset-dir", "--dataset_dir", dest="dataset_dir", metavar="D",
                   help="folder holding the dataset folder named by dataset_path (default: $DATASET_DIR)")
    p.add_argument("--experiment-dir", "--experiment_dir", dest="experiment_dir", metavar="E",
                   help="folder of experiment outputs (default: ./Experiments); results go to E/<experiment_name>/")
    p.add_argument("--experiment-name", "--experiment_name", dest="experiment_name", metavar="NAME",
                   help="override experiment_name (the output subfolder)")
    p.add_argument("--learner", choices=("fast", "reference"),
                   help="fast: all tasks at once (default); reference: one task at a time, like the original")
    p.add_argument("--backend", choices=("auto", "native", "triton", "torch", "cpp", "cuda"),
                   help="op backend of the fast learner (default auto; cpp and cuda: native on that device only)")
    p.add_argument("--device", metavar="auto|cpu|cuda", help="device (default auto: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "float64"), help="parameter/compute dtype (default float32)")
    p.add_argument("--total-epochs", "--total_epochs", dest="total_epochs", type=int, metavar="N")
    p.add_argument("--total-iter-per-epoch", "--total_iter_per_epoch", dest="total_iter_per_epoch", type=int,
                   metavar="N")
    p.add_argument("--num-evaluation-tasks", "--num_evaluation_tasks", dest="num_evaluation_tasks", type=int,
                   metavar="N")
    p.add_argument("--continue-from-epoch", "--continue_from_epoch", dest="continue_from_epoch",
                   metavar="latest|from_scratch|N",
                   help="resume point (default latest; the JSON's value is ignored, as in the original)")
    p.add_argument("--seed", type=int, help="torch seed (as the original's --seed; default 104)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="log the package's choices (op backend, convolution implementation): -v INFO, -vv DEBUG")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False,
        description="Fast, exact MAML++ (How to train your MAML) from the original's experiment JSON files.",
        epilog="Any other --key value is applied as an override of that config key (the original's flags).")
    sub = parser.add_subparsers(dest="command", metavar="{train,test,plot-lrs}")
    train = sub.add_parser("train", allow_abbrev=False, help="meta-train, validate each epoch, then test",
                           description="Meta-train (resuming from the latest checkpoint when the experiment "
                                       "folder has one), validate each epoch, then run the test protocol.")
    _add_common(train)
    train.add_argument("--overwrite", action="store_true",
                       help="delete the files this tool wrote in the experiment folder (checkpoints, logs, plots, "
                            "config records; anything else is kept) and start from scratch")
    train.add_argument("--allow-config-change", "--allow_config_change", dest="allow_config_change",
                       action="store_true",
                       help="resume even though training keys differ from the experiment's recorded configuration "
                            "(the change is recorded in config_history.json)")
    train.add_argument("--distributed", action="store_true",
                       help="data-parallel meta-training under torchrun (tasks split over ranks; automatic "
                            "when WORLD_SIZE > 1)")
    test = sub.add_parser("test", allow_abbrev=False,
                          help="test protocol only: ensemble of the best validation checkpoints",
                          description="Run the test protocol from saved checkpoints: the max_models_to_save "
                                      "best validation checkpoints, logits averaged over the test tasks.")
    _add_common(test)
    sub.add_parser("plot-lrs", add_help=False,
                   help="plots of the learned inner learning rates, MSL weights and curves of an experiment")
    return parser


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text


def parse_overrides(tokens: Sequence[str]) -> dict[str, Any]:
    """`--key value`, `--key=value`, `--key v1 v2 ...` (a list) and bare `--flag` (True) -> dict.

    Keys may use '-' or '_'. Values are read as JSON where they parse (numbers, true/false, lists),
    else kept as strings ("True"/"False" strings become booleans in load_args, as in the original).
    """
    out: dict[str, Any] = {}
    i = 0
    tokens = list(tokens)
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or tok == "--":
            raise ValueError(f"unexpected argument {tok!r} (options are --key value)")
        key, eq, val = tok[2:].partition("=")
        key = key.replace("-", "_")
        if not key:
            raise ValueError(f"unexpected argument {tok!r}")
        if eq:
            out[key] = _parse_value(val)
            i += 1
            continue
        values = []
        i += 1
        while i < len(tokens) and not tokens[i].startswith("--"):
            values.append(tokens[i])
            i += 1
        if not values:
            out[key] = True
        elif len(values) == 1:
            out[key] = _parse_value(values[0])
        else:
            out[key] = [_parse_value(v) for v in values]
    return out


def _fail(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    sys.stderr.flush()
    return 2


def _show_warning(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001
    print(f"{PROG}: warning: {message}", file=sys.stderr if file is None else file)


def _configure_logging(verbosity: int) -> None:
    """The one logging set-up of the program: a handler on the package's logger "mamlpp_fast" writing
    `mamlpp: <message>` to stderr, at WARNING, INFO (-v) or DEBUG (-vv). Other libraries' loggers and
    the root logger are left alone."""
    log = logging.getLogger("mamlpp_fast")
    log.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO if verbosity == 1 else logging.WARNING)
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
        log.addHandler(handler)


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever sys.stderr is when a record is emitted (not the stream of the
    moment it was made: main() may run several times in one process, e.g. under a test runner that swaps
    sys.stderr, and a handler holding an old, closed stream would fail)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ and setStream assign it; the property always reads sys.stderr
        pass


def _resolve_command(argv: list[str]) -> list[str]:
    """Accept the original's form (no subcommand, `--name_of_args_json_file X`): it means `train`."""
    if argv and argv[0] in ("train", "test", "bench", "plot-lrs", "-h", "--help"):
        return argv
    if any(a == "--name_of_args_json_file" or a.startswith("--name_of_args_json_file=") or a == "--config"
           or a.startswith("--config=") for a in argv):
        return ["train"] + argv
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = _resolve_command(argv)
    if argv and argv[0] == "bench":
        return _fail("'mamlpp bench' was removed: run `python -m bench.run [options]` from the repository "
                     "root (the benchmarks are in bench/, which is not part of the installed package)")
    if argv and argv[0] == "plot-lrs":
        from .plots import main as plots_main
        return plots_main(argv[1:])
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    opts, rest = parser.parse_known_args(argv)
    if opts.command not in ("train", "test"):
        parser.print_help(sys.stderr)
        return 2
    warnings.showwarning = _show_warning
    _configure_logging(opts.verbose)
    try:
        extra = parse_overrides(rest)
    except ValueError as e:
        return _fail(str(e))
    if not opts.config:
        return _fail("no configuration: pass --config X.json (or --name_of_args_json_file X.json)")

    overrides: dict[str, Any] = dict(extra)
    overrides.pop("name_of_args_json_file", None)
    for flag, key in _FLAG_KEYS.items():
        value = getattr(opts, flag, None)
        if value is not None:
            overrides[key] = value
    if overrides.get("dataset_dir") is None and os.environ.get("DATASET_DIR"):
        overrides["dataset_dir"] = os.environ["DATASET_DIR"]
    # As the original: continue_from_epoch comes from the command line only (its JSON value is ignored).
    overrides.setdefault("continue_from_epoch", "latest")
    # The original's --gpu_to_use -1 meant "run on the CPU"; other values select a GPU through
    # CUDA_VISIBLE_DEVICES in its scripts, so they need nothing here.
    gpu = overrides.get("gpu_to_use")
    if opts.device is None and isinstance(gpu, int) and not isinstance(gpu, bool) and gpu < 0:
        overrides["device"] = "cpu"
    if opts.command == "test":
        overrides["evaluate_on_test_set_only"] = True

    from .config import load_args
    from .errors import MamlppError
    from .trainer import run_experiment

    try:
        args = load_args(opts.config, **overrides)
        if getattr(args, "experiment_name", None) in (None, "", "None"):
            args.experiment_name = Path(opts.config).stem
        args.experiment_name = str(args.experiment_name)
        from .distributed import is_distributed_env, run_distributed_experiment
        runner = run_experiment
        if getattr(opts, "distributed", False) or is_distributed_env():
            runner = run_distributed_experiment
        result = runner(args, config_path=opts.config, overwrite=bool(getattr(opts, "overwrite", False)),
                        progress=opts.progress, allow_config_change=bool(getattr(opts, "allow_config_change", False)))
    except MamlppError as e:  # a user-caused error or the stop policy: one line, exit 2
        return _fail(str(e))
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; the last completed epoch's checkpoint is kept (run again to resume)",
              file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports (and writes files)
        return 0
    status = result.get("status")
    line = f"{PROG}: {status}: {result['experiment_folder']}"
    if "test_accuracy_mean" in result:
        line += f" test_accuracy_mean={result['test_accuracy_mean']:.4f} test_accuracy_std={result['test_accuracy_std']:.4f}"
    print(line)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
