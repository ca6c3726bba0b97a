"""bfloat16 linear layers on Intel AMX tiles, through a small C kernel compiled on first use.

``linear(x, weight, bias, residual=..., out=..., activation=...)`` computes
``activation(x @ weight^T + bias) + residual`` for 2-d bfloat16 CPU tensors, accumulating in float32 and
rounding once. The kernel (``registry/csrc/amx_linear.c``) reads the weight where it lies, so no packed
copy is kept, and the same code serves a few rows (a decode step, streamed at close to the memory
bandwidth; one row as AVX512-BF16 dot products, which stream faster than tile loads) and a prompt's
hundreds of rows (AMX throughput). :mod:`registry.fused` routes bfloat16 linear layers here
when :func:`status` says the kernel is ready.

The kernel is built with the other C kernels by :mod:`registry.native` on first use, and checked
against ``F.linear`` on small inputs before it is used. It is not used (and :func:`status` says why) when
the CPU lacks AMX-BF16 or AVX512-BF16, the platform is not x86-64 Linux, no compiler is found, the build
or the check fails, or ``REGISTRY_AMX=0`` is set. Those cases run oneDNN's kernels, as before, with the
same numbers up to rounding.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from registry import chains, native

log = logging.getLogger(__name__)

# the kernel's activation codes (enum in vector_math.h)
ACTIVATIONS = chains.ACTIVATION_CODES
K_MULTIPLE = 32  # in_features must be a multiple of this (one tile of k); out_features may be anything


Status = native.KernelStatus


def _bind(library: ctypes.CDLL) -> ctypes.CDLL:
    pointer, integer = ctypes.c_void_p, ctypes.c_int64
    library.registry_amx_ready.restype = ctypes.c_int
    library.registry_linear_bf16.restype = ctypes.c_int
    library.registry_linear_bf16.argtypes = [
        pointer, integer, integer,  # X, M, ldx
        pointer, integer, integer, integer,  # W, N, K, ldw
        pointer, pointer, integer,  # bias, R, ldr
        pointer, integer, ctypes.c_int, ctypes.c_int,  # Y, ldy, activation, threads
    ]  # fmt: skip
    library.registry_chain_bf16.restype = ctypes.c_int
    library.registry_chain_bf16.argtypes = chains.ARGTYPES
    library.registry_decode_bf16.restype = ctypes.c_int
    library.registry_decode_bf16.argtypes = chains.DECODE_ARGTYPES
    library.registry_prompt_work_floats.restype = ctypes.c_int64
    library.registry_prompt_work_floats.argtypes = [ctypes.c_int64, ctypes.c_int64]  # keys, head size
    return library


_library: ctypes.CDLL | None = None  # set once the kernel has passed its check


@functools.cache
def status() -> Status:
    """Build, load and check the kernel once per process; say whether it is used and why not."""
    global _library
    result, _library = native.check_kernel(
        switch="REGISTRY_AMX",
        bind=_bind,
        capable="registry_amx_ready",
        incapable="this CPU lacks AMX-BF16 or AVX512-BF16, or the OS refused the tile registers",
        self_check=_self_check,
        truth="F.linear",
        fallback="bfloat16 runs on oneDNN",
    )
    return result  # _library is set only when every check passed: no caller sees an unchecked kernel


def ready() -> bool:
    return status().ready


# (rows, out_features, in_features) of the check: one row (dot products, an output tail); a transposed tile
# with an output tail; two row chunks; k chunks of 256 with a remainder on the row-block path
_CHECK_SHAPES = ((1, 53, 64), (19, 37, 96), (150, 64, 32), (70, 32, 544))


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
    return _check_chain(library, generator)


def _check_chain(library: ctypes.CDLL, generator: torch.Generator) -> str | None:
    """A whole chain (projection and residual, LayerNorm, two layers, the second residual) against the
    same steps in float64, for one row and for tiles."""
    for rows in (1, 19):
        x, r0 = (torch.randn(rows, 64, generator=generator).bfloat16() for _ in range(2))
        w0, w1, w2 = (
            torch.randn(n, k, generator=generator).div(k**0.5).bfloat16() for n, k in ((64, 64), (96, 64), (64, 96))
        )
        b0, gamma, beta, b2 = (torch.randn(64, generator=generator).bfloat16() for _ in range(4))
        b1 = torch.randn(96, generator=generator).bfloat16()
        s = F.linear(x.double(), w0.double(), b0.double()) + r0.double()
        h = F.layer_norm(s, (64,), gamma.double(), beta.double(), 1e-5)
        expected = F.linear(F.gelu(F.linear(h, w1.double(), b1.double())), w2.double(), b2.double()) + s
        got = torch.empty(rows, 64, dtype=torch.bfloat16)
        operands = (x, (w0, b0, r0), (gamma, beta, 1e-5), (w1, b1), "gelu", (w2, b2), None, got)
        chains.call(library.registry_chain_bf16, "the AMX kernel", *operands)
        error = ((got.double() - expected).abs() / (expected.abs() + 1e-1)).max().item()
        if not error < 2**-4:  # five roundings to bfloat16 on the way
            return f"a chain of {rows} rows: relative error {error:.3g}"
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
