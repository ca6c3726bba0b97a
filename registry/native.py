"""The C kernels of ``registry/csrc``, compiled on first use into one shared library.

:func:`load` builds every ``csrc/*.c`` with the C compiler (``$CC``, else ``cc``) into
``$REGISTRY_CACHE_DIR`` (default ``~/.cache/registry-transformers``, or a folder in the temporary
directory where that is not writable), once per sources, flags and compiler, and loads it. The modules
that use a kernel (:mod:`registry.amx`, :mod:`registry.avx512`) bind its functions, check it on small
inputs and say in their ``status()`` whether it is used and why not.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = tuple(sorted((Path(__file__).parent / "csrc").glob("*.c")))
HEADERS = tuple(sorted((Path(__file__).parent / "csrc").glob("*.h")))  # part of the build's identity
FLAGS = (
    "-O3", "-fPIC", "-shared", "-fopenmp", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
    "-mavx512bf16", "-mamx-tile", "-mamx-bf16",
)  # fmt: skip


@dataclass(frozen=True)
class Loaded:
    """The loaded library, or None and why not (a sentence a status can show as it is)."""

    library: ctypes.CDLL | None
    problem: str = ""
    path: str | None = None


def _cache_dirs() -> list[Path]:
    """Where the built library may go: $REGISTRY_CACHE_DIR alone when set; else the user's cache, then a
    folder in the temporary directory (for a read-only home, as in some containers)."""
    chosen = os.environ.get("REGISTRY_CACHE_DIR")
    if chosen:
        return [Path(chosen)]
    user = f"registry-transformers-{os.getuid()}" if hasattr(os, "getuid") else "registry-transformers"
    return [Path.home() / ".cache" / "registry-transformers", Path(tempfile.gettempdir()) / user]


def _compiler_version(cc: str) -> str:
    done = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60, check=False)
    return done.stdout.splitlines()[0] if done.returncode == 0 and done.stdout else cc


def _private_folder(folder: Path) -> None:
    """Make ``folder`` (mode 0700) or check an existing one: a library found there is loaded into this
    process, so the folder must be this user's and writable by no one else (a shared temporary directory
    could otherwise hand us another user's file)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise PermissionError(f"{folder} belongs to another user")
    if info.st_mode & 0o022:
        raise PermissionError(f"{folder} is writable by other users")


def _build(cc: str) -> Path:
    """Compile the kernels unless these sources, these flags and this compiler were built before."""
    digest = hashlib.sha256()
    for source in SOURCES + HEADERS:
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    digest.update(" ".join(FLAGS).encode() + _compiler_version(cc).encode())
    key = digest.hexdigest()[:16]
    failures = []
    for folder in _cache_dirs():
        try:
            return _build_into(folder / f"registry_kernels-{key}.so", cc)
        except OSError as error:  # an unwritable folder (read-only, not a directory): try the next one
            failures.append(f"{folder}: {error.strerror or error}")
    raise OSError(f"no writable folder for the built kernel ({'; '.join(failures)}); set REGISTRY_CACHE_DIR")


def _build_into(target: Path, cc: str) -> Path:
    _private_folder(target.parent)
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        done = subprocess.run(
            [cc, *FLAGS, *map(str, SOURCES), "-o", str(built)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-800:]}")
        os.replace(built, target)  # atomic: a concurrent build of the same key writes the same file
    return target


@functools.cache
def load() -> Loaded:
    """Build (once per sources, flags and compiler) and load the library, once per process."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return Loaded(None, f"needs x86-64 Linux, not {platform.system()} {platform.machine()}")
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        return Loaded(None, f"no C compiler '{cc}' on PATH (set CC to one)")
    try:
        path = _build(cc)
        return Loaded(ctypes.CDLL(str(path)), path=str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        log.warning("registry's C kernels did not build or load; their layers run on PyTorch's: %s", error)
        return Loaded(None, f"the kernel did not build or load: {error}")


@dataclass(frozen=True)
class KernelStatus:
    """Whether a kernel is in use, and why not when it is not."""

    ready: bool
    reason: str
    library: str | None = None


def check_kernel(
    *,
    switch: str,
    bind: Callable[[ctypes.CDLL], ctypes.CDLL],
    capable: str,
    incapable: str,
    self_check: Callable[[ctypes.CDLL], str | None],
    truth: str,
    fallback: str,
) -> tuple[KernelStatus, ctypes.CDLL | None]:
    """The steps every kernel takes before it is used: not turned off by ``$switch=0``, the library loaded,
    its functions bound (``bind``), the CPU able (the library's ``capable()`` returns 1; else the reason
    ``incapable``), and ``self_check`` passed (it returns None, or what was wrong, checked against
    ``truth``). Returns the status and the library, which is None unless every step passed."""
    if os.environ.get(switch, "1") == "0":
        return KernelStatus(False, f"turned off by {switch}=0"), None
    loaded = load()
    if loaded.library is None:
        return KernelStatus(False, loaded.problem), None
    library = bind(loaded.library)
    if not getattr(library, capable)():
        return KernelStatus(False, incapable, loaded.path), None
    problem = self_check(library)
    if problem:
        log.warning("a registry kernel failed its check against %s; %s: %s", truth, fallback, problem)
        return KernelStatus(False, f"the kernel failed its check against {truth}: {problem}", loaded.path), None
    log.debug("%s ready: %s", capable, loaded.path)
    return KernelStatus(True, "ready", loaded.path), library
