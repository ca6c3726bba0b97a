"""The machine's limits, measured in the same run, and BLOOM's lower-bound cost of a forward.

Used by ``generation_bench.py``: every timing there is also reported as a fraction of the time the
machine needs at least, ``max(bytes / read bandwidth, FLOPs / matmul rate)``.

Machine (measured, nothing assumed):

- read bandwidth: median over repeats of ``t.sum()`` of a 1 GiB float32 tensor, bytes / s;
- copy bandwidth: median of ``dst.copy_(src)``, 1 GiB each, (read + written bytes) / s; reported only;
- GEMV bandwidth: weight bytes / s of ``x @ W^T`` with x 1 x hidden and W vocab x hidden (the lm_head of a
  decode step) in each dtype through ``F.linear``, and in bfloat16 through this library's AMX kernel
  (``registry.amx``) where it is ready;
- memory bandwidth, the roofline's: the fastest of the read and GEMV bandwidths (a weight-streaming kernel
  can read faster than ``t.sum()``; the bound is what the machine was seen to do);
- matmul rate per dtype: best of several ``a @ b`` over a 2048 x 2048 x 2048 GEMM and over the prefill's
  largest GEMM (128 x hidden by 4 * hidden x hidden); the roofline takes the faster of the two.

BLOOM, per layer (h = hidden size, L layers, V vocabulary, e bytes per element, B batch):

- parameters: 12 h^2 linear weights (query_key_value 3h^2, dense h^2, MLP 8h^2), 9h biases, 4h LayerNorm;
  plus the embedding V h (tied: it is also the lm_head) and 4h for the embedding and final LayerNorms;
- decode step at key length S (the cached tokens plus the new one):
  bytes = parameters * e + 2 L B S h e (every key and value read once);
  FLOPs = 2 B L 12 h^2 + 4 B L S h (QK^T and PV) + 2 B V h (lm_head);
- prefill of T tokens (logits for the last one only):
  bytes = parameters * e + 2 L B T h e (the keys and values written);
  FLOPs = 2 B T L 12 h^2 + 2 B L h T (T + 1) (QK^T and PV over the causal triangle) + 2 B V h;
- generation of N tokens from a P-token prompt: prefill(P), then decode steps at S = P + 1 .. P + N - 1,
  each bounded on its own: sum of max(bytes / bandwidth, FLOPs / rate) over the steps.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

GIB = 2**30
SQUARE = 2048
AMX_GEMV = "bfloat16, registry.amx"  # the gemv_bandwidth key of the AMX kernel's figure


@dataclass(frozen=True)
class Machine:
    """Measured limits: bandwidths in bytes / s, matmul rates in FLOP / s (per dtype, per GEMM shape)."""

    read_bandwidth: float
    copy_bandwidth: float
    gemv_bandwidth: dict[str, float]
    matmul_rates: dict[str, dict[str, float]]

    def matmul_rate(self, dtype: str) -> float:
        return max(self.matmul_rates[dtype].values())

    @property
    def memory_bandwidth(self) -> float:
        """The roofline's bandwidth: the fastest read seen (a plain sum, or a GEMV streaming its weight)."""
        return max(self.read_bandwidth, *self.gemv_bandwidth.values())

    def best(self, other: Machine) -> Machine:
        """The better of two measurements, figure by figure: a limit is the best the machine did."""
        return Machine(
            read_bandwidth=max(self.read_bandwidth, other.read_bandwidth),
            copy_bandwidth=max(self.copy_bandwidth, other.copy_bandwidth),
            gemv_bandwidth={k: max(v, other.gemv_bandwidth.get(k, v)) for k, v in self.gemv_bandwidth.items()},
            matmul_rates={
                dtype: {gemm: max(rate, other.matmul_rates[dtype][gemm]) for gemm, rate in rates.items()}
                for dtype, rates in self.matmul_rates.items()
            },
        )


@dataclass(frozen=True)
class Cost:
    """Bytes that must move and FLOPs that must run, at least."""

    bytes: float
    flops: float


@dataclass(frozen=True)
class Limit:
    """Lower-bound seconds: the larger of the memory and compute terms (summed step by step)."""

    seconds: float
    memory_seconds: float
    compute_seconds: float

    def __add__(self, other: Limit) -> Limit:
        return Limit(
            self.seconds + other.seconds,
            self.memory_seconds + other.memory_seconds,
            self.compute_seconds + other.compute_seconds,
        )

    def scaled(self, factor: float) -> Limit:
        return Limit(self.seconds * factor, self.memory_seconds * factor, self.compute_seconds * factor)

    @property
    def bound(self) -> str:
        return "memory" if self.memory_seconds >= self.compute_seconds else "compute"


@dataclass(frozen=True)
class BloomShape:
    layers: int
    hidden: int
    vocab: int

    @property
    def linear_weights_per_layer(self) -> int:
        return 12 * self.hidden**2

    @property
    def parameters(self) -> int:
        """Distinct parameters: what a forward reads at least once (the tied embedding once)."""
        h = self.hidden
        return self.layers * (12 * h * h + 9 * h + 4 * h) + self.vocab * h + 4 * h


def element_size(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def prefill_cost(shape: BloomShape, *, batch: int, tokens: int, dtype: str) -> Cost:
    e, h, L = element_size(dtype), shape.hidden, shape.layers
    moved = shape.parameters * e + 2 * L * batch * tokens * h * e
    flops = (
        2 * batch * tokens * L * shape.linear_weights_per_layer
        + 2 * batch * L * h * tokens * (tokens + 1)
        + 2 * batch * shape.vocab * h
    )
    return Cost(moved, flops)


def decode_cost(shape: BloomShape, *, batch: int, key_length: int, dtype: str) -> Cost:
    e, h, L = element_size(dtype), shape.hidden, shape.layers
    moved = shape.parameters * e + 2 * L * batch * key_length * h * e
    flops = (
        2 * batch * L * shape.linear_weights_per_layer + 4 * batch * L * key_length * h + 2 * batch * shape.vocab * h
    )
    return Cost(moved, flops)


def limit(cost: Cost, machine: Machine, dtype: str) -> Limit:
    memory = cost.bytes / machine.memory_bandwidth
    compute = cost.flops / machine.matmul_rate(dtype)
    return Limit(max(memory, compute), memory, compute)


def decode_steps_limit(shape: BloomShape, machine: Machine, *, dtype: str, batch: int, prompt: int, new: int) -> Limit:
    """The N - 1 decode steps of a generation (the first new token comes from the prefill)."""
    total = Limit(0.0, 0.0, 0.0)
    for key_length in range(prompt + 1, prompt + new):
        total = total + limit(decode_cost(shape, batch=batch, key_length=key_length, dtype=dtype), machine, dtype)
    return total


def generation_limit(shape: BloomShape, machine: Machine, *, dtype: str, batch: int, prompt: int, new: int) -> Limit:
    first = limit(prefill_cost(shape, batch=batch, tokens=prompt, dtype=dtype), machine, dtype)
    return first + decode_steps_limit(shape, machine, dtype=dtype, batch=batch, prompt=prompt, new=new)


# -- measuring the machine ------------------------------------------------------------------------


def _times(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up: page faults, kernel selection
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def read_bandwidth(repeats: int = 10) -> float:
    data = torch.ones(GIB // 4)
    return GIB / statistics.median(_times(data.sum, repeats))


def copy_bandwidth(repeats: int = 10) -> float:
    src = torch.ones(GIB // 4)
    dst = torch.empty_like(src)
    return 2 * GIB / statistics.median(_times(lambda: dst.copy_(src), repeats))


def gemv_bandwidth(dtype: str, *, rows: int, hidden: int, repeats: int = 10) -> float:
    weight = torch.randn(rows, hidden).to(getattr(torch, dtype))
    x = torch.randn(1, hidden).to(weight.dtype)
    seconds = statistics.median(_times(lambda: torch.nn.functional.linear(x, weight), repeats))
    return weight.numel() * weight.element_size() / seconds


def amx_gemv_bandwidth(*, rows: int, hidden: int, repeats: int = 10) -> float | None:
    """Like :func:`gemv_bandwidth` in bfloat16, through ``registry.amx`` (None where it is not ready)."""
    from registry import amx

    if not amx.ready():
        return None
    weight = torch.randn(rows, hidden).bfloat16()
    x = torch.randn(1, hidden).bfloat16()
    seconds = statistics.median(_times(lambda: amx.linear(x, weight), repeats))
    return weight.numel() * weight.element_size() / seconds


def matmul_rate(dtype: str, m: int, k: int, n: int, repeats: int) -> float:
    """Best FLOP / s of (m x k) @ (k x n), the weight given as nn.Linear holds it (n x k)."""
    a = torch.randn(m, k).to(getattr(torch, dtype))
    weight = torch.randn(n, k).to(a.dtype)
    return 2 * m * k * n / min(_times(lambda: torch.nn.functional.linear(a, weight), repeats))


def measure(dtypes: list[str], *, hidden: int, vocab: int, prefill_rows: int) -> Machine:
    """Measure bandwidths and matmul rates now, with the current torch thread count."""
    rates = {
        dtype: {
            f"{SQUARE}x{SQUARE}x{SQUARE}": matmul_rate(dtype, SQUARE, SQUARE, SQUARE, repeats=5),
            f"{prefill_rows}x{hidden}x{4 * hidden}": matmul_rate(dtype, prefill_rows, hidden, 4 * hidden, repeats=20),
        }
        for dtype in dtypes
    }
    gemv = {dtype: gemv_bandwidth(dtype, rows=vocab, hidden=hidden) for dtype in dtypes}
    if "bfloat16" in dtypes:
        amx_rate = amx_gemv_bandwidth(rows=vocab, hidden=hidden)
        if amx_rate is not None:
            gemv[AMX_GEMV] = amx_rate
    return Machine(
        read_bandwidth=read_bandwidth(),
        copy_bandwidth=copy_bandwidth(),
        gemv_bandwidth=gemv,
        matmul_rates=rates,
    )
