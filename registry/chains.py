"""Chains: the steps of a transformer block between two attentions' cores in one kernel call, on the AMX
kernel in bfloat16 (``registry_chain_bf16``, amx_linear.c) or on the AVX-512 kernel in float32
(``registry_chain_f32``, linear_f32.c, for a decode step's few rows). :func:`run_chain` says what a
chain computes; :mod:`registry.fused` decides where one runs."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

# the kernels' activation codes (enum in vector_math.h)
ACTIVATION_CODES = {None: 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "silu": 4, "tanh": 5}

Layer = tuple[Tensor, "Tensor | None"]  # (weight, bias)
Norm = tuple[Tensor, Tensor, float]  # a LayerNorm's (weight, bias, eps)
Project = tuple[Tensor, "Tensor | None", "Tensor | None"]  # (weight, bias, residual)
Then = tuple[Norm, Layer, Tensor]  # the next block's LayerNorm and projection, and its output

_pointer, _integer, _value = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
ARGTYPES: list[Any] = [
    _pointer, _integer, _integer,  # X, M, ldx
    _pointer, _integer, _integer, _integer, _pointer, _pointer,  # W0, N0, K0, ldw0, b0, R0
    _pointer, _pointer, _value,  # gamma, beta, eps
    _pointer, _integer, _integer, _integer, _pointer, ctypes.c_int, _pointer,  # W1, N1, K1, ldw1, b1, act1, R1
    _pointer, _integer, _integer, _pointer, _pointer,  # W2, N2, ldw2, b2, R2
    _pointer,  # Y
    _pointer, _pointer, _value, _pointer, _integer, _integer, _pointer, _pointer,  # gamma3 .. b3, Y3
    ctypes.c_int,  # threads
]  # fmt: skip


def run_chain(
    x: Tensor,
    *,
    project: Project | None = None,
    norm: Norm | None = None,
    first: Layer,
    activation: str | None = None,
    second: Layer | None = None,
    residual: Tensor | None = None,
    then: Then | None = None,
) -> Tensor:
    """The steps of a transformer block between two attentions' cores, in one kernel call: nothing runs
    between them, so the interpreter is not returned to (a weight stream evicts its code and data, and
    each return costs tens of microseconds on the operations that follow).

    With ``s = project[0] x + project[1] + project[2]`` (the attention's output projection, its bias and
    the block's residual; without ``project``, ``s = x``) it computes
    ``second(activation(first(LayerNorm(s))))`` plus a residual: ``residual``, or ``s`` when ``project``
    is given (a pre-LayerNorm block's second residual; ``residual`` is ignored then). ``norm`` and
    ``second`` are optional; without ``second`` the residual is added to ``first``'s output. Only the
    result is a new tensor: the steps before it write the calling thread's scratch memory in the kernel.

    ``then`` = (norm, (weight, bias), out) also computes the next block's first projection of the result,
    ``LayerNorm(result) @ weight^T + bias``, into ``out`` (rows, weight's out_features), in the same call.

    bfloat16 runs on the AMX kernel (products as :func:`registry.amx.linear` computes them); float32 on
    the AVX-512 kernel (as :func:`registry.avx512.linear`; activations vectorised, relative error about
    2e-7). The LayerNorm computes as PyTorch does, in float32 per row, summed in another order: a value
    may round the other way.

    Without checks (callers make them: :mod:`registry.fused`): x is (..., in_features), contiguous (its
    rows are the product of its leading dimensions); the result, residuals and ``then``'s out have x's
    leading dimensions and are contiguous; every tensor has x's dtype and is on the CPU; weights have
    contiguous rows (bfloat16: in_features a multiple of amx.K_MULTIPLE); biases and the LayerNorms'
    parameters are contiguous and of the right length, LayerNorm widths multiples of 16. The dtype's
    kernel must be ready."""
    from registry import amx, avx512  # they import this module for its calling convention

    if x.dtype == torch.bfloat16:
        function, kernel = amx._library.registry_chain_bf16, "amx"  # type: ignore[union-attr]
    else:
        function, kernel = avx512._library.registry_chain_f32, "avx512"  # type: ignore[union-attr]
    out_features = (first if second is None else second)[0].shape[0]
    y = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype)
    scope: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if torch.autograd.profiler._is_profiler_enabled:  # a profile names the kernel (it is not an ATen op)
        layers = (project, first, second, then[1] if then is not None else None)
        steps = " ".join(f"{k}->{n}" for n, k in (layer[0].shape for layer in layers if layer is not None))
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        layernorm = " layernorm" if norm is not None else ""
        scope = torch.profiler.record_function(f"registry.{kernel}.chain {rows} rows {steps}{layernorm}")
    with scope:
        call(function, f"the {kernel} kernel", x, project, norm, first, activation, second, residual, y, then)
    return y


def arguments(
    x: Tensor,
    project: Project | None,
    norm: Norm | None,
    first: Layer,
    activation_code: int,
    second: Layer | None,
    residual: Tensor | None,
    y: Tensor,
    then: Then | None,
    threads: int,
) -> tuple[Any, ...]:
    """The C function's arguments, in ARGTYPES' order."""
    w0, b0, r0 = project if project is not None else (None, None, None)
    (gamma3, beta3, eps3), (w3, b3), y3 = then if then is not None else ((None, None, 0.0), (None, None), None)
    w1, b1 = first
    w2, b2 = second if second is not None else (None, None)
    r1, r2 = (residual, None) if second is None else (None, residual)
    in_features = x.shape[-1]
    return (
        x.data_ptr(), x.numel() // in_features if in_features else 0, in_features,
        None if w0 is None else w0.data_ptr(), 0 if w0 is None else w0.shape[0], 0 if w0 is None else w0.shape[1],
        0 if w0 is None else w0.stride(0), None if b0 is None else b0.data_ptr(),
        None if r0 is None else r0.data_ptr(),
        None if norm is None else norm[0].data_ptr(), None if norm is None else norm[1].data_ptr(),
        0.0 if norm is None else norm[2],
        w1.data_ptr(), w1.shape[0], w1.shape[1], w1.stride(0),
        None if b1 is None else b1.data_ptr(), activation_code, None if r1 is None else r1.data_ptr(),
        None if w2 is None else w2.data_ptr(), 0 if w2 is None else w2.shape[0], 0 if w2 is None else w2.stride(0),
        None if b2 is None else b2.data_ptr(), None if r2 is None else r2.data_ptr(),
        y.data_ptr(),
        None if gamma3 is None else gamma3.data_ptr(), None if beta3 is None else beta3.data_ptr(), eps3,
        None if w3 is None else w3.data_ptr(), 0 if w3 is None else w3.shape[0], 0 if w3 is None else w3.stride(0),
        None if b3 is None else b3.data_ptr(), None if y3 is None else y3.data_ptr(),
        threads,
    )  # fmt: skip


def call(
    function: Callable[..., int],
    kernel: str,
    x: Tensor,
    project: Project | None,
    norm: Norm | None,
    first: Layer,
    activation: str | None,
    second: Layer | None,
    residual: Tensor | None,
    y: Tensor,
    then: Then | None = None,
) -> None:
    """Call a kernel's chain ``function`` on these operands, torch's thread count; MemoryError if its
    scratch memory could not be allocated (``kernel`` names it)."""
    code = ACTIVATION_CODES[activation]
    if function(*arguments(x, project, norm, first, code, second, residual, y, then, torch.get_num_threads())):
        raise MemoryError(f"{kernel} could not allocate its scratch memory")


# -- a whole decode step ----------------------------------------------------------------------------


_DECODE_POINTERS = ("norm_w", "norm_b", "qkv_w", "qkv_b", "dense_w", "dense_b", "post_w", "post_b", "up_w", "up_b",
                    "down_w", "down_b", "keys", "values")  # fmt: skip


class DecodeLayer(ctypes.Structure):
    """One block of :func:`run_decode_step`, as the C struct ``decode_layer`` (amx_linear.c) lays it out."""

    _fields_ = [(name, ctypes.c_void_p) for name in _DECODE_POINTERS] + [
        ("norm_eps", ctypes.c_float),
        ("post_eps", ctypes.c_float),
    ]


DECODE_ARGTYPES: list[Any] = [
    ctypes.POINTER(DecodeLayer), _integer, _pointer,  # layers, L, X
    _integer, _integer, _integer, _integer, _integer, _integer,  # M, tokens, C, F, H, D
    ctypes.c_int, _integer, _integer, _integer, _integer,  # act, head_stride, q/k/v offsets
    _integer, _integer, _integer, _integer,  # sb, sh, sp, position
    _pointer, _pointer, _integer, _pointer, _integer,  # slopes, key_pos, ld_pos, valid, ld_valid
    _value, _pointer, _pointer, _pointer, _integer,  # scale, qkv, att, scores, ld_scores
    ctypes.c_int,  # threads
]  # fmt: skip


class DecodeBlock(NamedTuple):
    """A pre-LayerNorm block's operands for :func:`decode_layers`."""

    norm: Norm  # the input LayerNorm
    qkv: Layer  # the query-key-value projection, 3C x C
    dense: Layer  # the attention's output projection, C x C
    post_norm: Norm  # the post-attention LayerNorm
    up: Layer  # F x C
    down: Layer  # C x F


def decode_layers(blocks: list[DecodeBlock]) -> Any:
    """The blocks' operands as :func:`run_decode_step`'s kernel reads them: a ctypes array of DecodeLayer
    (their cache buffers are set by each step, in a copy). The tensors must outlive it."""
    layers = (DecodeLayer * len(blocks))()
    for slot, block in zip(layers, blocks, strict=True):
        pointers = (block.norm[0], block.norm[1], *block.qkv, *block.dense, block.post_norm[0], block.post_norm[1],
                    *block.up, *block.down)  # fmt: skip
        for name, tensor in zip(_DECODE_POINTERS, pointers, strict=False):
            setattr(slot, name, None if tensor is None else tensor.data_ptr())
        slot.norm_eps, slot.post_eps = block.norm[2], block.post_norm[2]
    return layers


def run_decode_step(
    x: Tensor,
    layers: Any,
    caches: list[tuple[Tensor, Tensor]],
    *,
    hidden: int,
    heads: int,
    layout: tuple[int, int, int, int],
    activation: str,
    position: int,
    scale: float,
    tokens: int = 1,
    slopes: Tensor | None = None,
    key_positions: Tensor | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """A step of pre-LayerNorm blocks (``layers``, from :func:`decode_layers`; ``hidden``: their MLP's width)
    in one kernel call (bfloat16 on the AMX kernel, float32 on the AVX-512 kernel, whose products and
    chains are as :func:`run_chain` computes them). x holds ``tokens`` new tokens of each sequence (rows
    b * tokens + t): one for a decode step, more for a prompt. For each block: its input LayerNorm and
    query-key-value projection; the new keys and values written into the block's cache buffers
    (``caches``, (keys, values) per block) at slots ``position`` .. ``position + tokens - 1``; each new
    token's attention over the slots up to its own (scores and softmax in float32, the bias and mask
    added as a bfloat16 value per key, as SDPA does with an additive mask in the model's dtype; in a
    bfloat16 prompt the softmax numerators are rounded to bfloat16 before they weigh the values, as
    SDPA's CPU flash attention does); the output projection and residual; the post-attention LayerNorm;
    the MLP and its residual. Returns the last block's output; nothing returns to the interpreter between
    the blocks.

    ``layout`` = (head stride, query, key, value offsets): where head h's query, key and value lie in a
    row of the projection. ``slopes`` (heads,) float32 with ``key_positions`` (sequences, >= position +
    tokens) float32: the ALiBi bias ``slopes[h] * key_positions[b, j]`` (rounded to bfloat16 for it).
    ``valid`` (sequences, >= position + tokens) uint8: 1 where a key may be attended to (none: all).

    Without checks (:class:`registry.fused.DecodePlan` makes them): x is (rows, C) bfloat16 or float32,
    contiguous, rows a multiple of ``tokens``; weights of its dtype and contiguous, C, F and 3C multiples
    of 32, the head size a multiple of 16 up to 256; every cache buffer of its dtype with the same
    strides, the head size contiguous, room for the new tokens. The dtype's kernel must be ready."""
    from registry import amx, avx512  # they import this module for its calling convention

    rows, width = x.shape
    if x.dtype == torch.bfloat16:
        function, kernel = amx._library.registry_decode_bf16, "amx"  # type: ignore[union-attr]
    else:
        function, kernel = avx512._library.registry_decode_f32, "avx512"  # type: ignore[union-attr]
    step = type(layers)()  # the caller's array stays as it is: steps may run in several threads
    ctypes.memmove(step, layers, ctypes.sizeof(layers))
    for slot, (keys, values) in zip(step, caches, strict=True):
        slot.keys, slot.values = keys.data_ptr(), values.data_ptr()
    threads = torch.get_num_threads()
    y = x.clone()
    qkv = torch.empty(rows, 3 * width, dtype=x.dtype)
    att = torch.empty(rows, width, dtype=x.dtype)
    ld_scores = attention_work_floats(position, tokens, caches[0][0].shape[3], x.dtype)
    scores = torch.empty(threads, ld_scores, dtype=torch.float32)
    keys = caches[0][0]
    sb, sh, sp, _ = keys.stride()
    scope: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if torch.autograd.profiler._is_profiler_enabled:
        label = f"registry.{kernel}.step {rows // tokens}x{tokens} tokens {len(caches)} blocks"
        scope = torch.profiler.record_function(label)
    with scope:
        failed = function(
            step, len(caches), y.data_ptr(), rows // tokens, tokens, width, hidden, heads, keys.shape[3],
            ACTIVATION_CODES[activation], *layout, sb, sh, sp, position,
            None if slopes is None else slopes.data_ptr(),
            None if key_positions is None else key_positions.data_ptr(),
            0 if key_positions is None else key_positions.stride(0),
            None if valid is None else valid.data_ptr(), 0 if valid is None else valid.stride(0),
            scale, qkv.data_ptr(), att.data_ptr(), scores.data_ptr(), ld_scores, threads,
        )  # fmt: skip
    if failed == -1:
        raise MemoryError(f"the {kernel} kernel could not allocate its scratch memory")
    if failed:
        raise RuntimeError(f"the {kernel} kernel refused its work space ({ld_scores} floats a thread): a bug here")
    return y


def attention_work_floats(position: int, tokens: int, head_dim: int, dtype: torch.dtype) -> int:
    """Floats of work space a thread of :func:`run_decode_step` needs for its attention, a multiple of 16:
    the scores of one token (slots up to ``position + tokens - 1``, and 16 more), or for a bfloat16
    prompt what one (sequence, head) pair needs, as the AMX kernel's ``registry_prompt_work_floats``
    (csrc/prompt_attention.h's layout) says: one definition of that layout, in C."""
    if tokens > 1 and dtype == torch.bfloat16:
        from registry import amx

        need = amx._library.registry_prompt_work_floats(position + tokens, head_dim)  # type: ignore[union-attr]
    else:
        need = position + tokens + 16
    return (need + 15) // 16 * 16
