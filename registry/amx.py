"""bfloat16 linear layers on Intel AMX tiles, through a small C kernel compiled on first use.

``linear(x, weight, bias, residual=..., out=..., activation=...)`` computes
``activation(x @ weight^T + bias) + residual`` for 2-d bfloat16 CPU tensors, accumulating in float32 and
rounding once. The kernel (``registry/csrc/amx_linear.c``) reads the weight where it lies, so no packed
copy is kept, and the same code serves one row (a decode step, streamed at close to the memory bandwidth)
and a prompt's hundreds of rows (AMX throughput). :mod:`registry.fused` routes bfloat16 linear layers here
when :func:`status` says the kernel is ready.

The kernel is built with the C compiler (``$CC``, else ``cc``) into ``$REGISTRY_CACHE_DIR`` (default
``~/.cache/registry-transformers``, or a folder in the temporary directory where that is not writable),
once per source, flags and compiler, and checked against
``F.linear`` on small inputs before it is used. It is not used (and :func:`status` says why) when the CPU
lacks AMX-BF16 or AVX512-BF16, the platform is not x86-64 Linux, no compiler is found, the build or the
check fails, or ``REGISTRY_AMX=0`` is set. Those cases run oneDNN's kernels, as before, with the same
numbers up to rounding.
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

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "amx_linear.c"
FLAGS = (
    "-O3", "-fPIC", "-shared", "-fopenmp", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
    "-mavx512bf16", "-mamx-tile", "-mamx-bf16",
)  # fmt: skip
# the kernel's activation codes (enum in amx_linear.c)
ACTIVATIONS = {None: 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "silu": 4, "tanh": 5}
K_MULTIPLE = 32  # in_features must be a multiple of this (one tile of k); out_features may be anything


@dataclass(frozen=True)
class Status:
    """Whether the AMX kernel is in use, and why not when it is not."""

    ready: bool
    reason: str
    library: str | None = None


def _cache_dirs() -> list[Path]:
    """Where the built kernel may go: $REGISTRY_CACHE_DIR alone when set; else the user's cache, then a
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
    """Compile the kernel unless this source, these flags and this compiler were built before."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + _compiler_version(cc).encode()).hexdigest()[:16]
    failures = []
    for folder in _cache_dirs():
        try:
            return _build_into(folder / f"amx_linear-{key}.so", cc)
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
            [cc, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True, timeout=300, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-800:]}")
        os.replace(built, target)  # atomic: a concurrent build of the same key writes the same file
    return target


def _bind(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    pointer, integer = ctypes.c_void_p, ctypes.c_int64
    library.registry_amx_ready.restype = ctypes.c_int
    library.registry_linear_bf16.restype = ctypes.c_int
    library.registry_linear_bf16.argtypes = [
        pointer, integer, integer,  # X, M, ldx
        pointer, integer, integer, integer,  # W, N, K, ldw
        pointer, pointer, integer,  # bias, R, ldr
        pointer, integer, ctypes.c_int, ctypes.c_int,  # Y, ldy, activation, threads
    ]  # fmt: skip
    return library


_library: ctypes.CDLL | None = None  # set once the kernel has passed its check


@functools.cache
def status() -> Status:
    """Build, load and check the kernel once per process; say whether it is used and why not."""
    global _library
    if os.environ.get("REGISTRY_AMX", "1") == "0":
        return Status(False, "turned off by REGISTRY_AMX=0")
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return Status(False, f"needs x86-64 Linux, not {platform.system()} {platform.machine()}")
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        return Status(False, f"no C compiler '{cc}' on PATH (set CC to one)")
    try:
        path = _build(cc)
        library = _bind(path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        log.warning("the AMX linear kernel did not build or load; bfloat16 runs on oneDNN: %s", error)
        return Status(False, f"the kernel did not build or load: {error}")
    if not library.registry_amx_ready():
        return Status(False, "this CPU lacks AMX-BF16 or AVX512-BF16, or the OS refused the tile registers", str(path))
    problem = _self_check(library)
    if problem:
        log.warning("the AMX linear kernel failed its check; bfloat16 runs on oneDNN: %s", problem)
        return Status(False, f"the kernel failed its check against F.linear: {problem}", str(path))
    _library = library  # published only now: no caller sees an unchecked kernel
    log.debug("AMX linear kernel ready: %s", path)
    return Status(True, "ready", str(path))


def ready() -> bool:
    return status().ready


# (rows, out_features, in_features) of the check: one row; a transposed tile with an output tail; two row
# chunks; k chunks of 256 with a remainder on the row-block path
_CHECK_SHAPES = ((1, 48, 64), (19, 37, 96), (150, 64, 32), (70, 32, 544))


def _self_check(library: ctypes.CDLL) -> str | None:
    generator = torch.Generator().manual_seed(0)
    for rows, out_features, in_features in _CHECK_SHAPES:
        x = torch.randn(rows, in_features, generator=generator).bfloat16()
        w = (torch.randn(out_features, in_features, generator=generator) / in_features**0.5).bfloat16()
        b = torch.randn(out_features, generator=generator).bfloat16()
        r = torch.randn(rows, out_features, generator=generator).bfloat16()
        exact = F.linear(x.double(), w.double(), b.double())
        for activation in ACTIVATIONS:
            expected = _reference_activation(exact, activation) + r.double()
            got = torch.empty(rows, out_features, dtype=torch.bfloat16)
            _call(library, x, w, b, r, got, ACTIVATIONS[activation])
            error = ((got.double() - expected).abs() / (expected.abs() + 1e-2)).max().item()
            if not error < 2**-6:
                return f"{rows}x{in_features} @ {out_features}, activation {activation}: relative error {error:.3g}"
    return None


def _reference_activation(y: Tensor, activation: str | None) -> Tensor:
    if activation is None:
        return y
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    functions: dict[str, Callable[[Tensor], Tensor]] = {
        "gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh
    }  # fmt: skip
    return functions[activation](y)


def supports(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`linear` takes these operands: bfloat16 on the CPU, a 2-d weight with contiguous rows,
    in_features a positive multiple of K_MULTIPLE and equal to x's last dimension. The kernel must also be
    :func:`ready`."""
    return (
        x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.stride(1) == 1
        and weight.shape[1] > 0
        and weight.shape[1] % K_MULTIPLE == 0
        and x.shape[-1] == weight.shape[1]
    )


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    residual: Tensor | None = None,
    activation: str | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """``activation(x @ weight^T + bias) + residual`` on the AMX kernel, for a 2-d x (rows, in_features).

    Args:
        x, weight: see :func:`supports`.
        bias: (out_features,) bfloat16, or None.
        residual: (rows, out_features) bfloat16 with contiguous rows, or None.
        activation: a key of :data:`ACTIVATIONS`.
        out: (rows, out_features) bfloat16 with contiguous rows (e.g. a column slice of a wider output),
            or None for a new tensor.

    Raises:
        RuntimeError: the kernel is not ready here (the message says why).
        ValueError: an operand the kernel does not take, named with what it needs.
    """
    if _library is None and not status().ready:
        raise RuntimeError(f"the AMX kernel is not ready: {status().reason}")
    if x.dim() != 2 or not supports(x, weight):
        raise ValueError(
            f"the AMX kernel takes a 2-d bfloat16 CPU x and a bfloat16 CPU weight with contiguous rows, "
            f"in_features a positive multiple of {K_MULTIPLE}; got x {tuple(x.shape)} {x.dtype} on {x.device}, "
            f"weight {tuple(weight.shape)} {weight.dtype} on {weight.device}, strides {weight.stride()}"
        )
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {list(ACTIVATIONS)}")
    rows, out_features = x.shape[0], weight.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    _check_operand("bias", bias, (out_features,), unit_stride=0)
    _check_operand("residual", residual, (rows, out_features), unit_stride=1)
    if out is None:
        out = torch.empty(rows, out_features, dtype=torch.bfloat16)
    else:
        _check_operand("out", out, (rows, out_features), unit_stride=1)
    run(x, weight, bias, residual, out, ACTIVATIONS[activation])
    return out


def _check_operand(name: str, t: Tensor | None, shape: tuple[int, ...], unit_stride: int) -> None:
    if t is None:
        return
    if t.dtype != torch.bfloat16 or t.device.type != "cpu" or tuple(t.shape) != shape or t.stride(unit_stride) != 1:
        raise ValueError(
            f"the AMX kernel takes {name} as a bfloat16 CPU tensor of shape {shape} whose last dimension is "
            f"contiguous; got {tuple(t.shape)} {t.dtype} on {t.device}, strides {t.stride()}"
        )


def run(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None, out: Tensor, code: int) -> None:
    """:func:`linear` without its checks, for callers that made them (``code``: ACTIVATIONS[activation]).
    Every tensor's rows must be contiguous and its shape right; the kernel must be ready."""
    if torch.autograd.profiler._is_profiler_enabled:  # a profile names the kernel (it is not an ATen op)
        name = f"registry.amx.linear {x.shape[0]}x{x.shape[1]}x{weight.shape[0]}"
        with torch.profiler.record_function(name):
            return _call(_library, x, weight, bias, residual, out, code)  # type: ignore[arg-type]
    _call(_library, x, weight, bias, residual, out, code)  # type: ignore[arg-type]


def _call(
    library: ctypes.CDLL,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    out: Tensor,
    code: int,
) -> None:
    rows, in_features = x.shape
    failed = library.registry_linear_bf16(
        x.data_ptr(), rows, x.stride(0),
        weight.data_ptr(), weight.shape[0], in_features, weight.stride(0),
        None if bias is None else bias.data_ptr(),
        None if residual is None else residual.data_ptr(), 0 if residual is None else residual.stride(0),
        out.data_ptr(), out.stride(0), code, torch.get_num_threads(),
    )  # fmt: skip
    if failed:
        raise MemoryError(f"the AMX kernel could not allocate {in_features * 256} bytes of scratch memory")
