"""Build and load the native CPU kernels (`cpu_kernels.cpp`), once per machine, cached on disk.

`cpu_kernels()` returns the compiled module, or None when it cannot be had; the first call in a
process decides and says so in one line on stderr when it compiles (about 30 s on 2 cores, once) or
when it falls back to the pure-torch kernels (no compiler, no ninja, a failed build). Later calls
return the same answer (memoized: the module is immutable once loaded).

Built with torch's own extension tooling (`torch.utils.cpp_extension.load`: the same compiler flags
and ABI as the installed torch, `at::parallel_for` on torch's intra-op threads) and `-O3
-march=native -ffp-contract=off` (vectorized for the CPU it runs on, IEEE arithmetic: no fast-math,
no fused multiply-add that would change a rounding). The build directory is named by a hash of the
source, the flags, torch's version and this CPU's model and flags, so a cache carried to another
machine or torch is never loaded there.

`STREAMQUANT_CPU_KERNELS=torch` skips the native kernels (the pure-torch path, as on a machine
without a compiler); `=native` makes a build failure an error instead of a fallback.
`STREAMQUANT_CACHE` (default `~/.cache/streamquant`) is where the build goes.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
HEADERS = (Path(__file__).with_name("vec16.h"), Path(__file__).with_name("tiles.h"))
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp")
ENV = "STREAMQUANT_CPU_KERNELS"
CHOICES = ("auto", "native", "torch")


class NativeKernelsUnavailable(RuntimeError):
    """The native kernels were required (`STREAMQUANT_CPU_KERNELS=native`) but could not be built or loaded."""


def _cpu_signature() -> str:
    """This CPU's model name and feature flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(wanted)) or platform.machine()


def build_tag() -> str:
    """The cache key of a build: source, flags, torch, Python and CPU."""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), *(h.read_bytes() for h in HEADERS), " ".join(CFLAGS).encode(), torch.__version__.encode(),
                 sys.version.encode(), _cpu_signature().encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("STREAMQUANT_CACHE") or Path.home() / ".cache" / "streamquant")


def kernel_choice() -> str:
    """`STREAMQUANT_CPU_KERNELS`, validated: auto (default), native or torch."""
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV} must be one of {', '.join(CHOICES)}, got {choice!r}")
    return choice


def _say(message: str) -> None:
    print(f"streamquant: {message}", file=sys.stderr, flush=True)


def _ninja_on_path() -> None:
    """torch's extension builder runs `ninja` from PATH; the `ninja` wheel (a dependency) may sit in a
    virtual environment whose bin/ is not on PATH (python run by its full path): add it."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def _import(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load() -> ModuleType:
    tag = build_tag()
    name = f"streamquant_cpu_{tag}"
    directory = cache_dir() / "kernels" / tag
    directory.mkdir(parents=True, exist_ok=True)
    built = directory / f"{name}.so"
    # A finished build of this exact source, flags, torch and CPU (no build holds the directory's lock): import it.
    if built.exists() and not (directory / "lock").exists():
        try:
            return _import(name, built)
        except ImportError:  # a partial or broken file: let the builder make it again
            pass
    from torch.utils import cpp_extension  # imports setuptools (~0.1 s): only when a build is needed

    _ninja_on_path()
    _say("compiling the native CPU quantization kernels (once per machine and torch version, about 30 s)")
    return cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=list(CFLAGS), extra_ldflags=["-fopenmp"],
                              build_directory=str(directory), verbose=False)


@functools.cache
def _build() -> tuple[ModuleType | None, str]:
    """(the module, "") or (None, why not): built and loaded once per process."""
    try:
        return _load(), ""
    except Exception as exc:  # a missing compiler, ninja or header, a failed build: all mean "fall back"
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        if kernel_choice() != "native":
            _say(f"native CPU kernels unavailable ({reason}); using the pure-torch kernels (slower)")
        return None, reason


def cpu_kernels() -> ModuleType | None:
    """The native kernel module, or None for the pure-torch kernels (`STREAMQUANT_CPU_KERNELS=torch`, or
    no build possible), read per call so a test or benchmark can switch paths; see the module doc."""
    choice = kernel_choice()
    if choice == "torch":
        return None
    module, reason = _build()
    if module is None and choice == "native":
        raise NativeKernelsUnavailable(f"the native CPU kernels could not be built: {reason}")
    return module
