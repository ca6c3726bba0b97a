"""The AVX-512 float32 kernel for a few rows (registry.avx512): its status, its numbers against a float64
truth for every shape class it treats apart (rows in groups of 8, weight rows in blocks of 3, in_features
past whole vectors), strided operands, refused operands, and registry.fused routing a decode step's
float32 layers to it (and nothing else)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from registry import avx512, fused

from ..conftest import cpu_flags

CAPABLE = "avx512f" in cpu_flags() and shutil.which(os.environ.get("CC") or "cc")
needs_kernel = pytest.mark.skipif(not avx512.ready(), reason=f"kernel not usable here: {avx512.status().reason}")


def test_the_kernel_is_ready_wherever_the_cpu_and_a_compiler_allow_it():
    status = avx512.status()
    assert isinstance(status.reason, str) and status.reason
    if CAPABLE:  # a build or check failure on a capable machine is a bug, not a skip
        assert status.ready, status.reason
        assert fused.kernels()["avx512-fp32"] == "ready"
    else:
        assert not status.ready and fused.kernels()["avx512-fp32"] == status.reason


def test_turned_off_by_the_environment_says_so():
    code = "from registry import avx512; s = avx512.status(); print(s.ready, s.reason)"
    env = {**os.environ, "REGISTRY_AVX512": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False turned off by REGISTRY_AVX512=0"


def _assert_float32_sums(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """Each output within float32 rounding of its float64 sum: at most a few ulps of the sum of the
    terms' magnitudes (the bound a float32 dot product of this length meets in any order)."""
    truth = F.linear(x.double(), w.double(), None if b is None else b.double())
    magnitude = x.double().abs() @ w.double().abs().t() + (0 if b is None else b.double().abs())
    error = (got.double() - truth).abs()
    assert bool((error <= 2**-24 * (x.shape[1] ** 0.5 + 4) * magnitude).all()), float((error / magnitude).max())


SHAPES = [  # (rows, out_features, in_features): what each exercises
    (2, 3, 16),  # one block of 3 weight rows, one vector of k
    (3, 7, 33),  # a last block of 1 weight row; k past whole vectors (a masked tail)
    (8, 8, 64),  # a full group of 8 rows; a last block of 2 weight rows
    (9, 31, 100),  # a second group of 1 row (from cache, without prefetch)
    (16, 64, 4096),  # two full groups; long rows (the prefetch runs past each row's end)
    (5, 1, 5),  # one output, k shorter than a vector
    (1, 10, 48),  # one row (not what fused sends, still exact)
]


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in SHAPES])
def test_matches_a_float64_truth_to_float32_rounding(shape):
    rows, out_features, in_features = shape
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, in_features, generator=g)
    w = torch.randn(out_features, in_features, generator=g)
    b = torch.randn(out_features, generator=g)
    for bias in (b, None):
        got = avx512.linear(x, w, bias)
        assert got.dtype == torch.float32 and got.shape == (rows, out_features)
        _assert_float32_sums(got, x, w, bias)


@needs_kernel
def test_the_result_does_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(8, 200, generator=g), torch.randn(301, 200, generator=g), torch.randn(301, generator=g)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(avx512.linear(x, w, b))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@needs_kernel
def test_writes_a_column_slice_and_reads_strided_rows_without_touching_the_rest():
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(5, 96, generator=g)
    x = wide[:, 16:80]  # rows 96 apart, 64 contiguous values each
    weights = torch.randn(40, 70, generator=g)
    w = weights[:, 3:67]  # weight rows 70 apart
    out = torch.full((5, 100), 7.0)
    avx512.linear(x, w, out=out[:, 30:70])
    assert torch.equal(out[:, :30], torch.full((5, 30), 7.0))
    assert torch.equal(out[:, 70:], torch.full((5, 30), 7.0))
    _assert_float32_sums(out[:, 30:70], x, w, None)


@needs_kernel
def test_no_rows_give_an_empty_result():
    assert avx512.linear(torch.empty(0, 64), torch.randn(16, 64)).shape == (0, 16)


@needs_kernel
def test_bad_operands_are_refused_with_the_rule():
    x, w = torch.randn(2, 64), torch.randn(16, 64)
    bad = {
        "bias": dict(bias=torch.randn(16).bfloat16()),
        "bias ": dict(bias=torch.randn(8)),  # too short: the kernel would read past it
        "out": dict(out=torch.empty(1, 16)),  # too few rows
        "out ": dict(out=torch.empty(16, 2).t()),  # rows not contiguous
    }
    for name, kwargs in bad.items():
        with pytest.raises(ValueError, match=f"takes {name.strip()} as a float32 CPU tensor"):
            avx512.linear(x, w, **kwargs)
    for x_bad, w_bad in (
        (x.bfloat16(), w.bfloat16()),
        (x, torch.randn(16, 96)),  # widths differ
        (x, torch.randn(64, 16).t()),  # weight rows not contiguous
        (torch.randn(2, 3, 64), w),  # not 2-d
        (torch.randn(2, 0), torch.randn(16, 0)),  # nothing to sum
    ):
        with pytest.raises(ValueError, match="contiguous rows and in_features equal"):
            avx512.linear(x_bad, w_bad)


def _calls(monkeypatch) -> list[int]:
    """Rows of every kernel call from here on."""
    rows: list[int] = []
    real = avx512._call

    def spy(library, x, weight, bias, out):
        rows.append(x.shape[0])
        return real(library, x, weight, bias, out)

    monkeypatch.setattr(avx512, "_call", spy)
    return rows


@needs_kernel
def test_fused_linear_sends_a_few_float32_rows_and_only_those(monkeypatch):
    calls = _calls(monkeypatch)
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    with torch.no_grad():
        for rows in (1, 2, 8, 16, 17, 300):
            x = torch.randn(rows, 64)
            got = fused.linear(x, layer, activation="gelu", residual=torch.ones(rows, 48))
            truth = F.gelu(F.linear(x.double(), layer.weight.double(), layer.bias.double())) + 1
            assert float((got.double() - truth).abs().max()) < 1e-5
        assert calls == [2, 8, 16]  # one row: MKL's GEMV; 17 and more: MKL's GEMM
        with fused.disabled():  # the plain path: F.linear, bit for bit
            x = torch.randn(8, 64)
            assert torch.equal(fused.linear(x, layer), F.linear(x, layer.weight, layer.bias))
        assert calls == [2, 8, 16]
    x = torch.randn(8, 64)  # autograd on: never the kernel
    fused.linear(x, layer).sum().backward()
    assert calls == [2, 8, 16] and layer.weight.grad is not None


@needs_kernel
def test_a_layer_group_writes_its_columns_of_one_output(monkeypatch):
    calls = _calls(monkeypatch)
    torch.manual_seed(0)
    group = [nn.Linear(64, n) for n in (32, 32, 16)]
    group[1].bias = None
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        got = fused.linear(x, group)
    assert got.shape == (2, 3, 80) and calls == [6, 6, 6]
    start = 0
    for layer in group:
        end = start + layer.out_features
        _assert_float32_sums(got.reshape(6, 80)[:, start:end], x.reshape(6, 64), layer.weight, layer.bias)
        start = end


@needs_kernel
def test_a_tied_head_projects_a_few_rows_on_the_kernel(monkeypatch):
    calls = _calls(monkeypatch)
    head = torch.randn(1000, 32)
    x = torch.randn(4, 1, 32)
    with torch.no_grad():
        got = fused.project(x, head)
    assert got.shape == (4, 1, 1000) and calls == [4]
    _assert_float32_sums(got.reshape(4, 1000), x.reshape(4, 32), head, None)


def _bloom_gelu(y: torch.Tensor) -> torch.Tensor:
    """BLOOM's tanh-GELU as its reference computes it: nine float32 operations, another constant."""
    return y * 0.5 * (1.0 + torch.tanh(0.79788456 * y * (1 + 0.044715 * y * y)))


@needs_kernel
def test_the_reference_activation_runs_wherever_the_product_is_the_reference_s(monkeypatch):
    calls = _calls(monkeypatch)
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    reference_rows: list[int] = []

    def reference(y: torch.Tensor) -> torch.Tensor:
        reference_rows.append(y.shape[0])
        return _bloom_gelu(y)

    with torch.no_grad():
        for rows in (1, 2, 16, 17, 300):  # GEMV, the kernel's two ends, F.linear, MKL's packed GEMM
            x = torch.randn(rows, 64)
            got = fused.linear(x, layer, activation="gelu_tanh", reference_activation=reference)
            exact = _bloom_gelu(F.linear(x, layer.weight, layer.bias))
            if rows in (2, 16):  # the kernel rounds the product its own way: the named activation, in place
                torch.testing.assert_close(got, exact, atol=1e-5, rtol=1e-5)
            else:  # the reference's product and the reference's activation: its numbers, bit for bit
                assert torch.equal(got, exact), rows
    assert calls == [2, 16] and reference_rows == [1, 17, 300]
    x = torch.randn(8, 64)  # autograd on: F.linear and the reference's activation, differentiable
    got = fused.linear(x, layer, activation="gelu_tanh", reference_activation=reference)
    assert torch.equal(got, _bloom_gelu(F.linear(x, layer.weight, layer.bias)))
    got.sum().backward()
    assert reference_rows == [1, 17, 300, 8] and layer.weight.grad is not None


@needs_kernel
def test_a_group_partly_on_the_kernel_takes_the_named_activation(monkeypatch):
    calls = _calls(monkeypatch)
    torch.manual_seed(0)
    group = [nn.Linear(64, 32), nn.Linear(64, 16)]
    group[1].weight = nn.Parameter(torch.randn(64, 16).t())  # rows not contiguous: the kernel refuses it
    reference_rows: list[int] = []

    def reference(y: torch.Tensor) -> torch.Tensor:
        reference_rows.append(y.shape[0])
        return _bloom_gelu(y)

    x = torch.randn(4, 64)
    with torch.no_grad():
        got = fused.linear(x, group, activation="gelu_tanh", reference_activation=reference)
    product = torch.cat([F.linear(x, layer.weight, layer.bias) for layer in group], dim=-1)
    torch.testing.assert_close(got, _bloom_gelu(product), atol=1e-5, rtol=1e-5)
    assert calls == [4] and reference_rows == []  # the first layer ran on the kernel: not the reference's bits


# -- argmax of each row (greedy decoding) ------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("rows", "columns"),
    [(1, 7), (1, 250880), (2, 9001), (3, 16), (8, 250880), (17, 4100), (70, 33)],  # one part, parts per row,
)  # tails short of a vector, more rows than threads, more rows than one round of parts
def test_argmax_is_torch_s_on_random_rows(rows, columns, dtype):
    g = torch.Generator().manual_seed(rows * columns)
    scores = (torch.randn(rows, columns, generator=g) * 4).to(dtype)  # bfloat16 ties often
    assert torch.equal(avx512.argmax(scores), scores.argmax(dim=-1))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_argmax_takes_the_first_maximum_or_the_first_nan_across_lanes_and_parts(dtype, threads):
    columns = 20000  # split into parts by threads for the single-row calls
    scores = torch.randn(6, columns, generator=torch.Generator().manual_seed(0))
    scores[0, [17, 1, 19999]] = 100.0  # a tie in three lanes and two parts: the first
    scores[1, [12001, 12000]] = 100.0  # a tie in one vector
    scores[2, [15000, 9000]] = float("nan")  # NaN answers first, whatever the values
    scores[2, 5] = float("inf")
    scores[3] = float("-inf")  # nothing above -inf: the first index
    scores[4] = 0.0
    scores[4, 3] = -0.0  # zeros of both signs tie
    scores[5, 19999] = float("inf")
    x = scores.to(dtype)
    expected = x.argmax(dim=-1)
    assert expected.tolist() == [1, 12000, 9000, 0, 0, 19999]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.equal(avx512.argmax(x), expected)
        for row in range(6):  # one row alone: split into parts
            assert avx512.argmax(x[row : row + 1]).item() == expected[row].item(), row
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_argmax_reads_strided_rows():
    wide = torch.randn(4, 300, generator=torch.Generator().manual_seed(1))
    scores = wide[:, 50:250]  # rows 300 apart
    assert torch.equal(avx512.argmax(scores), scores.argmax(dim=-1))


@needs_kernel
@pytest.mark.parametrize(
    "scores",
    [torch.randn(3), torch.randn(2, 3, 4), torch.randn(3, 5).double(), torch.randn(5, 3).t(), torch.empty(2, 0)],
    ids=["1-d", "3-d", "float64", "columns strided", "no columns"],
)
def test_argmax_refuses_what_it_does_not_take(scores):
    assert not avx512.supports_argmax(scores)
    with pytest.raises(ValueError, match="2-d float32 or bfloat16"):
        avx512.argmax(scores)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_of_no_rows_is_empty(dtype):
    got = avx512.argmax(torch.empty(0, 50, dtype=dtype))
    assert got.dtype == torch.int64 and got.shape == (0,)
