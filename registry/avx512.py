"""float32 linear layers for a few rows on AVX-512, through a small C kernel compiled on first use.

``linear(x, weight, bias, out=...)`` computes ``x @ weight^T + bias`` for a 2-d float32 CPU x of a few
rows (a decode step of a batch: MIN_ROWS to MAX_ROWS). For so few rows the product is a stream of the
weight, and PyTorch's GEMM (MKL) reads it at a third of the memory bandwidth at 8 rows; the kernel
(``registry/csrc/linear_f32.c``) reads it where it lies at close to the bandwidth (bloom-560m, batch 8:
a decode step 2x faster, docs/benchmarks.md). One row stays on MKL's matrix-vector product, which
already streams at the bandwidth.

The sums are float32 in another order than MKL's: results differ from ``F.linear``'s by rounding (about
1e-7 relative), not bit for bit. :func:`registry.fused.disabled` runs ``F.linear`` instead.

The kernel is built with the other C kernels by :mod:`registry.native` on first use and checked against a
float64 product before it is used. It is not used (and :func:`status` says why) when the CPU lacks
AVX-512F, the platform is not x86-64 Linux, no compiler is found, the build or the check fails, or
``REGISTRY_AVX512=0`` is set; those cases run ``F.linear``.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from registry import chains, native

log = logging.getLogger(__name__)

MIN_ROWS = 2  # one row: MKL's matrix-vector product streams at the bandwidth already, bit-identical
MAX_ROWS = 16  # beyond, the kernel's second pass over each weight block from cache stops paying


Status = native.KernelStatus


def _bind(library: ctypes.CDLL) -> ctypes.CDLL:
    pointer, integer = ctypes.c_void_p, ctypes.c_int64
    library.registry_avx512_ready.restype = ctypes.c_int
    library.registry_linear_f32.restype = None
    library.registry_linear_f32.argtypes = [
        pointer, integer, integer,  # X, M, ldx
        pointer, integer, integer, integer,  # W, N, K, ldw
        pointer, pointer, integer, ctypes.c_int,  # bias, Y, ldy, threads
    ]  # fmt: skip
    library.registry_chain_f32.restype = ctypes.c_int
    library.registry_chain_f32.argtypes = chains.ARGTYPES
    library.registry_decode_f32.restype = ctypes.c_int
    library.registry_decode_f32.argtypes = chains.DECODE_ARGTYPES
    library.registry_argmax_rows.restype = None
    library.registry_argmax_rows.argtypes = [
        pointer, ctypes.c_int, integer, integer, integer, pointer, ctypes.c_int,  # X, bf16, M, N, ldx, out, threads
    ]  # fmt: skip
    return library


_library: ctypes.CDLL | None = None  # set once the kernel has passed its check


@functools.cache
def status() -> Status:
    """Build, load and check the kernel once per process; say whether it is used and why not."""
    global _library
    result, _library = native.check_kernel(
        switch="REGISTRY_AVX512",
        bind=_bind,
        capable="registry_avx512_ready",
        incapable="this CPU lacks AVX-512F, or the OS does not save its registers",
        self_check=_self_check,
        truth="a float64 product",
        fallback="float32 runs on F.linear",
    )
    return result  # _library is set only when every check passed: no caller sees an unchecked kernel


def ready() -> bool:
    return status().ready


# (rows, out_features, in_features): in_features short of one vector and past whole vectors; out_features
# short of, equal to and past the kernel's blocks of 3 weight rows; rows in one group of 8 and in three
_CHECK_SHAPES = ((2, 5, 17), (3, 7, 33), (8, 9, 64), (17, 31, 100), (4, 1, 5))


def _self_check(library: ctypes.CDLL) -> str | None:
    generator = torch.Generator().manual_seed(0)
    for rows, out_features, in_features in _CHECK_SHAPES:
        x = torch.randn(rows, in_features, generator=generator)
        w = torch.randn(out_features, in_features, generator=generator)
        b = torch.randn(out_features, generator=generator)
        expected = F.linear(x.double(), w.double(), b.double())
        got = torch.empty(rows, out_features)
        _call(library, x, w, b, got)
        scale = x.double().abs() @ w.double().abs().t() + b.double().abs()  # a bound on each sum's rounding
        error = ((got.double() - expected).abs() / scale).max().item()
        if not error < 1e-5:
            return f"{rows}x{in_features} @ {out_features}: error {error:.3g} of the sum of magnitudes"
    return _check_chain(library, generator) or _check_argmax(library, generator)


def _check_chain(library: ctypes.CDLL, generator: torch.Generator) -> str | None:
    """A whole chain (projection and residual, LayerNorm, two layers with a tanh-GELU between, the
    second residual, the next LayerNorm and projection) against the same steps in float64."""
    x, r0 = (torch.randn(3, 32, generator=generator) for _ in range(2))
    shapes = ((32, 32), (48, 32), (32, 48), (40, 32))
    w0, w1, w2, w3 = (torch.randn(n, k, generator=generator) / k**0.5 for n, k in shapes)
    b0, gamma, beta, b2, gamma3, beta3 = (torch.randn(32, generator=generator) for _ in range(6))
    b1, b3 = torch.randn(48, generator=generator), torch.randn(40, generator=generator)
    s = F.linear(x.double(), w0.double(), b0.double()) + r0.double()
    normed = F.layer_norm(s, (32,), gamma.double(), beta.double(), 1e-5)
    h = F.gelu(F.linear(normed, w1.double(), b1.double()), approximate="tanh")
    y = F.linear(h, w2.double(), b2.double()) + s
    y3 = F.linear(F.layer_norm(y, (32,), gamma3.double(), beta3.double(), 1e-5), w3.double(), b3.double())
    got, got3 = torch.empty(3, 32), torch.empty(3, 40)
    then = ((gamma3, beta3, 1e-5), (w3, b3), got3)
    operands = (x, (w0, b0, r0), (gamma, beta, 1e-5), (w1, b1), "gelu_tanh", (w2, b2), None, got, then)
    chains.call(library.registry_chain_f32, "the AVX-512 float32 kernel", *operands)
    for name, value, truth in (("output", got, y), ("next projection", got3, y3)):
        error = ((value.double() - truth).abs() / (truth.abs() + 1)).max().item()
        if not error < 1e-5:
            return f"a chain's {name}: error {error:.3g}"
    return None


def _check_argmax(library: ctypes.CDLL, generator: torch.Generator) -> str | None:
    """Row maxima against ``torch.argmax``: ties, a NaN, a tail short of a vector, both dtypes, one row
    split across threads and several rows."""
    scores = torch.randn(3, 9000, generator=generator)
    scores[0, 8999] = scores[0].max() + 1  # in the tail
    scores[1, [100, 5000, 7000]] = scores[1].max() + 1  # a tie: the first wins
    scores[2, [4700, 300]] = float("nan")
    for dtype in (torch.float32, torch.bfloat16):
        for rows in (scores[:1], scores):
            x = rows.to(dtype)
            got = torch.empty(x.shape[0], dtype=torch.int64)
            _call_argmax(library, x, got, threads=2)
            if not torch.equal(got, x.argmax(dim=-1)):
                return f"argmax of {x.shape[0]} {dtype} rows: {got.tolist()} for {x.argmax(dim=-1).tolist()}"
    return None


def supports(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`linear` takes these operands: float32 on the CPU, a 2-d weight with contiguous rows
    and x's last dimension as its in_features. The kernel must also be :func:`ready`."""
    return (
        x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.stride(1) == 1
        and weight.shape[0] > 0
        and weight.shape[1] > 0
        and x.shape[-1] == weight.shape[1]
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, out: Tensor | None = None) -> Tensor:
    """``x @ weight^T + bias`` on the kernel, for a 2-d x (rows, in_features); any number of rows is
    computed, MIN_ROWS to MAX_ROWS are what it is fast for.

    Args:
        x, weight: see :func:`supports`.
        bias: (out_features,) float32, or None.
        out: (rows, out_features) float32 with contiguous rows (a column slice of a wider output, say),
            or None for a new tensor.

    Raises:
        RuntimeError: the kernel is not ready here (the message says why).
        ValueError: an operand the kernel does not take, named with what it needs.
    """
    if _library is None and not status().ready:
        raise RuntimeError(f"the AVX-512 float32 kernel is not ready: {status().reason}")
    if x.dim() != 2 or not supports(x, weight):
        raise ValueError(
            f"the AVX-512 float32 kernel takes a 2-d float32 CPU x and a float32 CPU weight with contiguous "
            f"rows and in_features equal to x's last dimension; got x {tuple(x.shape)} {x.dtype} on "
            f"{x.device}, weight {tuple(weight.shape)} {weight.dtype} on {weight.device}, strides {weight.stride()}"
        )
    rows, out_features = x.shape[0], weight.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    for name, t, shape in (("bias", bias, (out_features,)), ("out", out, (rows, out_features))):
        if t is not None and (
            t.dtype != torch.float32 or t.device.type != "cpu" or tuple(t.shape) != shape or t.stride(-1) != 1
        ):
            raise ValueError(
                f"the AVX-512 float32 kernel takes {name} as a float32 CPU tensor of shape {shape} whose last "
                f"dimension is contiguous; got {tuple(t.shape)} {t.dtype} on {t.device}, strides {t.stride()}"
            )
    if out is None:
        out = torch.empty(rows, out_features)
    run(x, weight, bias, out)
    return out


def run(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> None:
    """:func:`linear` without its checks, for callers that made them: every tensor's rows contiguous and its
    shape right, the kernel ready."""
    if torch.autograd.profiler._is_profiler_enabled:  # a profile names the kernel (it is not an ATen op)
        with torch.profiler.record_function(f"registry.avx512.linear {x.shape[0]}x{x.shape[1]}x{weight.shape[0]}"):
            return _call(_library, x, weight, bias, out)  # type: ignore[arg-type]
    _call(_library, x, weight, bias, out)  # type: ignore[arg-type]


def _call(library: ctypes.CDLL, x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> None:
    if x.shape[0] == 0:
        return
    library.registry_linear_f32(
        x.data_ptr(), x.shape[0], x.stride(0),
        weight.data_ptr(), weight.shape[0], x.shape[1], weight.stride(0),
        None if bias is None else bias.data_ptr(), out.data_ptr(), out.stride(0), torch.get_num_threads(),
    )  # fmt: skip


def argmax(scores: Tensor) -> Tensor:
    """``scores.argmax(dim=-1)`` for 2-d float32 or bfloat16 CPU scores with contiguous rows, (rows,) int64:
    the first maximal value of each row, or its first NaN. For greedy decoding: 250880 bfloat16 logits a
    row in tens of microseconds where PyTorch's reduction takes 0.2 ms (0.8 ms for eight rows).

    Raises:
        RuntimeError: the kernel is not ready here (the message says why).
        ValueError: scores the kernel does not take (the message names what it needs).
    """
    if _library is None and not status().ready:
        raise RuntimeError(f"the AVX-512 kernels are not ready: {status().reason}")
    if not supports_argmax(scores):
        raise ValueError(
            f"argmax takes 2-d float32 or bfloat16 CPU scores with contiguous rows and at least one column; got "
            f"{tuple(scores.shape)} {scores.dtype} on {scores.device}, strides {scores.stride()}"
        )
    out = torch.empty(scores.shape[0], dtype=torch.int64)
    _call_argmax(_library, scores, out, torch.get_num_threads())  # type: ignore[arg-type]
    return out


def supports_argmax(scores: Tensor) -> bool:
    """Whether :func:`argmax` takes these scores (the kernel must also be :func:`ready`)."""
    return (
        scores.dim() == 2
        and scores.dtype in (torch.float32, torch.bfloat16)
        and scores.device.type == "cpu"
        and scores.shape[1] > 0
        and scores.stride(1) == 1
    )


def _call_argmax(library: ctypes.CDLL, scores: Tensor, out: Tensor, threads: int) -> None:
    rows, columns = scores.shape
    bf16 = scores.dtype == torch.bfloat16
    library.registry_argmax_rows(scores.data_ptr(), int(bf16), rows, columns, scores.stride(0), out.data_ptr(), threads)
