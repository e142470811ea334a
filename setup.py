"""Build script of mamlpp-fast: the native extension only.

The package's metadata (name, version, dependencies, the `mamlpp` console script) is in
pyproject.toml; the version is written once, in mamlpp_fast/__init__.py. This file adds the native
extension `mamlpp_fast._C`, built by CMake (CMakeLists.txt, the one build description) from a
build_ext subclass:
- CMAKE_PREFIX_PATH from torch.utils.cmake_prefix_path and pybind11.get_cmake_dir(); this Python;
  build type Release; Ninja when available; the library lands in the package dir (editable and normal
  installs alike). torch is taken from the environment, never fetched: install with
  `pip install --no-build-isolation .` (pip's default build isolation hides the installed torch).
- CUDA sources are compiled only when a CUDA toolkit (nvcc) is found AND torch is a CUDA build
  (torch.version.cuda is not None); whether a GPU is visible does not matter. Architectures: env
  MAMLPP_CUDA_ARCH (CMake list, default "90", e.g. "80;90").
- Output of cmake/ninja goes to <build dir>/native_build.log; on success one line says what was built.

A failed native build is never silent:
- torch cannot be imported at build time (pip's build isolation, or no torch installed): the install
  STOPS with a message that says to install torch and use --no-build-isolation (or MAMLPP_NO_NATIVE=1
  for the pure-Python package);
- any other failure (compiler, CMake, missing pybind11/cmake): with MAMLPP_REQUIRE_NATIVE=1 the
  install fails; otherwise a boxed message on stderr (pip shows it with -v) names the cause and the
  log, the pure-Python package is installed, and the cause is recorded in mamlpp_fast/_native_build.txt
  so that the first use of the ops warns once, naming it and the backend used instead
  (mamlpp_fast._native, mamlpp_fast.ops.backend).
Environment: MAMLPP_NO_NATIVE=1 skips the native build; MAMLPP_REQUIRE_NATIVE=1 makes any native build
failure fail the install; MAMLPP_NO_CUDA=1 builds the CPU part only; MAMLPP_BUILD_DIR overrides the
CMake build dir (default build/native); CMAKE_BUILD_PARALLEL_LEVEL; MAMLPP_CMAKE_ARGS: extra CMake
arguments (shell words), e.g. -DCUDA_nvrtc_LIBRARY=... where a minimal CUDA toolkit lacks a library
that torch's CMake config asks for.
"""
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class NativeBuildError(RuntimeError):
    pass


def _tool(module_name, bin_attr, exe):
    """Path of a build tool: from its pip package (cmake, ninja) if installed, else from PATH."""
    try:
        mod = __import__(module_name)
        cand = Path(getattr(mod, bin_attr)) / exe
        if cand.exists():
            return str(cand)
    except Exception:
        pass
    return shutil.which(exe)


def _toolkit_root(nvcc):
    """The CUDA toolkit folder of an nvcc (the one with include/cuda_runtime.h), or None. An nvcc on
    PATH may be a wrapper script elsewhere (seen: /usr/local/bin/nvcc exec-ing the toolkit's), so the
    folder above it is checked, then the standard install location."""
    for root in (Path(nvcc).resolve().parent.parent, Path("/usr/local/cuda")):
        if (root / "include" / "cuda_runtime.h").exists() and (root / "bin" / "nvcc").exists():
            return root
    return None


def _find_nvcc():
    """(nvcc, toolkit root): CUDACXX, CUDA_HOME/CUDA_PATH, PATH, /usr/local/cuda, in that order; an
    nvcc whose toolkit is not found next to it is replaced by the toolkit's own nvcc."""
    cands = [os.environ.get("CUDACXX")]
    cands += [str(Path(os.environ[v]) / "bin" / "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    cands += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for cand in cands:
        if cand and Path(cand).exists():
            root = _toolkit_root(cand)
            if root is not None:
                own = root / "bin" / "nvcc"
                return (cand if Path(cand).resolve().parent.parent == root else str(own)), root
    return None, None


STATUS_FILE = "_native_build.txt"  # in the package dir: why _C was not built (read by mamlpp_fast._native)


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0")


def _banner(lines):
    width = max(len(line) for line in lines)
    bar = "*" * (width + 4)
    return "\n".join([bar] + [f"* {line.ljust(width)} *" for line in lines] + [bar])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt. See the module docstring for what a failure does."""

    def run(self):
        status = Path(self.get_ext_fullpath("mamlpp_fast._C")).resolve().parent / STATUS_FILE
        status.unlink(missing_ok=True)
        if _flag("MAMLPP_NO_NATIVE"):
            print("mamlpp_fast._C: skipped (MAMLPP_NO_NATIVE set)", file=sys.stderr)
            self._drop_extensions()
            self._record(status, "skipped at install (MAMLPP_NO_NATIVE was set)")
            return
        try:
            import torch  # noqa: F401
        except ImportError as err:
            raise SystemExit(_banner([
                f"mamlpp-fast: cannot build the native extension mamlpp_fast._C: torch does not import in",
                f"the build environment ({type(err).__name__}: {err}).",
                "pip builds in an isolated environment unless told otherwise, and that environment does",
                "not see the torch you installed. Install torch first, then install this package with",
                "    pip install --no-build-isolation .",
                "(build requirements: pip install setuptools wheel pybind11 cmake ninja), or set",
                "MAMLPP_NO_NATIVE=1 to install the pure-Python package without the native ops.",
            ]))
        try:
            super().run()
        except Exception as err:
            if _flag("MAMLPP_REQUIRE_NATIVE"):
                raise SystemExit(f"mamlpp_fast._C (native ops) was not built and MAMLPP_REQUIRE_NATIVE is "
                                 f"set: {err}")
            self._drop_extensions()
            self._record(status, f"the native build failed at install: {err}")
            print(_banner([
                f"WARNING: mamlpp_fast._C (native ops) was not built: {err}",
                "The pure-Python package is installed; the ops run on the 'torch' (or 'triton') backend,",
                "and their first use warns. Set MAMLPP_REQUIRE_NATIVE=1 to make this failure fatal.",
            ]), file=sys.stderr)

    @staticmethod
    def _record(path, text):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n")
        except OSError:
            pass

    def _drop_extensions(self):
        self.extensions = []
        self.distribution.ext_modules = []

    def build_extension(self, ext):
        import torch
        try:
            import pybind11
        except ImportError as err:
            raise NativeBuildError(f"pybind11 does not import ({err}); pip install pybind11") from None

        build_dir = Path(os.environ.get("MAMLPP_BUILD_DIR", ROOT / "build" / "native")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        log_path = build_dir / "native_build.log"
        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = ext_path.parent
        out_dir.mkdir(parents=True, exist_ok=True)

        nvcc, cuda_root = _find_nvcc()
        want_cuda = os.environ.get("MAMLPP_NO_CUDA", "0") in ("", "0")
        with_cuda = bool(want_cuda and torch.version.cuda is not None and nvcc)
        arch = os.environ.get("MAMLPP_CUDA_ARCH", "90").replace(",", ";").strip() or "90"

        cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
        if not cmake:
            raise NativeBuildError("cmake not found (pip install cmake)")
        ninja = _tool("ninja", "BIN_DIR", "ninja")
        generator = "Ninja" if ninja else "Unix Makefiles"

        # A cache made with another generator cannot be reused.
        cache = build_dir / "CMakeCache.txt"
        if cache.exists():
            text = cache.read_text(errors="replace")
            if f"CMAKE_GENERATOR:INTERNAL={generator}\n" not in text or str(ROOT) not in text:
                cache.unlink()
                shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)

        prefix = ";".join([torch.utils.cmake_prefix_path, pybind11.get_cmake_dir()])
        args = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", generator,
            f"-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={prefix}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_RELEASE={out_dir}",
            f"-DMAMLPP_TORCH_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
            f"-DMAMLPP_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            f"-DMAMLPP_CUDA_ARCH={arch}",
            f"-DPYBIND11_FINDPYTHON=ON",
        ]
        if ninja:
            args.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
        args += shlex.split(os.environ.get("MAMLPP_CMAKE_ARGS", ""))  # e.g. a library torch's config misses
        if with_cuda:
            # torch's CMake config runs its own FindCUDA, which looks for nvcc via CUDA_PATH or PATH
            # (not CUDA_HOME): name the toolkit explicitly
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_root}"]
        env = dict(os.environ)
        if with_cuda:
            # Torch's CMake config derives its own (unused by us) nvcc flags from this; without it,
            # it would probe the visible GPU.
            env.setdefault("TORCH_CUDA_ARCH_LIST",
                           ";".join(f"{a[:-1]}.{a[-1]}" for a in arch.split(";") if a[:-1].isdigit()))
            env.setdefault("CUDA_HOME", str(cuda_root))
            env.setdefault("CUDA_PATH", str(cuda_root))
        build = [cmake, "--build", str(build_dir), "--config", "Release"]
        if not ninja:
            build += ["--parallel", str(os.cpu_count() or 2)]

        with open(log_path, "w") as log:
            for cmd in (args, build):
                log.write("$ " + " ".join(cmd) + "\n")
                log.flush()
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
                if proc.returncode != 0:
                    raise NativeBuildError(f"'{Path(cmd[0]).name} {cmd[1]}' failed "
                                           f"(exit {proc.returncode}); see {log_path}")
        if not ext_path.exists():
            raise NativeBuildError(f"build finished but {ext_path} is missing; see {log_path}")
        what = "cpu" + (f", cuda sm_{arch.replace(';', '/sm_')}" if with_cuda else "")
        line = f"mamlpp_fast._C built with: {what}"
        if not with_cuda and torch.version.cuda is not None:
            line += " (no nvcc found: CUDA kernels skipped)"
        print(line, file=sys.stderr)
        with open(log_path, "a") as log:
            log.write(line + "\n")


# Metadata (name, version, dependencies, console script, packages): pyproject.toml.
setup(
    ext_modules=[CMakeExtension("mamlpp_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
)
