"""The experiment folder is safe: no escapes, one writer, no silent drift of the configuration, nothing
of the user's deleted, and every fault a user can cause ends in one line and exit status 2.

Why: an experiment folder holds days of training. The faults here are the ones a user meets without
doing anything unusual: an `experiment_name` with a path in it, the same command started twice (a
second terminal, a scheduler retry), a resume with an edited hyperparameter, `--overwrite` in a folder
that also holds the user's notes, a full disk, a file where a folder should be, a typo in `--device`.
Each test below is one class of fault; the process faults (the lock, a killed run, a full disk) use
real `python -m mamlpp_fast` subprocesses, the others call the same code in-process to stay fast.
"""
from __future__ import annotations

import errno
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mamlpp_fast import cli, plots
from mamlpp_fast.config import ConfigError, load_args
from mamlpp_fast.data import DatasetError, MetaLearningSystemDataLoader
from mamlpp_fast.experiment import (CONFIG_HISTORY, CONFIG_SNAPSHOT, LOCK_NAME, acquire_lock,
                                    check_experiment_name, compare_configs)
from mamlpp_fast.trainer import ExperimentBuilder, ExperimentError, learner_class
from _tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]

CFG = tiny_config(experiment_name="safe", synthetic_num_classes=[20, 10, 10], synthetic_images_per_class=6,
                  image_height=14, image_width=14, num_classes_per_set=3, num_target_samples=1, cnn_num_filters=4,
                  number_of_training_steps_per_iter=2, number_of_evaluation_steps_per_iter=2, total_epochs=2,
                  total_iter_per_epoch=2, num_evaluation_tasks=2, max_models_to_save=5, meta_learning_rate=0.001,
                  min_learning_rate=1e-05, task_learning_rate=0.1, dtype="float64", device="cpu", seed=3)


# ------------------------------------------------------------------------------------------- helpers
def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env.pop("DATASET_DIR", None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def _write_config(folder: Path, name="cfg.json", **kw) -> Path:
    path = folder / name
    path.write_text(json.dumps({**CFG, **kw}))
    return path


def _cmd(*argv):
    return [sys.executable, "-m", "mamlpp_fast", *map(str, argv)]


def _mamlpp(*argv, timeout=300, **popen):
    return subprocess.run(_cmd(*argv), env=popen.pop("env", _env()), capture_output=True, text=True,
                          timeout=timeout, cwd=popen.pop("cwd", REPO), **popen)


def _assert_one_line_exit_2(rc, stderr, *names):
    assert rc == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mamlpp: error: "), stderr
    for name in names:
        assert str(name) in lines[0], (name, lines[0])


def _main(capsys, monkeypatch, *argv):
    """cli.main in-process (exactly what `mamlpp` runs); returns (rc, stdout, stderr)."""
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # cli.main replaces it
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DATASET_DIR"):
        monkeypatch.delenv(k, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _builder(exp_dir: Path, logs=None, overwrite=False, allow_config_change=False, **kw):
    args = load_args({**CFG, "experiment_dir": str(exp_dir), **kw}, warn_unknown=False)
    model = learner_class("fast")(im_shape=(2, 1, 14, 14), device="cpu", args=args)
    return ExperimentBuilder(args, MetaLearningSystemDataLoader, model, "cpu", progress=False,
                             log=(logs.append if logs is not None else (lambda m: None)), overwrite=overwrite,
                             allow_config_change=allow_config_change)


def _wait_for_lock(path: Path, proc, timeout=120) -> dict:
    """The lock record once the process `proc` has written it."""
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, "the first process ended before taking the lock"
        assert time.time() < deadline, "the first process did not take the lock in time"
        try:
            record = json.loads(path.read_text())
            if record.get("pid") == proc.pid:
                return record
        except (OSError, ValueError):
            pass
        time.sleep(0.02)


# ------------------------------------------------------------------------- paths stay inside the folder
@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", "{tmp}/elsewhere", ""])
def test_experiment_name_must_be_a_plain_name(tmp_path, capsys, monkeypatch, name):
    name = name.replace("{tmp}", str(tmp_path))  # an absolute path
    with pytest.raises(ConfigError, match="experiment_name"):
        check_experiment_name(name)
    if name in ("", "."):
        return  # "" means "use the config file's stem" on the command line; "." is covered above
    exp = tmp_path / "deep" / "exp"
    exp.mkdir(parents=True)
    cfg = _write_config(tmp_path / "deep")
    rc, _, err = _main(capsys, monkeypatch, "train", "--config", cfg, "--experiment-dir", exp,
                       "--experiment-name", name, "--no-progress")
    _assert_one_line_exit_2(rc, err, "experiment_name", repr(name))
    # Nothing written anywhere: not inside --experiment-dir, not next to it, not at an absolute path.
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["cfg.json", "exp"]
    assert list(exp.iterdir()) == []
    assert not (tmp_path / "elsewhere").exists()
    assert check_experiment_name("omniglot_5_way_1_shot.v2") == "omniglot_5_way_1_shot.v2"


# ----------------------------------------------------------------------------------- one writer: the lock
def test_second_train_or_test_on_a_busy_folder_stops_at_once_naming_the_first(tmp_path):
    """Two real `python -m mamlpp_fast train` processes on one folder: the second (and a `test`) stop
    with exit 2 naming the first's pid and host, without touching the folder; the first ends normally
    when interrupted and then its lock file is gone."""
    cfg = _write_config(tmp_path, total_iter_per_epoch=100000)  # the first run is still in epoch 1
    exp = tmp_path / "exp"
    root = exp / "safe"
    # SIGINT at its default in the child, as in a terminal: a test run started in the background by a
    # non-interactive shell inherits an ignored SIGINT, and Python then installs no KeyboardInterrupt handler
    first = subprocess.Popen(_cmd("train", "--config", cfg, "--experiment-dir", exp, "--no-progress"), env=_env(),
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        record = _wait_for_lock(root / LOCK_NAME, first)
        assert record["host"] == socket.gethostname() and record["command"] == "train"
        deadline = time.time() + 120
        while not (root / CONFIG_SNAPSHOT).exists():  # its last file before epoch 1's checkpoint (far away)
            assert first.poll() is None and time.time() < deadline, "the first run did not start training"
            time.sleep(0.02)
        before = _snapshot(root)
        for command in ("train", "test"):
            p = _mamlpp(command, "--config", cfg, "--experiment-dir", exp, "--no-progress")
            _assert_one_line_exit_2(p.returncode, p.stderr, "in use by", f"pid {first.pid}", socket.gethostname(),
                                    str(root))
            assert _snapshot(root) == before, f"the refused `{command}` changed the experiment folder"
        assert first.poll() is None, "the first run was disturbed"
        first.send_signal(signal.SIGINT)  # Ctrl-C: the run ends through its own exit path
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 130, out + err
    assert not (root / LOCK_NAME).exists(), "the lock file outlived its run"


def test_stale_lock_of_a_killed_run_is_taken_over_with_a_line(tmp_path):
    cfg = _write_config(tmp_path, total_iter_per_epoch=100000)
    exp = tmp_path / "exp"
    root = exp / "safe"
    killed = subprocess.Popen(_cmd("train", "--config", cfg, "--experiment-dir", exp, "--no-progress"), env=_env(),
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_lock(root / LOCK_NAME, killed)
    finally:
        killed.kill()  # SIGKILL: no exit path runs, the lock file stays behind
        killed.wait()
    assert (root / LOCK_NAME).exists()
    p = _mamlpp("train", "--config", cfg, "--experiment-dir", exp, "--no-progress", "--total-iter-per-epoch", 2)
    assert p.returncode == 0, p.stdout + p.stderr
    line = next(ln for ln in p.stdout.splitlines() if "stale lock" in ln)
    assert f"pid {killed.pid}" in line and "taking over" in line, line
    assert not (root / LOCK_NAME).exists()
    assert (root / "logs" / "test_summary.csv").is_file()


def _children(pid: int) -> set:
    """The live child processes of `pid` (Linux /proc)."""
    kids = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return kids


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_data_workers_die_with_a_killed_trainer(tmp_path):
    """A SIGKILLed trainer leaves no data-loader worker behind: the workers ask the kernel to kill them with
    their parent (prctl PR_SET_PDEATHSIG). Without that, workers blocked on a full pipe were seen waiting
    for 20 minutes, holding memory."""
    # batches of ~250 kB: more than a pipe holds, so a worker can be left blocked writing one
    cfg = _write_config(tmp_path, total_iter_per_epoch=100000, num_dataprovider_workers=2, image_height=28,
                        image_width=28, batch_size=8, num_evaluation_tasks=8, num_classes_per_set=5)
    trainer = subprocess.Popen(_cmd("train", "--config", cfg, "--experiment-dir", tmp_path / "exp", "--no-progress"),
                               env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # the loader starts at most one worker per CPU this process may run on (mamlpp_fast.data.prefetch)
    want = min(2, len(os.sched_getaffinity(0)))
    try:
        deadline = time.time() + 120
        workers = set()
        while len(workers) < want:
            assert trainer.poll() is None, f"the trainer ended before starting its workers: {trainer.stderr.read()}"
            assert time.time() < deadline, f"the trainer did not start {want} data workers in time"
            time.sleep(0.2)
            workers = _children(trainer.pid)
    finally:
        trainer.kill()
        trainer.wait()
    deadline = time.time() + 10
    alive = workers
    while alive and time.time() < deadline:
        time.sleep(0.1)
        alive = {w for w in alive if Path(f"/proc/{w}").exists() and "Z" not in _state(w)}
    for w in alive:
        os.kill(w, signal.SIGKILL)
    assert not alive, f"data workers {sorted(alive)} outlived the killed trainer"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


_FORKING_OWNER = """
import os, sys, time
from mamlpp_fast.experiment import acquire_lock
handle = acquire_lock(sys.argv[1], "train", log=lambda m: None)
child = os.fork()
if child == 0:          # like a data-loader worker: inherits the lock's descriptor, outlives its parent
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
time.sleep(60)
"""


def test_a_forked_child_of_a_killed_run_does_not_keep_the_lock(tmp_path):
    """A flock belongs to the open file description, which fork shares: without care, a data-loader worker that
    outlives a SIGKILLed trainer would keep the folder locked. Forked children close their copy at once
    (os.register_at_fork), so the lock is free as soon as the owner dies, while the child still runs."""
    root = tmp_path / "exp" / "forked"
    owner = subprocess.Popen([sys.executable, "-c", _FORKING_OWNER, str(root)], env=_env(), cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    child = int(owner.stdout.readline())
    try:
        owner.kill()
        owner.wait()
        os.kill(child, 0)  # the child is still alive
        lines = []
        start = time.monotonic()
        handle = acquire_lock(str(root), "train", log=lines.append)
        assert time.monotonic() - start < 5.0  # no waiting for the child: it let go of the lock at the fork
        handle.release()
        assert any("taking over the stale lock" in ln and f"pid {owner.pid}" in ln for ln in lines), lines
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_data_parallel_ranks_share_one_lock(tmp_path):
    """torchrun with 2 CPU ranks: rank 0 holds the lock for both (a run completes, which it could not if
    rank 1 also wanted it), and when another process holds it every rank stops with its pid."""
    cfg = _write_config(tmp_path, total_epochs=1)
    exp = tmp_path / "exp"
    root = exp / "safe"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "mamlpp_fast", "train", "--config", str(cfg), "--experiment-dir", str(exp), "--distributed",
                "--no-progress"]
    hold = ("import sys, time; from mamlpp_fast.experiment import acquire_lock; "
            "h = acquire_lock(sys.argv[1], log=lambda m: None); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(root)], env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = subprocess.run(torchrun, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    text = busy.stdout + busy.stderr
    assert busy.returncode != 0
    assert text.count(f"in use by mamlpp train (pid {holder.pid}") >= 2, text  # both ranks name the holder
    assert not (root / "saved_models").exists()

    done = subprocess.run(torchrun, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "stale lock" in done.stdout  # the killed holder's lock file, taken over by rank 0 only
    assert (root / "logs" / "test_summary.csv").is_file()
    assert not (root / LOCK_NAME).exists()


def test_lock_is_reentrant_in_one_process_and_released_by_its_last_holder(tmp_path):
    root = tmp_path / "exp" / "safe"
    a = acquire_lock(str(root))
    b = acquire_lock(str(root))  # the CLI takes it before the dataset loads, the builder again
    a.release()
    a.release()  # idempotent
    assert (root / LOCK_NAME).exists()
    b.release()
    assert not (root / LOCK_NAME).exists()
    assert not (tmp_path / "exp").exists(), "a lock taken and given back without output left folders behind"


# ---------------------------------------------------------------------- resume compares the configuration
def test_resume_with_a_changed_configuration(tmp_path):
    exp = tmp_path / "exp"
    root = exp / "safe"
    _builder(exp).run_experiment()
    before = _snapshot(root)

    # A training key: refused, listed with both values, nothing written.
    with pytest.raises(ExperimentError) as e:
        _builder(exp, meta_learning_rate=0.002, total_epochs=3)
    msg = str(e.value)
    for part in ("meta_learning_rate: 0.001 in the experiment, 0.002 now", "total_epochs: 2 in the experiment, 3 now",
                 "--allow-config-change", str(root / CONFIG_SNAPSHOT)):
        assert part in msg, (part, msg)
    assert _snapshot(root) == before

    # A network or task-distribution key: refused even with --allow-config-change.
    for key, value in (("max_pooling", False), ("num_samples_per_class", 2), ("dataset_name", "synthetic_b")):
        with pytest.raises(ExperimentError, match=f"{key}.*does not match|does not match.*{key}"):
            _builder(exp, allow_config_change=True, **{key: value})
        assert _snapshot(root) == before, key

    # Keys that only affect evaluation, reporting or the implementation: accepted, named in a line, not recorded.
    logs: list[str] = []
    b = _builder(exp, logs, num_evaluation_tasks=4, conv_impl="grouped")
    b.close()
    line = next(m for m in logs if "used as given" in m)
    assert "num_evaluation_tasks: 2 in the experiment, 4 now" in line and "conv_impl" in line, line
    assert _snapshot(root) == before

    # With --allow-config-change: the change is recorded next to the earlier configuration, not over it.
    logs = []
    b = _builder(exp, logs, allow_config_change=True, meta_learning_rate=0.002, total_epochs=3)
    assert any("configuration change allowed" in m and "at iteration 4:" in m and "meta_learning_rate" in m
               for m in logs), logs
    b.run_experiment()
    history = json.loads((root / CONFIG_HISTORY).read_text())
    assert [h["event"] for h in history] == ["start", "change"]
    assert history[0]["config"]["meta_learning_rate"] == 0.001 and history[0]["iteration"] == 0
    assert history[1]["iteration"] == 4 and history[1]["changed"] == {
        "meta_learning_rate": {"from": 0.001, "to": 0.002}, "total_epochs": {"from": 2, "to": 3}}
    assert json.loads((root / CONFIG_SNAPSHOT).read_text())["meta_learning_rate"] == 0.002
    # Resuming with the recorded values again is quiet and rewrites nothing.
    recorded = {p: _snapshot(root)[p] for p in (CONFIG_SNAPSHOT, CONFIG_HISTORY)}
    b = _builder(exp, meta_learning_rate=0.002, total_epochs=3)
    b.close()
    assert {p: _snapshot(root)[p] for p in recorded} == recorded
    diffs = compare_configs({"seed": 1, "device": "cpu", "x_unknown": 1}, {"seed": 2, "device": "cuda", "x_unknown": 2})
    assert diffs == {"refused": [], "training": [("seed", 1, 2)],
                     "free": [("device", "cpu", "cuda"), ("x_unknown", 1, 2)]}


def test_cli_refuses_then_allows_a_changed_training_key(tmp_path, capsys, monkeypatch):
    cfg = _write_config(tmp_path)
    exp = tmp_path / "exp"
    rc, out, err = _main(capsys, monkeypatch, "train", "--config", cfg, "--experiment-dir", exp, "--no-progress")
    assert rc == 0, err
    rc, _, err = _main(capsys, monkeypatch, "train", "--config", cfg, "--experiment-dir", exp, "--no-progress",
                       "--total-epochs", 3)
    _assert_one_line_exit_2(rc, err, "total_epochs: 2 in the experiment, 3 now", "--allow-config-change")
    rc, out, err = _main(capsys, monkeypatch, "train", "--config", cfg, "--experiment-dir", exp, "--no-progress",
                         "--total-epochs", 3, "--allow-config-change")
    assert rc == 0, err
    assert "configuration change allowed" in out
    assert json.loads((exp / "safe" / CONFIG_SNAPSHOT).read_text())["total_epochs"] == 3


def test_test_writes_nothing_but_its_own_outputs(tmp_path):
    exp = tmp_path / "exp"
    root = exp / "safe"
    _builder(exp).run_experiment()
    before = _snapshot(root)
    # A different free key and a different training key: `test` names them, records nothing.
    logs: list[str] = []
    result = _builder(exp, logs, evaluate_on_test_set_only=True, num_evaluation_tasks=4,
                      meta_learning_rate=0.5).run_experiment()
    assert result["status"] == "tested"
    assert any("no effect on testing" in m and "meta_learning_rate" in m for m in logs), logs
    after = _snapshot(root)
    changed = {p for p in set(before) | set(after) if before.get(p, b"?") != after.get(p, b"?")}
    assert changed <= {"logs/test_summary.csv"} | {p for p in after if p.startswith("logs/test_summary_")}, changed
    assert after[CONFIG_SNAPSHOT] == before[CONFIG_SNAPSHOT]
    assert LOCK_NAME not in after


# ------------------------------------------------------------------- --overwrite removes only our files
def test_overwrite_removes_exactly_the_files_this_tool_wrote(tmp_path, capsys, monkeypatch):
    cfg = _write_config(tmp_path)
    exp = tmp_path / "exp"
    root = exp / "safe"
    rc, _, err = _main(capsys, monkeypatch, "train", "--config", cfg, "--experiment-dir", exp, "--no-progress")
    assert rc == 0, err
    assert plots.main([str(root)]) == 0
    capsys.readouterr()
    assert (root / "plots" / "lslr.png").is_file()
    (root / "logs" / "test_summary_20200101-000000.csv").write_text("an earlier test summary kept aside\n")
    user = {"logs/notes.txt": b"my notes", "saved_models/train_model_2.bak": b"my backup",
            "plots/poster.png": b"my figure", "README.txt": b"what this run is"}
    for rel, data in user.items():
        (root / rel).write_bytes(data)

    rc, out, err = _main(capsys, monkeypatch, "train", "--config", cfg, "--experiment-dir", exp, "--no-progress",
                         "--overwrite", "--total-epochs", 1)
    assert rc == 0, err
    for rel, data in user.items():
        assert (root / rel).read_bytes() == data, f"--overwrite touched the user's {rel}"
    kept_line = next(m for m in out.splitlines() if "kept files this tool did not write" in m)
    for rel in user:
        assert rel in kept_line, (rel, kept_line)
    # The earlier run's checkpoints, plots and kept-aside summaries are gone; the new run's files are there.
    assert not (root / "saved_models" / "train_model_2").exists()
    assert not (root / "plots" / "lslr.png").exists()
    assert not (root / "logs" / "test_summary_20200101-000000.csv").exists()
    assert (root / "saved_models" / "train_model_1").is_file()
    history = json.loads((root / CONFIG_HISTORY).read_text())
    assert [h["event"] for h in history] == ["start"] and history[0]["config"]["total_epochs"] == 1


def test_plot_lrs_on_a_folder_that_is_not_an_experiment_creates_nothing(tmp_path, capsys):
    folder = tmp_path / "not_an_experiment"
    folder.mkdir()
    (folder / "data.txt").write_text("x")
    before = _snapshot(folder)
    assert plots.main([str(folder)]) == 2
    assert "no checkpoints" in capsys.readouterr().err
    assert _snapshot(folder) == before
    assert plots.main([str(folder), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------- OS errors on the experiment folder
@pytest.mark.parametrize("where", ["experiment_dir", "experiment_folder", "saved_models", "logs"])
def test_a_file_where_a_folder_should_be(tmp_path, capsys, monkeypatch, where):
    cfg = _write_config(tmp_path)
    exp = tmp_path / "exp"
    if where == "experiment_dir":
        exp.write_text("a file")
        blocking = exp
    else:
        (exp / "safe").parent.mkdir()
        blocking = exp / "safe" if where == "experiment_folder" else exp / "safe" / where
        blocking.parent.mkdir(exist_ok=True)
        blocking.write_text("a file")
    before = _snapshot(tmp_path)
    rc, _, err = _main(capsys, monkeypatch, "train", "--config", cfg, "--experiment-dir", exp, "--no-progress")
    _assert_one_line_exit_2(rc, err, str(blocking), "a file, not a folder")
    assert _snapshot(tmp_path) == before


def _without_root_file_access():
    """preexec_fn: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set (prctl
    PR_CAPBSET_DROP), so that the exec'ed program, even as root, obeys file permissions."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_no_permission_on_the_experiment_dir(tmp_path):
    """A real EACCES from the kernel: a read-only --experiment-dir (as root, without the capabilities
    that let root ignore file permissions)."""
    cfg = _write_config(tmp_path)
    exp = tmp_path / "readonly"
    exp.mkdir()
    os.chmod(exp, 0o555)
    try:
        p = subprocess.run(_cmd("train", "--config", cfg, "--experiment-dir", exp, "--no-progress"), env=_env(),
                           cwd=REPO, capture_output=True, text=True, timeout=300,
                           preexec_fn=_without_root_file_access if os.geteuid() == 0 else None)
        _assert_one_line_exit_2(p.returncode, p.stderr, str(exp / "safe"), "Permission denied")
        assert list(exp.iterdir()) == []
    finally:
        os.chmod(exp, 0o755)


_NO_SPACE = """
import errno, os, runpy, sys
_fsync = os.fsync
def fsync(fd):
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        name = ""
    if ".tmp_train_model_2." in name:  # the disk fills up while epoch 2's checkpoint is written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _fsync(fd)
os.fsync = fsync
sys.argv = ["mamlpp"] + sys.argv[1:]
runpy.run_module("mamlpp_fast", run_name="__main__")
"""


def test_no_space_left_while_writing_a_checkpoint(tmp_path):
    cfg = _write_config(tmp_path)
    exp = tmp_path / "exp"
    root = exp / "safe"
    p = subprocess.run([sys.executable, "-c", _NO_SPACE, "train", "--config", str(cfg), "--experiment-dir", str(exp),
                        "--no-progress"], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    _assert_one_line_exit_2(p.returncode, p.stderr, str(root / "saved_models" / "train_model_2"),
                            os.strerror(errno.ENOSPC))
    names = sorted(os.listdir(root / "saved_models"))
    assert names == ["train_model_1", "train_model_latest"], names  # no temporary file left behind
    assert not (root / LOCK_NAME).exists()
    # Space again: the same command resumes from epoch 1 and finishes.
    again = _mamlpp("train", "--config", cfg, "--experiment-dir", exp, "--no-progress")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming from" in again.stdout
    assert torch.load(root / "saved_models" / "train_model_2", map_location="cpu", weights_only=False)[
        "current_iter"] == 4


def _file_size_limit():
    """preexec_fn: files may not grow past 16 kB (RLIMIT_FSIZE; SIGXFSZ ignored, so write() fails with
    EFBIG): the configuration records fit, a checkpoint of the tiny network (~29 kB) does not."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16000, 16000))


def test_a_write_the_kernel_refuses_while_writing_a_checkpoint(tmp_path):
    """A real failing write() inside torch.save (which by itself reports an unrelated RuntimeError)."""
    cfg = _write_config(tmp_path)
    exp = tmp_path / "exp"
    root = exp / "safe"
    p = subprocess.run(_cmd("train", "--config", cfg, "--experiment-dir", exp, "--no-progress"), env=_env(),
                       cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=_file_size_limit)
    _assert_one_line_exit_2(p.returncode, p.stderr, str(root / "saved_models" / "train_model_1"),
                            os.strerror(errno.EFBIG))
    assert os.listdir(root / "saved_models") == []  # the partial temporary file is removed
    assert not (root / LOCK_NAME).exists()


# ------------------------------------------------------------- values a library downstream would reject
@pytest.mark.parametrize("argv, names", [
    (["--config", "{folder}"], ["is a folder", "{folder}"]),
    (["--device", "gpu0"], ["'device'", "gpu0"]),
    (["--device", "cuda:x"], ["'device'", "cuda:x"]),
    (["--seed", "-5"], ["'seed'", "-5"]),
    (["--seed", str(2 ** 32)], ["'seed'", str(2 ** 32)]),
    (["--val_seed", "-1"], ["'val_seed'"]),
    (["--distributed"], ["--distributed", "torchrun", "RANK"]),
    (["--task_learning_rate", "-1"], ["'task_learning_rate'", "> 0"]),
    (["--task_learning_rate", "0"], ["'task_learning_rate'", "> 0"]),
    (["--meta_learning_rate", "NaN"], ["'meta_learning_rate'", "finite", "nan"]),
    (["--min_learning_rate", "Infinity"], ["'min_learning_rate'", "finite"]),
    (["--weight_decay", "-0.1"], ["'weight_decay'", ">= 0"]),
    (["--samples_per_iter", "0"], ["'samples_per_iter'", ">= 1"]),
    (["--train_val_test_split", "0.5", "NaN", "0.25"], ["'train_val_test_split'"]),
    (["--num_stages", "6"], ["'num_stages'", "too deep", "14x14"]),
    (["--num_stages", "3", "--max_pooling", "false", "--conv_padding", "false", "--image_height", "4",
      "--image_width", "4"],
     ["'num_stages'", "too deep", "4x4"]),
])
def test_values_a_library_would_reject_are_one_line(tmp_path, capsys, monkeypatch, argv, names):
    cfg = _write_config(tmp_path)
    folder = tmp_path / "a_folder"
    folder.mkdir()
    argv = [a.replace("{folder}", str(folder)) for a in argv]
    if argv[0] != "--config":
        argv = ["--config", str(cfg)] + argv
    rc, _, err = _main(capsys, monkeypatch, "train", *argv, "--experiment-dir", tmp_path / "exp", "--no-progress")
    _assert_one_line_exit_2(rc, err, *[n.replace("{folder}", str(folder)) for n in names])
    assert not (tmp_path / "exp").exists()


# -------------------------------------------------------------------------- corrupt data in an archive
def _omniglot_zip(path: Path, alphabets=3, chars=3, images=3) -> list[str]:
    rng = np.random.RandomState(0)
    members = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for a in range(alphabets):
            for c in range(chars):
                for i in range(images):
                    img = Image.new("1", (32, 32), 1)
                    ImageDraw.Draw(img).line([tuple(int(v) for v in rng.randint(3, 29, 2)) for _ in range(3)],
                                             fill=0, width=3)
                    buf = io.BytesIO()
                    img.save(buf, format="PNG")
                    name = f"images_background/Alphabet_{a}/character{c + 1:02d}/{a}{c}_{i}.png"
                    zf.writestr(name, buf.getvalue())
                    members.append(name)
    return members


def test_corrupt_member_of_a_zip_with_an_intact_index_is_named(tmp_path, capsys, monkeypatch):
    data = tmp_path / "omniglot"
    data.mkdir()
    archive = data / "images_background.zip"
    members = _omniglot_zip(archive)
    bad = members[4]
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(bad)
    raw = bytearray(archive.read_bytes())
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    raw[start:start + 8] = b"\xff" * 8  # a deflate block of the reserved type: the stream cannot be decoded
    archive.write_bytes(bytes(raw))
    with zipfile.ZipFile(archive) as zf:  # the index still lists every member; only that member's data is bad
        assert zf.namelist() == members
        with pytest.raises(zlib.error):
            zf.read(bad)

    cfg = _write_config(tmp_path, dataset_name="omniglot_dataset", dataset_path="omniglot", num_classes_per_set=2,
                        image_height=14, image_width=14, train_val_test_split=[0.34, 0.33, 0.33],
                        indexes_of_folders_indicating_class=[-3, -2], load_into_memory=True)
    before = _snapshot(data)
    rc, _, err = _main(capsys, monkeypatch, "train", "--config", cfg, "--dataset-dir", tmp_path,
                       "--experiment-dir", tmp_path / "exp", "--no-progress")
    _assert_one_line_exit_2(rc, err, str(archive), bad)
    assert _snapshot(data) == before
    assert not (tmp_path / "exp").exists()
    with pytest.raises(DatasetError, match="member"):
        MetaLearningSystemDataLoader(load_args({**CFG, "dataset_name": "omniglot_dataset", "num_classes_per_set": 2,
                                                "train_val_test_split": [0.34, 0.33, 0.33],
                                                "indexes_of_folders_indicating_class": [-3, -2]},
                                               warn_unknown=False), data_dir=str(data))
