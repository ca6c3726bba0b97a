"""Linear layers with fused epilogues, for inference on the CPU.

``linear(x, layers, activation=..., residual=...)`` computes ``activation(x @ W^T + b) + residual``
where W and b are the weights and biases of one or more ``nn.Linear`` layers concatenated along their
outputs (a transformer's query, key and value projections as one GEMM). Families call it instead of
``layer(x)`` so that, where it can, the CPU runs it in fewer passes over memory:

* bfloat16, up to AMX_MAX_ROWS rows: the AMX kernel of :mod:`registry.amx`, which reads the weights where
  they lie (no packed copy), streams them at close to the memory bandwidth for a decode step, and applies
  the bias, the activation and the residual add before it rounds to bfloat16;
* bfloat16, more rows (or where that kernel is not ready: :func:`registry.amx.status` says why): oneDNN
  with the weight packed once for its AMX/AVX-512 kernels, and the bias, the activation or the residual
  add in the GEMM's epilogue (``F.linear`` hands oneDNN an unpacked weight on every call, and the
  activation and the residual add are separate passes);
* float32: from MKL_MIN_ROWS rows, MKL with the weight packed for that row count (bit-identical to
  ``addmm``); 2 to 16 rows (a decode step of a batch), the AVX-512 kernel of :mod:`registry.avx512`,
  which reads the weights where they lie at close to the memory bandwidth where MKL's GEMM reads them
  at a third of it (float32 sums in another order: equal to ``F.linear`` up to rounding, not bit for
  bit); otherwise ``F.linear`` itself, with no packed copy. Activation and residual follow in place.
* a language-model head tied to the embeddings (:func:`project`) is never packed: bfloat16 runs on the
  AMX kernel; without it, one row runs as a GEMV, a few bfloat16 rows as ``W @ x^T``.

A family whose reference computes the activation its own way (BLOOM's tanh-GELU: another constant,
nine float32 operations) passes that as ``reference_activation``: it runs wherever the product is the
reference's to the bit, and the named activation, fused or in one pass, where a kernel rounds anyway.

The fast path applies only where it computes the same function (results differ by rounding only;
float32 ones not at all outside the few-row kernel) and nothing is lost: CPU tensors, autograd
off (``torch.no_grad`` / ``torch.inference_mode``), and the kernels present in this torch build.
Anywhere else (training, GPUs, float16) it is ``F.linear`` followed by the same operations.

Packed weights (oneDNN, MKL) are cached per layer group and rebuilt when a parameter is replaced or
changed in place; they are a second copy of those weights in the kernel's layout, made on the first call
that needs them and held only while the layers live. A copy is made only if PACK_MEMORY_RESERVE of the
machine's memory stays available after it; otherwise the group runs unpacked (the AMX kernel, else
``F.linear``), a warning says so once, and :func:`packing` counts it. :func:`disabled` turns the fast
path off (A/B comparisons, tests).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from registry import amx, avx512, chains

log = logging.getLogger(__name__)

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
}
# in place on a fresh GEMM output: no second large allocation (its page faults cost more than the math)
_IN_PLACE: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": lambda y: torch.ops.aten.gelu_(y),
    "gelu_tanh": lambda y: torch.ops.aten.gelu_(y, approximate="tanh"),
    "relu": torch.relu_,
    "silu": lambda y: F.silu(y, inplace=True),
    "tanh": torch.tanh_,
}
# oneDNN post-op (attr, scalars, algorithm) for each activation
_ONEDNN_UNARY: dict[str | None, tuple[str, list[Any], str]] = {
    None: ("none", [], ""),
    "gelu": ("gelu", [], "none"),
    "gelu_tanh": ("gelu", [], "tanh"),
    "relu": ("relu", [], ""),
    "silu": ("swish", [], ""),
    "tanh": ("tanh", [], ""),
}

_enabled = True
# bfloat16 row counts below which the AMX kernel runs (no packed weights); from here oneDNN's packed GEMM,
# which is 10-25% faster on large products (docs/benchmarks.md) at the cost of a packed copy of the weights
AMX_MAX_ROWS = 256
# float32 row counts from which MKL's packed GEMM is used (below: no packed copy at all)
MKL_MIN_ROWS = 256
# up to this many bfloat16 rows, ``W @ x^T`` beats ``x @ W^T``: the weight streams once through the
# kernel's long dimension (a 250880 x 1024 head with 8 rows: 46 ms against 74 ms on the machine of
# docs/benchmarks.md). Float32 runs a few rows on its own kernel instead (registry.avx512)
WEIGHT_LEFT_MAX_ROWS = 64
# oneDNN's AMX GEMM is markedly slower for some (rows, out, in) shapes than for their row blocks
# (e.g. 1024 x 768 x 3072 with 2 threads); the first call of a shape times both and keeps the faster
ROW_BLOCK = 256
_row_blocks: dict[tuple[Any, ...], int] = {}
_packed: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], tuple[tuple[Any, ...], Any]]] = (
    weakref.WeakKeyDictionary()
)
# a packed copy is made only if this fraction of the machine's memory stays available after it: packing is
# lazy, and a large model's first long prompt would otherwise double its weights in memory and run out of
# it. A group left unpacked runs on the AMX kernel (bfloat16) or F.linear, and stays unpacked until its
# parameters change
PACK_MEMORY_RESERVE = 0.25
_declined_warned = False


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the plain path (``F.linear``) inside this block."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def kernels() -> dict[str, str]:
    """Each fast kernel and whether it is used here: "ready", or the reason it is not."""
    found = _kernels()
    status = {name: "ready" if name in found else "not in this torch build, or failed its check"
              for name in ("onednn-bf16", "mkl-fp32")}  # fmt: skip
    status["amx-bf16"] = amx.status().reason
    status["avx512-fp32"] = avx512.status().reason
    return status


@functools.cache
def _kernels() -> frozenset[str]:
    """Which fast kernels this torch build has and runs correctly (checked once on tiny inputs)."""
    found = set()
    if amx.ready():
        found.add("amx-bf16")
    if avx512.ready():
        found.add("avx512-fp32")
    x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    expected = F.linear(x, w, b)
    with torch.no_grad():
        try:
            if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
                xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
                packed = torch.ops.mkldnn._reorder_linear_weight(wb, None)
                got = torch.ops.mkldnn._linear_pointwise(xb, packed, bb, "none", [], "")
                if torch.allclose(got.float(), F.linear(xb, wb, bb).float(), atol=0.1):
                    found.add("onednn-bf16")
        except (RuntimeError, AttributeError) as error:
            log.debug("oneDNN packed linear unavailable: %s", error)
        try:
            if torch.backends.mkl.is_available():
                packed = torch.ops.mkl._mkl_reorder_linear_weight(w, 3)
                got = torch.ops.mkl._mkl_linear(x, packed, w, b, 3)
                if torch.allclose(got, expected, atol=1e-5):
                    found.add("mkl-fp32")
        except (RuntimeError, AttributeError) as error:
            log.debug("MKL packed linear unavailable: %s", error)
    return frozenset(found)


def _fast_path(x: Tensor) -> bool:
    return _enabled and not torch.is_grad_enabled() and x.device.type == "cpu"


def _kernel_for(x: Tensor) -> str | None:
    if not _fast_path(x) or x.dim() < 2:
        return None
    if x.dtype == torch.float32 and x.numel() < MKL_MIN_ROWS * x.shape[-1]:
        # MKL packs for one row count and repacks (a copy of every weight) when it changes, as it does
        # between a prompt and its decode steps: worth it only for large GEMMs. Below, a few rows run
        # as the weight-on-the-left GEMM, one row as a GEMV (see _plain)
        return None
    kind = {torch.bfloat16: "onednn-bf16", torch.float32: "mkl-fp32"}.get(x.dtype)
    return kind if kind is not None and kind in _kernels() else None


def _amx_linear(
    x: Tensor,
    group: Sequence[nn.Linear],
    activation: str | None,
    residual: Tensor | None,
    any_rows: bool = False,
) -> Tensor | None:
    """The group on the AMX kernel, each layer writing its columns of one output (no concatenated copy);
    None where the kernel does not apply: it takes bfloat16 CPU operands, fewer than AMX_MAX_ROWS rows
    (any number with ``any_rows``: where the packed path has no memory for its copy),
    in_features a multiple of its k tile, weights with contiguous rows. (The checks of
    :func:`registry.amx.supports`, inlined and made once: this runs for every layer of a decode step.)"""
    in_features = x.shape[-1]
    if (
        x.dtype is not torch.bfloat16
        or not _enabled
        or not x.is_cpu
        or in_features % amx.K_MULTIPLE
        or (not any_rows and x.numel() >= AMX_MAX_ROWS * in_features)
        or torch.is_grad_enabled()
        or "amx-bf16" not in _kernels()
        or (residual is not None and (residual.dtype is not torch.bfloat16 or not residual.is_cpu))
    ):
        return None
    operands = []
    leading = x.shape[:-1]
    for layer in group:
        operand = _kernel_operand(layer, in_features)
        if operand is None:
            return None
        operands.append(operand)
    out_features = sum(weight.shape[0] for weight, _ in operands)
    if residual is not None and residual.shape != (*leading, out_features):
        return None  # a broadcast residual: the kernel reads one residual row per output row
    x2 = x.reshape(-1, in_features)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    code = amx.ACTIVATIONS[activation]
    y = torch.empty(x2.shape[0], out_features, dtype=torch.bfloat16)
    r2 = None if residual is None else residual.reshape(-1, out_features)
    start = 0
    for weight, bias in operands:
        end = start + weight.shape[0]
        whole = len(operands) == 1  # no column slices to make
        out = y if whole else y[:, start:end]
        part = r2 if r2 is None or whole else r2[:, start:end]
        if part is not None and part.stride(1) != 1:
            part = part.contiguous()
        amx.run(x2, weight, bias, part, out, code)
        start = end
    return y.view(*leading, out_features)


def _kernel_operand(layer: nn.Linear, in_features: int, dtype: torch.dtype = torch.bfloat16) -> chains.Layer | None:
    """The layer's (weight, bias) if a kernel reads them as they lie: ``dtype`` on the CPU, weight rows
    of ``in_features`` contiguous values, a contiguous bias; and no forward hooks on it, nor a forward of
    its own (it runs as a module then, see :func:`linear`)."""
    if _runs_as_module(layer):
        return None
    weight, bias = layer.weight, layer.bias
    if (
        weight.dtype is not dtype
        or not weight.is_cpu
        or weight.shape[1] != in_features
        or weight.stride(1) != 1
        or (bias is not None and (bias.dtype is not dtype or bias.stride(0) != 1 or not bias.is_cpu))
    ):
        return None
    return weight, bias


def _chain_kernel(x: Tensor) -> int | None:
    """Whether a kernel takes a chain (:func:`registry.chains.run_chain`) on input x: the multiple its
    layers' in_features must be, or None where none does. bfloat16 below AMX_MAX_ROWS rows runs on the
    AMX kernel, float32 rows of a decode step (avx512.MIN_ROWS to MAX_ROWS) on the AVX-512 kernel;
    autograd off."""
    if not _enabled or not x.is_cpu or torch.is_grad_enabled() or not x.shape[-1]:
        return None
    rows = x.numel() // x.shape[-1]
    if x.dtype is torch.bfloat16 and rows < AMX_MAX_ROWS and "amx-bf16" in _kernels():
        return amx.K_MULTIPLE
    if x.dtype is torch.float32 and avx512.MIN_ROWS <= rows <= avx512.MAX_ROWS and "avx512-fp32" in _kernels():
        return 1
    return None


def _kernel_chain(
    x: Tensor,
    *,
    project: tuple[nn.Linear, Tensor] | None = None,
    norm: nn.LayerNorm | None = None,
    first: nn.Linear,
    activation: str | None = None,
    second: nn.Linear | None = None,
    residual: Tensor | None = None,
    then: tuple[nn.LayerNorm, nn.Linear] | None = None,
) -> tuple[Tensor, Tensor | None] | None:
    """A chain (:func:`registry.chains.run_chain`) on modules (``project``: the attention's output
    projection and the block's residual; ``then``: the next block's LayerNorm and first projection):
    (its result, ``then``'s result or None); None where no kernel takes it (:func:`_chain_kernel`), or a
    layer or LayerNorm is not one it reads as it lies, or a LayerNorm has forward hooks (it runs as a
    module then, and they run)."""
    multiple = _chain_kernel(x)
    if multiple is None:
        return None
    dtype, in_features, leading = x.dtype, x.shape[-1], x.shape[:-1]
    layers: list[chains.Layer] = []
    width = in_features
    for layer in (project[0] if project is not None else None, first, second):
        if layer is None:
            continue
        operand = None if width % multiple else _kernel_operand(layer, width, dtype)
        if operand is None:
            return None
        layers.append(operand)
        width = operand[0].shape[0]
    if project is not None and width != layers[0][0].shape[0]:
        return None  # the projection's result is the last layer's residual: their widths must agree
    extra, size = (residual, width) if project is None else (project[1], layers[0][0].shape[0])
    if extra is not None and (extra.shape != (*leading, size) or extra.dtype is not dtype or not extra.is_cpu):
        return None
    norm_args = None
    if norm is not None:
        norm_args = _kernel_norm(norm, layers[0][0].shape[0] if project is not None else in_features, dtype)
        if norm_args is None:
            return None
    then_args = None
    if then is not None:
        then_norm = _kernel_norm(then[0], width, dtype)
        then_operand = None if width % multiple else _kernel_operand(then[1], width, dtype)
        if then_norm is None or then_operand is None:
            return None
        then_y = torch.empty(*leading, then_operand[0].shape[0], dtype=dtype)
        then_args = (then_norm, then_operand, then_y)
    first_at = 0 if project is None else 1  # layers[0] is the projection where there is one
    y = chains.run_chain(
        x.contiguous(),  # the kernel reads rows of the leading dimensions, in_features apart
        project=None if project is None else (*layers[0], project[1].contiguous()),
        norm=norm_args,
        first=layers[first_at],
        activation=activation,
        second=layers[first_at + 1] if second is not None else None,
        residual=None if residual is None else residual.contiguous(),
        then=then_args,
    )
    return y, None if then_args is None else then_args[2]


def _kernel_norm(norm: nn.LayerNorm, width: int, dtype: torch.dtype) -> chains.Norm | None:
    """The LayerNorm's (weight, bias, eps) if a chain computes it over rows of ``width``: affine, ``dtype``,
    contiguous, on the CPU, ``width`` a multiple of 16, without forward hooks or a forward of its own (those
    run it as a module)."""
    if type(norm).forward is not nn.LayerNorm.forward:
        return None
    gamma, beta = norm.weight, norm.bias
    if (
        tuple(norm.normalized_shape) != (width,)
        or width % 16
        or gamma is None
        or beta is None
        or gamma.dtype is not dtype
        or beta.dtype is not dtype
        or not gamma.is_cpu
        or not beta.is_cpu
        or not gamma.is_contiguous()
        or not beta.is_contiguous()
        or has_forward_hooks(norm)
    ):
        return None
    return gamma, beta, float(norm.eps)


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether forward hooks would run on ``module``: its own, or hooks registered for every module
    (``torch.nn.modules.module.register_module_forward_hook``). A family calls such a module as a module
    (so that they run and see what they expect) instead of folding its work into a fused kernel call."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or getattr(torch.nn.modules.module, "_global_forward_hooks", None)
        or getattr(torch.nn.modules.module, "_global_forward_pre_hooks", None)
    )


def _few_rows_f32(x: Tensor, group: Sequence[tuple[Tensor, Tensor | None]]) -> Tensor | None:
    """The (weight, bias) pairs on the AVX-512 float32 kernel, each writing its columns of one output; None
    where it does not apply: float32 CPU operands with contiguous weight rows and contiguous biases,
    avx512.MIN_ROWS to avx512.MAX_ROWS rows, the kernel ready. (Callers checked the fast path.)"""
    in_features = x.shape[-1]
    rows = x.numel() // in_features if in_features else 0
    if x.dtype is not torch.float32 or not avx512.MIN_ROWS <= rows <= avx512.MAX_ROWS or not x.is_cpu:
        return None
    if "avx512-fp32" not in _kernels():
        return None
    for weight, bias in group:
        if not avx512.supports(x, weight) or (
            bias is not None and (bias.dtype is not torch.float32 or not bias.is_cpu or bias.stride(0) != 1)
        ):
            return None
    x2 = x.reshape(rows, in_features)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    out_features = sum(weight.shape[0] for weight, _ in group)
    y = torch.empty(rows, out_features)
    start = 0
    for weight, bias in group:
        end = start + weight.shape[0]
        avx512.run(x2, weight, bias, y if len(group) == 1 else y[:, start:end])
        start = end
    return y.view(*x.shape[:-1], out_features)


def _few_rows_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear``: on the AVX-512 kernel for a few float32 rows (:func:`_few_rows_f32`), otherwise as
    :func:`_exact_linear` computes it."""
    y = _few_rows_f32(x, ((weight, bias),))
    return y if y is not None else _exact_linear(x, weight, bias)


def _exact_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear``'s numbers, bit for bit: computed as ``(W @ x^T)^T`` for 2 to WEIGHT_LEFT_MAX_ROWS
    bfloat16 rows on the CPU (bfloat16 products accumulate in float32 either way), else ``F.linear``."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or not 1 < rows <= WEIGHT_LEFT_MAX_ROWS:
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, x.shape[-1])
    y = torch.mm(weight, x2.t()) if bias is None else torch.addmm(bias[:, None], weight, x2.t())
    return y.t().reshape(*x.shape[:-1], weight.shape[0])


def project(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight^T`` without a bias and without a packed copy (for large matrices that are also
    used elsewhere, as a language-model head tied to the input embeddings).

    bfloat16 runs on the AMX kernel, which reads the weight where it lies, at close to the memory
    bandwidth for a few rows. Without it, a few rows run as ``W @ x^T`` (see WEIGHT_LEFT_MAX_ROWS) and
    one row as a matrix-vector product: for bfloat16 that reads the weight at close to the memory
    bandwidth, where the GEMM runs at about two thirds of it (a 250880 x 1024 head: 28 ms against 39 ms
    on the 2-core machine of docs/benchmarks.md). A few float32 rows run on the AVX-512 kernel."""
    if not _fast_path(x):
        return F.linear(x, weight)
    if "amx-bf16" in _kernels() and amx.supports(x, weight):
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.empty(x2.shape[0], weight.shape[0], dtype=torch.bfloat16)
        amx.run(x2 if x2.stride(1) == 1 else x2.contiguous(), weight, None, None, y, 0)
        return y.view(*x.shape[:-1], weight.shape[0])
    if x.numel() == x.shape[-1]:
        return torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
    return _few_rows_linear(x, weight, None)


def _weights(layers: Sequence[nn.Linear]) -> tuple[Tensor, Tensor | None]:
    if len(layers) == 1:
        return layers[0].weight, layers[0].bias
    weight = torch.cat([layer.weight for layer in layers])
    biases = [layer.bias for layer in layers]
    if all(b is None for b in biases):
        return weight, None
    bias = torch.cat(
        [
            b if b is not None else layer.weight.new_zeros(layer.out_features)
            for b, layer in zip(biases, layers, strict=True)
        ]
    )
    return weight, bias


def _memory() -> tuple[int, int] | None:
    """(available, total) bytes of this machine's memory, from /proc/meminfo; None where it is not there."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["MemAvailable"].split()[0]) * 1024, int(fields["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _affordable(nbytes: int) -> bool:
    memory = _memory()
    return memory is None or memory[0] - nbytes >= PACK_MEMORY_RESERVE * memory[1]


def packing() -> dict[str, int]:
    """What the packed copies cost now: ``packed_bytes`` held by live layers, ``packed_groups``, and
    ``unpacked_groups`` left unpacked because the memory was not there (see PACK_MEMORY_RESERVE)."""
    report = {"packed_bytes": 0, "packed_groups": 0, "unpacked_groups": 0}
    for entries in list(_packed.values()):
        for _, value in entries.values():
            if value is None:
                report["unpacked_groups"] += 1
            else:
                report["packed_groups"] += 1
                report["packed_bytes"] += value[4]
    return report


def _packed_weights(
    layers: Sequence[nn.Linear], kernel: str, rows: int
) -> tuple[Any, Tensor | None, Tensor | None, int, int] | None:
    """(packed weight, plain weight or None, bias, out_features, bytes held) for ``kernel``, cached until a
    parameter changes; None if the copy would leave less than PACK_MEMORY_RESERVE of the memory available
    (that answer is cached too). MKL packs for one row count: its entry is rebuilt when the row count
    changes."""
    global _declined_warned
    params = [p for layer in layers for p in (layer.weight, layer.bias) if p is not None]
    stamp = (kernel, rows if kernel == "mkl-fp32" else None, *((id(p), p.data_ptr(), p._version) for p in params))
    entries = _packed.setdefault(layers[0], {})
    key = tuple(id(layer) for layer in layers)
    cached = entries.get(key)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    entries.pop(key, None)  # a stale copy is not counted against the new one
    # the packed copy, and for MKL the concatenated plain weight it keeps beside it
    nbytes = sum(layer.weight.numel() * layer.weight.element_size() for layer in layers)
    nbytes *= 2 if kernel == "mkl-fp32" and len(layers) > 1 else 1
    if not _affordable(nbytes):
        entries[key] = (stamp, None)
        if not _declined_warned:
            _declined_warned = True
            available = (_memory() or (0, 0))[0]
            log.warning(
                "registry.fused: not packing linear weights (%.2f GB for this layer group) with %.2f GB of memory "
                "available; such layers run unpacked, slower on large products (see registry.fused.packing())",
                nbytes / 1e9,
                available / 1e9,
            )
        return None
    weight, bias = _weights(layers)
    value: tuple[Any, Tensor | None, Tensor | None, int, int]
    if kernel == "onednn-bf16":
        value = (torch.ops.mkldnn._reorder_linear_weight(weight, None), None, bias, weight.shape[0], nbytes)
    else:  # MKL also needs the plain weight (it falls back to it for other row counts)
        value = (torch.ops.mkl._mkl_reorder_linear_weight(weight, rows), weight, bias, weight.shape[0], nbytes)
    entries[key] = (stamp, value)
    return value


def _blocked(gemm: Callable[[slice], Tensor], rows: int, shape: tuple[Any, ...]) -> Tensor:
    """``gemm`` over all rows, in one call or in blocks of ROW_BLOCK rows, whichever was faster for
    ``shape`` the first time it was seen (timed twice each; the result is the same either way)."""
    block = _row_blocks.get(shape)
    if block is None:
        block = 0
        if rows >= 2 * ROW_BLOCK:
            timings: dict[int, float] = {}
            for candidate in (0, ROW_BLOCK, 0, ROW_BLOCK):
                start = time.perf_counter()
                _run_blocks(gemm, rows, candidate)
                elapsed = time.perf_counter() - start
                timings[candidate] = min(elapsed, timings.get(candidate, elapsed))
            block = min(timings, key=lambda c: timings[c])
        _row_blocks[shape] = block
        log.debug("linear %s: %s", shape, f"blocks of {block} rows" if block else "one GEMM")
    return _run_blocks(gemm, rows, block)


def _run_blocks(gemm: Callable[[slice], Tensor], rows: int, block: int) -> Tensor:
    if not block:
        return gemm(slice(None))
    return torch.cat([gemm(slice(start, start + block)) for start in range(0, rows, block)])


def _plain(
    x: Tensor,
    group: Sequence[nn.Linear],
    activation: str | None,
    residual: Tensor | None,
    reference_activation: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``F.linear`` and the epilogue as separate operations (in place on the fresh output where
    autograd is off). ``reference_activation`` replaces the activation where the product is the
    reference's to the bit (everywhere but the few-row float32 kernel)."""
    exact = True  # the product is F.linear's, bit for bit
    if not _fast_path(x):
        y = F.linear(x, *_weights(group))
    else:  # without autograd, one GEMM per layer beats concatenating their weights on every call
        on_kernel = _few_rows_f32(x, [(layer.weight, layer.bias) for layer in group])
        if on_kernel is not None:
            y, exact = on_kernel, False
        elif len(group) == 1:  # refused as a group of one: refused alone too
            y = _exact_linear(x, group[0].weight, group[0].bias)
        else:  # layer by layer: the few-row kernel may still take some of them (and then rounds its own way)
            parts = [_few_rows_f32(x, ((layer.weight, layer.bias),)) for layer in group]
            exact = all(part is None for part in parts)
            y = torch.cat(
                [
                    part if part is not None else _exact_linear(x, layer.weight, layer.bias)
                    for part, layer in zip(parts, group, strict=True)
                ],
                dim=-1,
            )
    if activation is not None and exact and reference_activation is not None:
        y = reference_activation(y)
        return y if residual is None else y + residual
    if torch.is_grad_enabled():
        if activation is not None:
            y = ACTIVATIONS[activation](y)
        return y if residual is None else y + residual
    if activation is not None:
        y = _IN_PLACE[activation](y)
    return y if residual is None else y.add_(residual)


def _runs_as_module(layer: nn.Module) -> bool:
    """Whether a layer must be called as a module: forward hooks on it, or a forward of its own (a subclass
    of nn.Linear that computes something else); the fast path computes what nn.Linear.forward does."""
    return has_forward_hooks(layer) or type(layer).forward is not nn.Linear.forward


def _as_modules(
    x: Tensor,
    group: Sequence[nn.Linear],
    activation: str | None,
    residual: Tensor | None,
    reference_activation: Callable[[Tensor], Tensor] | None,
) -> Tensor:
    """The layers called as modules (their forward hooks and own forwards run, as in the reference), then the activation
    (the reference's, where given) and the residual as separate operations."""
    y = group[0](x) if len(group) == 1 else torch.cat([layer(x) for layer in group], dim=-1)
    if activation is not None:
        y = (reference_activation or ACTIVATIONS[activation])(y)
    return y if residual is None else y + residual


def linear(
    x: Tensor,
    layers: nn.Linear | Sequence[nn.Linear],
    *,
    activation: str | None = None,
    residual: Tensor | None = None,
    reference_activation: Callable[[Tensor], Tensor] | None = None,
    norm: nn.LayerNorm | None = None,
) -> Tensor:
    """``activation(norm(x) @ W^T + b) + residual`` with W, b the layers' weights and biases concatenated
    along the output dimension.

    Args:
        x: (..., in_features).
        layers: one linear layer, or several with the same input (their outputs side by side).
        activation: one of :data:`ACTIVATIONS`, or None.
        residual: (..., out_features) added last, or None.
        reference_activation: the activation as the reference model computes it, where that differs from
            the named one by rounding (BLOOM's tanh-GELU: another constant, nine float32 operations). It
            runs wherever the product is the reference's to the bit (``F.linear``, MKL), so that those
            results stay the reference's; the named activation runs where the product already differs by
            rounding (the AMX, oneDNN and few-row float32 kernels), fused or in place.
        norm: a LayerNorm applied to x first, or None. Where a kernel takes the layer as a chain (one
            layer; see :func:`mlp`), it normalizes in the same call; elsewhere ``norm(x)`` runs first, as a
            module.

    Raises:
        ValueError: an unknown activation.

    Example:
        >>> qkv = linear(x, (attn.query, attn.key, attn.value))   # (..., 3 * hidden)
        >>> h = linear(x, mlp.up, activation="gelu")
    """
    group: Sequence[nn.Linear] = (layers,) if isinstance(layers, nn.Linear) else tuple(layers)
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation '{activation}' is not fusable; choose one of {', '.join(ACTIVATIONS)} or None")
    if any(_runs_as_module(layer) for layer in group):
        return _as_modules(x if norm is None else norm(x), group, activation, residual, reference_activation)
    if norm is not None:
        if len(group) == 1:
            chained = _kernel_chain(x, norm=norm, first=group[0], activation=activation, residual=residual)
            if chained is not None:
                return chained[0]
        x = norm(x)
    y = _amx_linear(x, group, activation, residual)
    if y is not None:
        return y
    kernel = _kernel_for(x)
    if kernel is None:
        return _plain(x, group, activation, residual, reference_activation)
    leading = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    entry = _packed_weights(group, kernel, x2.shape[0])
    if entry is None:  # no memory for a packed copy: the AMX kernel at any row count, else the plain path
        y = _amx_linear(x, group, activation, residual, any_rows=True)
        return y if y is not None else _plain(x, group, activation, residual, reference_activation)
    packed, weight, bias, out_features, _ = entry
    if kernel == "onednn-bf16":
        other = None
        if residual is not None and activation is None:  # fused into the GEMM's epilogue
            other = residual.reshape(-1, out_features).contiguous()

        def gemm(rows: slice) -> Tensor:
            if other is not None:
                return torch.ops.mkldnn._linear_pointwise.binary(x2[rows], other[rows], packed, bias, "add")
            attr, scalars, algorithm = _ONEDNN_UNARY[activation]
            return torch.ops.mkldnn._linear_pointwise(x2[rows], packed, bias, attr, scalars, algorithm)

        shape = (x2.shape[0], out_features, x2.shape[1], activation, other is not None, torch.get_num_threads())
        y = _blocked(gemm, x2.shape[0], shape)
        if other is not None:
            return y.view(*leading, out_features)
    else:
        y = torch.ops.mkl._mkl_linear(x2, packed, weight, bias, x2.shape[0])
        if activation is not None:
            y = _IN_PLACE[activation](y) if reference_activation is None else reference_activation(y)
    y = y.view(*leading, out_features)
    return y if residual is None else y.add_(residual)


def mlp(
    x: Tensor,
    up: nn.Linear,
    down: nn.Linear,
    *,
    activation: str,
    residual: Tensor | None = None,
    norm: nn.LayerNorm | None = None,
    reference_activation: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """A transformer's feed-forward block, ``down(activation(up(norm(x)))) + residual``.

    Where a kernel takes it as a chain (:func:`registry.chains.run_chain`: bfloat16 on the CPU below
    AMX_MAX_ROWS rows, a decode step or a short prompt, on the AMX kernel; float32 at avx512.MIN_ROWS to
    MAX_ROWS rows, a batch's decode step, on the AVX-512 kernel) the LayerNorm, both layers and their
    epilogues run in one kernel call: the weights stream
    one after the other with nothing between them but a barrier. Returning to the interpreter between
    them costs more than the work there: each weight stream evicts the code and data the next
    operations need (tens of microseconds for a LayerNorm that takes 7 warm). The numbers are those of
    ``linear(linear(norm(x), up, activation=...), down, residual=...)`` on that kernel, but for the
    LayerNorm and (float32) the activation: computed as PyTorch computes them, in another order or
    with a vectorised function, a value may round the other way (a few in 10^4).

    Elsewhere it is that composition: ``norm`` as a module, then :func:`linear` twice (so
    ``reference_activation`` applies as there).

    Args:
        x: (..., in_features).
        up, down: the block's two linear layers (``down.in_features == up.out_features``).
        activation: one of :data:`ACTIVATIONS`, applied to ``up``'s output.
        residual: (..., down.out_features) added last, or None.
        norm: a LayerNorm over ``in_features`` applied to x first, or None.
        reference_activation: see :func:`linear`.

    Raises:
        ValueError: an unknown activation.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation '{activation}' is not fusable; choose one of {', '.join(ACTIVATIONS)}")
    chained = _kernel_chain(x, norm=norm, first=up, activation=activation, second=down, residual=residual)
    if chained is not None:
        return chained[0]
    h = linear(x, up, activation=activation, reference_activation=reference_activation, norm=norm)
    return linear(h, down, residual=residual)


def attention_output_and_mlp(
    attention: Tensor,
    residual: Tensor,
    *,
    dense: nn.Linear,
    norm: nn.LayerNorm,
    up: nn.Linear,
    down: nn.Linear,
    activation: str,
    reference_activation: Callable[[Tensor], Tensor] | None = None,
    then: tuple[nn.LayerNorm, nn.Linear] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The rest of a pre-LayerNorm transformer block after its attention's core: with
    ``s = dense(attention) + residual``, ``y = down(activation(up(norm(s)))) + s``; returns
    ``(y, then[1](then[0](y)))`` (the next block's LayerNorm and first projection), or ``(y, None)``
    without ``then``.

    Where a kernel takes it (see :func:`mlp`), one kernel call for all of it: the weight streams of a
    block's decode step follow each other with nothing between them.
    Elsewhere, :func:`linear` and :func:`mlp`, with the same numbers as there.

    Args:
        attention: (..., dense.in_features), the attention's output with its heads merged.
        residual: (..., dense.out_features), the block's input.
        dense: the attention's output projection.
        norm: the block's second LayerNorm, over ``dense.out_features``.
        up, down, activation, reference_activation: as in :func:`mlp`.
        then: the next block's first LayerNorm and projection (its query-key-value projection), or None.
            On the kernel they run in the same call (the next block's weights stream right after this
            one's); elsewhere as :func:`linear` with ``norm`` would run them. The numbers are the same.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation '{activation}' is not fusable; choose one of {', '.join(ACTIVATIONS)}")
    chained = _kernel_chain(
        attention, project=(dense, residual), norm=norm, first=up, activation=activation, second=down, then=then
    )
    if chained is not None:
        return chained
    s = linear(attention, dense, residual=residual)
    y = mlp(s, up, down, activation=activation, residual=s, norm=norm, reference_activation=reference_activation)
    return y, None if then is None else linear(y, then[1], norm=then[0])


class PreNormBlock(NamedTuple):
    """The modules of a pre-LayerNorm decoder block that a :class:`DecodePlan` runs (see :func:`decode_plan`)."""

    norm: nn.LayerNorm  # the input LayerNorm
    qkv: nn.Linear  # the query-key-value projection (3C x C)
    dense: nn.Linear  # the attention's output projection
    post_norm: nn.LayerNorm  # the post-attention LayerNorm
    up: nn.Linear
    down: nn.Linear


class DecodePlan:
    """A step of pre-LayerNorm blocks (a decode step, or a prompt's tokens), attention included, in one kernel call
    (:func:`registry.chains.run_decode_step`), with the blocks' operands checked once (:func:`decode_plan`)
    and kept while they stay what was checked: :meth:`current` says whether they do (the same objects
    in the family's structure, so no replaced submodule; no forward hooks and no training mode on any
    module of the blocks, nor global module hooks; the same parameters at the same addresses). It holds
    only weak references: a plan keeps nothing of the model alive, and one whose model changed is
    simply not current."""

    def __init__(
        self,
        structure: Sequence[Sequence[object]],
        watched: Sequence[nn.Module],
        operands: list[chains.DecodeBlock],
        *,
        width: int,
        heads: int,
        layout: tuple[int, int, int, int],
        activation: str,
        scale: float,
    ):
        self.structure = [weakref.ref(part) for parts in structure for part in parts]
        self.watched = [weakref.ref(module) for module in watched]
        self.tensors = [
            (weakref.ref(module), name, weakref.ref(tensor), tensor.data_ptr())
            for module in watched
            for name, tensor in module._parameters.items()
            if tensor is not None
        ]
        self.blocks = len(structure)
        self.layers = chains.decode_layers(operands)
        self.dtype = operands[0].qkv[0].dtype
        self.width, self.hidden, self.heads = width, operands[0].up[0].shape[0], heads
        self.head_dim = width // heads
        self.layout, self.activation, self.scale = layout, activation, scale

    def current(self, structure: Sequence[Sequence[object]]) -> bool:
        """Whether the plan still holds for the blocks whose structure (as given to :func:`decode_plan`)
        is this."""
        parts = [part for block in structure for part in block]
        if len(parts) != len(self.structure):
            return False
        if any(ref() is not part for ref, part in zip(self.structure, parts, strict=True)):
            return False
        modules = torch.nn.modules.module
        if getattr(modules, "_global_forward_hooks", None) or getattr(modules, "_global_forward_pre_hooks", None):
            return False
        for ref in self.watched:
            module = ref()
            if module is None or module.training or module._forward_hooks or module._forward_pre_hooks:
                return False
        for module_ref, name, tensor_ref, address in self.tensors:
            module, tensor = module_ref(), tensor_ref()
            if module is None or tensor is None or module._parameters.get(name) is not tensor:
                return False
            if tensor.data_ptr() != address:
                return False
        return True

    def run(
        self,
        x: Tensor,
        slots: Sequence[tuple[Tensor, Tensor]],
        *,
        position: int,
        tokens: int = 1,
        slopes: Tensor | None = None,
        key_positions: Tensor | None = None,
        key_padding: Tensor | None = None,
    ) -> Tensor | None:
        """The step on x (rows, C), the new tokens' hidden states after the embeddings, ``tokens`` of each
        sequence (rows b * tokens + t): the last block's output, or None where the kernel does not take it
        (nothing is written then). ``slots``: each block's cache buffers (``KVCache.reserve``),
        ``position`` the slot of each sequence's first new token; ``slopes``/``key_positions``: an ALiBi
        bias; ``key_padding`` (sequences, >= position + tokens) bool: False where a key is padding. The
        kernel takes rows of the blocks' dtype (bfloat16: fewer than AMX_MAX_ROWS; float32: at most
        avx512.MAX_ROWS), autograd off, cache buffers of that dtype and the blocks' head size with room
        for the new tokens."""
        if x.dim() != 2 or x.shape[1] != self.width or x.dtype is not self.dtype or len(slots) != self.blocks:
            return None
        rows = x.shape[0]
        limit = AMX_MAX_ROWS - 1 if self.dtype is torch.bfloat16 else avx512.MAX_ROWS
        if not _enabled or not x.is_cpu or torch.is_grad_enabled() or not 1 <= rows <= limit:
            return None
        if tokens < 1 or rows % tokens:
            return None
        sequences, n = rows // tokens, position + tokens
        first = slots[0][0]
        if first.dtype is not self.dtype:
            return None
        for keys, values in slots:
            if not (_cache_buffer(keys, sequences, self.heads, self.head_dim, n, first)
                    and _cache_buffer(values, sequences, self.heads, self.head_dim, n, first)):  # fmt: skip
                return None
        if slopes is not None:
            if key_positions is None or slopes.shape != (self.heads,) or key_positions.dim() != 2:
                return None
            if key_positions.shape[0] != sequences or key_positions.shape[1] < n:
                return None
            slopes = slopes.to(torch.float32).contiguous()
            key_positions = key_positions[:, :n].to(torch.float32).contiguous()
        valid = None
        if key_padding is not None:
            if key_padding.dim() != 2 or key_padding.shape[0] != sequences or key_padding.shape[1] < n:
                return None
            valid = key_padding[:, :n].to(torch.uint8).contiguous()
        return chains.run_decode_step(
            x.contiguous(), self.layers, list(slots), hidden=self.hidden, heads=self.heads, layout=self.layout,
            activation=self.activation, position=position, scale=self.scale, tokens=tokens, slopes=slopes,
            key_positions=key_positions if slopes is not None else None, valid=valid,
        )  # fmt: skip


def decode_plan(
    blocks: Sequence[PreNormBlock],
    *,
    structure: Sequence[Sequence[object]],
    owners: Sequence[nn.Module],
    heads: int,
    layout: tuple[int, int, int, int],
    activation: str,
    scale: float,
) -> DecodePlan | None:
    """A :class:`DecodePlan` for these blocks, or None where no kernel can run them: plain ``nn.Linear`` and
    ``nn.LayerNorm`` modules (not subclasses: no forward of their own, no parametrization) whose CPU
    parameters the kernel reads as they lie (see :func:`_kernel_operand`, :func:`_kernel_norm`), all
    bfloat16 (the AMX kernel) or all float32 (the AVX-512 kernel), widths multiples of 32, a head size of
    16 to 256 in multiples of 16, no forward hooks and no training mode in the blocks, the dtype's kernel
    ready.

    ``owners``: the modules the blocks belong to, one per block; every module in them is watched for hooks
    and training mode, and their parameters for replacement. ``structure``: per block, the objects the
    family's step is made of (its submodules, its attention backend), which must stay the same objects
    (:meth:`DecodePlan.current`). ``layout`` = (head stride, query, key, value offsets) in a row of the
    query-key-value projection."""
    if not blocks or len(owners) != len(blocks) or len(structure) != len(blocks) or activation not in ACTIVATIONS:
        return None
    for block in blocks:
        if any(type(m) is not nn.Linear for m in (block.qkv, block.dense, block.up, block.down)):
            return None
        if type(block.norm) is not nn.LayerNorm or type(block.post_norm) is not nn.LayerNorm:
            return None
    dtype = blocks[0].qkv.weight.dtype
    kernel = {torch.bfloat16: "amx-bf16", torch.float32: "avx512-fp32"}.get(dtype)
    if kernel is None or kernel not in _kernels():
        return None
    width = blocks[0].qkv.in_features
    head_dim = width // heads if heads > 0 else 0
    if width % 32 or head_dim * heads != width or head_dim % 16 or head_dim > 256:
        return None
    stride, *offsets = layout
    if min(stride, *offsets) < 0 or (heads - 1) * stride + max(offsets) + head_dim > 3 * width:
        return None
    watched = [module for owner in owners for module in owner.modules()]
    if any(m.training or has_forward_hooks(m) for m in watched):
        return None
    operands: list[chains.DecodeBlock] = []
    hidden = blocks[0].up.out_features
    if hidden % 32:
        return None
    for block in blocks:
        norm, post = _kernel_norm(block.norm, width, dtype), _kernel_norm(block.post_norm, width, dtype)
        qkv, dense, up = (_kernel_operand(layer, width, dtype) for layer in (block.qkv, block.dense, block.up))
        down = _kernel_operand(block.down, hidden, dtype)
        if norm is None or post is None or qkv is None or dense is None or up is None or down is None:
            return None
        if (qkv[0].shape[0], dense[0].shape[0], up[0].shape[0], down[0].shape[0]) != (3 * width, width, hidden, width):
            return None
        if any(weight.stride(0) != weight.shape[1] for weight, _ in (qkv, dense, up, down)):
            return None
        operands.append(chains.DecodeBlock(norm, qkv, dense, post, up, down))
    return DecodePlan(
        structure, watched, operands, width=width, heads=heads, layout=layout, activation=activation, scale=scale
    )


def _cache_buffer(t: Tensor, rows: int, heads: int, head_dim: int, slots: int, first: Tensor) -> bool:
    """Whether the kernel writes and reads ``t`` as a layer's cache buffer: on the CPU, (rows, heads,
    capacity >= slots, head_dim) with contiguous head vectors, the dtype and strides of the first
    layer's (the plan checks that dtype against the model's)."""
    return (
        t.dtype is first.dtype
        and t.is_cpu
        and t.dim() == 4
        and t.shape[0] == rows
        and t.shape[1] == heads
        and t.shape[2] >= slots
        and t.shape[3] == head_dim
        and t.stride(3) == 1
        and t.stride() == first.stride()
    )
