"""The Triton-interpreter suite's subprocess (tests/test_triton_interp.py, module docstring).

It is started by the conftest hook as soon as collection shows that the session will run its driver
test, so that it runs beside the rest of the suite (the interpreter is one Python thread; the suite's
other tests leave the second core mostly idle), and the driver test collects its result. Its output goes
to a temporary file, not a pipe (a full pipe would stall the child). It is killed if the session ends
before the driver collects it."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

DRIVER = "test_triton_interp.py::test_triton_interpreter_suite"
TIMEOUT_S = 1800  # a guard against a hang only: the suite takes ~8-10 minutes on the CI machine
_KEY = "_mamlpp_interp_suite"


class Run:
    def __init__(self, root: str):
        self.log = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ, TRITON_INTERPRET="1", MAMLPP_TRITON_INNER="1",
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # one thread: it shares 2 cores with the rest
        cmd = [sys.executable, "-m", "pytest", os.path.join(root, "tests", "test_triton_interp.py"), "-q",
               "-p", "no:cacheprovider", "-o", "addopts=-ra", "-x"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True, cwd=root)

    def wait(self, timeout: float = TIMEOUT_S) -> tuple[int, str]:
        """(return code, output) once the suite ends; kills it after `timeout` seconds (rc then -9)."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.log.seek(0)
        return rc, self.log.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def root_dir() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_if_selected(session) -> None:
    """Start the suite when the session's selected tests include its driver (and this is not itself the
    suite's subprocess)."""
    if os.environ.get("MAMLPP_TRITON_INNER") == "1":
        return
    if any(item.nodeid.endswith(DRIVER) for item in session.items):
        setattr(session.config, _KEY, Run(root_dir()))


def take(config) -> Run | None:
    """The run started for this session, handed over once (None when none was started)."""
    run = getattr(config, _KEY, None)
    if run is not None:
        setattr(config, _KEY, None)
    return run


def stop_pending(config) -> None:
    run = take(config)
    if run is not None:
        run.stop()
