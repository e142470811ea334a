"""The experiment folder's safety rules: where it is, who writes it, what its configuration was, and
which of its files are ours.

- **Where.** `<experiment_dir>/<experiment_name>/`, resolved once. `experiment_name` must be a plain
  name (no path separator, not `.` or `..`, not absolute), so the outputs never land outside
  `experiment_dir` (`check_experiment_name`).
- **Who.** One writer per experiment folder: `acquire_lock` takes an exclusive advisory lock
  (`fcntl.flock`) on `<folder>/mamlpp.lock`, a file holding the owner's pid, host, command and start
  time. The kernel drops the lock when its process ends in any way (exit, exception, SIGKILL), so a
  lock file left behind by a killed run is recognised as stale (it exists but nobody holds it) and
  taken over, with a line saying whose it was. A second `train` or `test` on a locked folder stops at
  once with an `ExperimentError` naming the running process. The lock file is removed when the run
  ends. Within one process the lock is re-entrant (the CLI takes it before loading the dataset, the
  `ExperimentBuilder` takes it again); under torchrun only rank 0 takes it, for all ranks
  (`mamlpp_fast.distributed`).
- **What configuration.** `config.json` records the configuration the experiment's checkpoints were
  trained with and `config_history.json` every configuration it has had (`compare_configs` sorts the
  keys that differ on resume into refused, training, and free ones; see `NETWORK_TASK_KEYS` and
  `FREE_KEYS`).
- **Which files are ours.** `tool_outputs` lists exactly what this package writes into an experiment
  folder (checkpoints, its logs, its plots, its configuration records); `--overwrite` deletes those and
  nothing else (`remove_tool_outputs`).
- **OS errors** on the folder (a file where a folder should be, no permission, no space) become
  one-line `ExperimentError`s naming the path (`os_errors_as_experiment_errors`).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterator

from .errors import ConfigError, ExperimentError

__all__ = ["LOCK_NAME", "CONFIG_SNAPSHOT", "CONFIG_HISTORY", "NETWORK_TASK_KEYS", "FREE_KEYS",
           "check_experiment_name", "experiment_root", "ensure_folder", "acquire_lock", "LockHandle",
           "compare_configs", "format_diffs", "tool_outputs", "remove_tool_outputs",
           "os_errors_as_experiment_errors"]

LOCK_NAME = "mamlpp.lock"
CONFIG_SNAPSHOT = "config.json"
CONFIG_HISTORY = "config_history.json"


# ----------------------------------------------------------------------------------------------------
# Where
# ----------------------------------------------------------------------------------------------------
def check_experiment_name(name: Any) -> str:
    """`name` as a string, if it is a plain folder name; else ConfigError naming it."""
    text = str(name)
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if (text in ("", ".", "..") or any(s in text for s in seps) or "\0" in text or os.path.isabs(text)):
        raise ConfigError(f"config key 'experiment_name' must be a plain folder name (no path separators, not "
                          f"'.' or '..', not absolute), got {text!r}: the outputs go to "
                          "<experiment_dir>/<experiment_name>/, so choose the folder with --experiment-dir")
    return text


def experiment_root(experiment_dir: Any, experiment_name: Any) -> str:
    """The absolute experiment folder `<experiment_dir>/<experiment_name>` (name checked)."""
    name = check_experiment_name(experiment_name)
    return os.path.abspath(os.path.join(os.fspath(experiment_dir or "Experiments"), name))


def _blocking_file(path: str) -> str | None:
    """The first component of `path` (or `path` itself) that exists but is not a folder, if any."""
    path = os.path.abspath(path)
    parts = []
    head = path
    while True:
        parts.append(head)
        parent = os.path.dirname(head)
        if parent == head:
            break
        head = parent
    for p in reversed(parts):
        if os.path.lexists(p) and not os.path.isdir(p):
            return p
        if not os.path.exists(p):
            return None
    return None


def _os_message(e: OSError, path: str, action: str) -> str:
    blocking = _blocking_file(path) if e.errno in (errno.ENOTDIR, errno.EEXIST) else None
    if blocking is not None:
        return f"cannot {action} {path}: {blocking} is a file, not a folder"
    reason = e.strerror or str(e)
    where = e.filename if isinstance(e.filename, str) and e.filename else path
    hint = {errno.ENOSPC: " (free space on that disk, then run the same command again to resume)",
            errno.EDQUOT: " (disk quota exceeded; free space, then run the same command again to resume)",
            errno.EACCES: " (no permission: choose another --experiment-dir or fix the folder's permissions)",
            errno.EPERM: " (not permitted: choose another --experiment-dir or fix the folder's permissions)",
            errno.EROFS: " (read-only file system: choose another --experiment-dir)"}.get(e.errno, "")
    return f"cannot {action} {where}: {reason}{hint}"


def ensure_folder(path: str, what: str = "folder") -> list[str]:
    """Create `path` (and missing parents); returns the folders created, outermost first.

    ExperimentError naming the path when a file stands where a folder should be, or on any OS error."""
    path = os.path.abspath(path)
    missing = []
    head = path
    while not os.path.lexists(head):
        missing.append(head)
        parent = os.path.dirname(head)
        if parent == head:
            break
        head = parent
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ExperimentError(f"cannot use the {what} {path}: it exists but is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ExperimentError(_os_message(e, path, f"create the {what}")) from None
    return list(reversed(missing))


@contextlib.contextmanager
def os_errors_as_experiment_errors(root: str) -> Iterator[None]:
    """Turn an OSError about a path inside `root` (or without a path) into a one-line ExperimentError."""
    try:
        yield
    except OSError as e:
        filename = e.filename if isinstance(e.filename, str) else None
        inside = filename is None or os.path.abspath(filename).startswith(os.path.abspath(root) + os.sep) \
            or os.path.abspath(filename) == os.path.abspath(root)
        if not inside or isinstance(e, (BlockingIOError, ConnectionError, TimeoutError)):
            raise
        raise ExperimentError(_os_message(e, filename or root, "write to the experiment folder at")) from None


# ----------------------------------------------------------------------------------------------------
# Who: the lock
# ----------------------------------------------------------------------------------------------------
class _Held:
    def __init__(self, path: str, fd: int, created: list[str]):
        self.path, self.fd, self.created, self.count = path, fd, created, 1


_HELD: dict[str, _Held] = {}
_GUARD = threading.Lock()


class LockHandle:
    """One holder's share of an experiment folder's lock; `release()` is idempotent."""

    def __init__(self, key: str | None):
        self._key = key

    @property
    def held(self) -> bool:
        return self._key is not None

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None:
            return
        with _GUARD:
            held = _HELD.get(key)
            if held is None:
                return
            held.count -= 1
            if held.count > 0:
                return
            del _HELD[key]
            _unlock(held)

    def __enter__(self) -> "LockHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self):  # a builder dropped without running: give its share back
        try:
            self.release()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


def _unlock(held: _Held) -> None:
    try:
        st, fst = os.stat(held.path), os.fstat(held.fd)
        if (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino):
            os.unlink(held.path)  # while still locked, so nobody takes over a file that is going away
    except OSError:
        pass
    try:
        os.close(held.fd)
    except OSError:
        pass
    for folder in reversed(held.created):  # folders this run created and left empty (a failed start)
        try:
            os.rmdir(folder)
        except OSError:
            break


def _release_all_at_exit() -> None:
    with _GUARD:
        for key in list(_HELD):
            _unlock(_HELD.pop(key))


import atexit  # noqa: E402

atexit.register(_release_all_at_exit)


def _read_owner(fd: int) -> dict:
    try:
        size = os.fstat(fd).st_size
        data = os.pread(fd, min(size, 65536), 0) if size else b""
        owner = json.loads(data.decode("utf-8")) if data.strip() else {}
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe_owner(owner: dict) -> str:
    if not owner:
        return "another process (it has not written its pid yet)"
    parts = [f"mamlpp {owner.get('command', '?')} (pid {owner.get('pid', '?')} on host {owner.get('host', '?')}"]
    if owner.get("started"):
        parts.append(f", started {owner['started']}")
    if owner.get("ranks", 1) not in (1, None):
        parts.append(f", {owner['ranks']} data-parallel ranks")
    return "".join(parts) + ")"


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


def acquire_lock(root: str, command: str = "train", log: Callable[[str], None] | None = None,
                 ranks: int = 1) -> LockHandle:
    """Take the experiment folder's lock (creating the folder if needed) for this process.

    The lock is held until the returned handle's `release()` (or until the handle is garbage: keep a
    reference to it for as long as the folder is written), and at the latest until the process ends.

    Raises ExperimentError at once when another process holds it (naming that process), or when the
    folder cannot be created or the lock file written. A lock file nobody holds (its process was killed)
    is taken over, with a line through `log` naming its former owner."""
    root = os.path.abspath(root)
    say = log or (lambda m: print(m, file=sys.stdout, flush=True))
    with _GUARD:
        key = os.path.realpath(root)
        if key in _HELD:
            _HELD[key].count += 1
            return LockHandle(key)
        created = ensure_folder(root, "experiment folder")
        path = os.path.join(root, LOCK_NAME)
        try:
            fd, previous = _lock_file(path)
        except BaseException:
            for folder in reversed(created):
                try:
                    os.rmdir(folder)
                except OSError:
                    break
            raise
        if previous:
            say(f"mamlpp: taking over the stale lock {path} of {_describe_owner(previous)}: that process no "
                "longer holds it (it was killed or crashed)")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "ranks": int(ranks)}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode("utf-8"), 0)
            os.fsync(fd)
        except OSError as e:
            _unlock(_Held(path, fd, created))
            raise ExperimentError(_os_message(e, path, "write the lock file")) from None
        _HELD[key] = _Held(path, fd, created)
        return LockHandle(key)


ORPHAN_WAIT_S = 15.0  # how long a lock whose recorded owner is dead may still be held by its children


def _wait_for_lock(fd: int, seconds: float) -> bool:
    """Try the lock of `fd` until it is taken or `seconds` have passed."""
    import fcntl

    deadline = time.time() + seconds
    while time.time() < deadline:
        time.sleep(0.1)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            continue
        except OSError:
            return False
    return False


def _forget_locks_in_child() -> None:
    """After a fork, in the child: close the child's copies of the lock files' descriptors and forget them.

    A flock belongs to the open file description, which a forked child shares: a data-loader worker that
    outlives a killed trainer by a moment would otherwise keep the experiment folder locked. The parent's own
    descriptor still holds the lock. (No lock is taken here: another thread may have held _GUARD at the fork.)"""
    for held in list(_HELD.values()):
        try:
            os.close(held.fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def _lock_file(path: str) -> tuple[int, dict]:
    """(locked fd of `path`, the stale owner record found in it or {})."""
    import fcntl

    for _ in range(50):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except IsADirectoryError:
            raise ExperimentError(f"cannot lock the experiment folder: {path} is a folder, not a lock file") from None
        except OSError as e:
            raise ExperimentError(_os_message(e, path, "create the lock file")) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            deadline = time.time() + 1.0
            while not owner and time.time() < deadline:  # the owner writes its record right after locking
                time.sleep(0.02)
                owner = _read_owner(fd)
            if not (owner and owner.get("host") == socket.gethostname() and not _pid_alive(owner.get("pid"))
                    and _wait_for_lock(fd, ORPHAN_WAIT_S)):
                os.close(fd)
                raise ExperimentError(
                    f"experiment folder {os.path.dirname(path)} is in use by {_describe_owner(owner)}: one run at "
                    f"a time writes an experiment folder; wait for it to end, stop it, or choose another "
                    "experiment_name/--experiment-dir") from None
            # The recorded owner is dead, yet the lock was held: by a process that inherited it (a child that
            # outlived the owner by a moment), and it has now let go. A stale lock: taken over below.
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise ExperimentError(_os_message(e, path, "lock")) from None
            # No file locks on this file system: fall back to the owner's pid (same host only).
            owner = _read_owner(fd)
            if owner and (owner.get("host") != socket.gethostname() or _pid_alive(owner.get("pid"))) \
                    and owner.get("pid") != os.getpid():
                os.close(fd)
                raise ExperimentError(
                    f"experiment folder {os.path.dirname(path)} is in use by {_describe_owner(owner)} (this file "
                    f"system has no file locks; if that process is gone, delete {path})") from None
            return fd, owner
        # Locked: make sure it is still the file at `path` (its owner may have removed it meanwhile).
        try:
            st, fst = os.stat(path), os.fstat(fd)
        except FileNotFoundError:
            os.close(fd)
            continue
        if (st.st_dev, st.st_ino) != (fst.st_dev, fst.st_ino):
            os.close(fd)
            continue
        return fd, _read_owner(fd)
    raise ExperimentError(f"cannot lock {path}: it keeps being replaced by another process")


# ----------------------------------------------------------------------------------------------------
# What configuration
# ----------------------------------------------------------------------------------------------------
# Keys that change the network (its tensors or what it computes) or the task distribution (what a task
# is): the checkpoints of the experiment mean something else under other values. Refused on resume.
NETWORK_TASK_KEYS = frozenset((
    # network
    "image_channels", "image_height", "image_width", "num_classes_per_set", "cnn_num_filters", "num_stages",
    "conv_padding", "max_pooling", "per_step_bn_statistics", "number_of_training_steps_per_iter",
    "enable_inner_loop_optimizable_bn_params", "learnable_bn_gamma", "learnable_bn_beta", "norm_layer",
    "learnable_per_layer_per_step_inner_loop_learning_rate", "learnable_batch_norm_momentum",
    "cnn_blocks_per_stage",
    # task distribution
    "dataset_name", "num_samples_per_class", "num_target_samples", "train_val_test_split",
    "indexes_of_folders_indicating_class", "sets_are_pre_split", "labels_as_int", "reverse_channels",
    "load_from_npz_files", "synthetic_seed", "synthetic_num_classes", "synthetic_images_per_class",
))

# Keys that only affect evaluation, reporting, where files are, or how the same function is computed
# (devices and backends compute the same model up to rounding): they may change on resume, with a line.
FREE_KEYS = frozenset((
    # evaluation and reporting
    "num_evaluation_tasks", "number_of_evaluation_steps_per_iter", "max_models_to_save", "val_seed",
    "test_seed", "evaluate_on_test_set_only", "evalute_on_test_set_only",
    # where things are, how this run is started
    "experiment_dir", "experiment_name", "dataset_dir", "continue_from_epoch", "total_epochs_before_pause",
    "name_of_args_json_file", "num_dataprovider_workers", "gpu_to_use", "num_of_gpus", "use_cuda", "use_gdrive",
    "reset_stored_filepaths", "reset_stored_paths", "load_into_memory",
    # same function, other implementation
    "learner", "backend", "device", "conv_impl", "first_block", "bn_pool", "head", "cudnn_benchmark", "cuda_graph",
    "conv_streams",
))


# How this run was started (`train` or `test`, where to resume from), not what the experiment is.
_RUN_MODE_KEYS = frozenset(("evaluate_on_test_set_only", "evalute_on_test_set_only", "continue_from_epoch"))


def _norm(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_norm(v) for v in value]
    if isinstance(value, list):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _norm(v) for k, v in value.items()}
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < 2 ** 53 else value
    return str(value)


def compare_configs(recorded: dict, current: dict, known: set | frozenset | None = None) -> dict[str, list]:
    """Keys whose values differ between the recorded configuration and the current one.

    Returns {"refused": [...], "training": [...], "free": [...]} of (key, recorded value, current value):
    refused = NETWORK_TASK_KEYS, free = FREE_KEYS and keys mamlpp_fast does not read, training = every
    other known key. A key missing from the record (written by an older version) is not compared."""
    if known is None:
        from .config import DEFAULTS, REQUIRED

        known = set(DEFAULTS) | set(REQUIRED)
    out: dict[str, list] = {"refused": [], "training": [], "free": []}
    for key in sorted(set(recorded) & set(current) - _RUN_MODE_KEYS):
        a, b = _norm(recorded[key]), _norm(current[key])
        if a == b:
            continue
        if key in NETWORK_TASK_KEYS:
            out["refused"].append((key, a, b))
        elif key in FREE_KEYS or key not in known:
            out["free"].append((key, a, b))
        else:
            out["training"].append((key, a, b))
    return out


def format_diffs(diffs: list) -> str:
    return "; ".join(f"{k}: {a!r} in the experiment, {b!r} now" for k, a, b in diffs)


# ----------------------------------------------------------------------------------------------------
# Which files are ours
# ----------------------------------------------------------------------------------------------------
_TS = r"\d{8}-\d{6}"
_OURS = {
    "saved_models": (r"train_model_(\d+|latest)", r"\.tmp_train_model_(\d+|latest)\..+"),
    "logs": (r"summary_statistics\.(csv|json)", r"test_summary\.csv", rf"test_summary_{_TS}\.csv",
             rf"summary_statistics\.csv\.before_resume_{_TS}",
             r"\.tmp_(summary_statistics\.(csv|json)|test_summary\.csv)\..+"),
    "plots": (r"(lslr|msl|curves)\.png",),
    "": (re.escape(CONFIG_SNAPSHOT), re.escape(CONFIG_HISTORY),
         r"\.tmp_(" + re.escape(CONFIG_SNAPSHOT) + "|" + re.escape(CONFIG_HISTORY) + r")\..+"),
}


def tool_outputs(root: str) -> tuple[list[str], list[str]]:
    """(files this package wrote, every other file) under the experiment folder `root`, as paths
    relative to it. The lock file is neither (it belongs to the running process)."""
    ours, others = [], []
    if not os.path.isdir(root):
        return ours, others
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        patterns = _OURS.get(rel_dir.replace(os.sep, "/"), ())
        for name in sorted(filenames) + sorted(d for d in dirnames if os.path.islink(os.path.join(dirpath, d))):
            rel = os.path.join(rel_dir, name) if rel_dir else name
            if rel == LOCK_NAME:
                continue
            full = os.path.join(dirpath, name)
            mine = os.path.isfile(full) and not os.path.islink(full) and any(re.fullmatch(p, name) for p in patterns)
            (ours if mine else others).append(rel)
    return ours, others


def remove_tool_outputs(root: str) -> tuple[list[str], list[str]]:
    """Delete the files `tool_outputs` calls ours (and our folders left empty); returns (removed, kept)."""
    ours, others = tool_outputs(root)
    for rel in ours:
        os.unlink(os.path.join(root, rel))
    for sub in ("saved_models", "logs", "plots"):
        folder = os.path.join(root, sub)
        if os.path.isdir(folder) and not os.path.islink(folder):
            try:
                os.rmdir(folder)  # only when empty: a user's file keeps its folder
            except OSError:
                pass
    return ours, others
