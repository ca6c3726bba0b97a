"""The AMX bfloat16 linear kernel (registry.amx): its build and status, its numbers against a float64
truth for every shape class the kernel treats apart (one row, row tiles, row chunks, k chunks, outputs that
do not fill a tile), and registry.fused routing bfloat16 layers to it without a packed copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from registry import amx, avx512, chains, fused

from ..conftest import cpu_flags

CAPABLE = {"amx_bf16", "amx_tile", "avx512_bf16"} <= cpu_flags() and shutil.which(os.environ.get("CC") or "cc")
needs_kernel = pytest.mark.skipif(not amx.ready(), reason=f"AMX kernel not usable here: {amx.status().reason}")


def test_the_kernel_is_ready_wherever_the_cpu_and_a_compiler_allow_it():
    status = amx.status()
    assert isinstance(status.reason, str) and status.reason
    if CAPABLE:  # a build or check failure on a capable machine is a bug, not a skip
        assert status.ready, status.reason
        assert status.library and Path(status.library).exists()
        assert fused.kernels()["amx-bf16"] == "ready"
    else:
        assert not status.ready and fused.kernels()["amx-bf16"] == status.reason


def _status_in_a_fresh_process(env: dict[str, str]) -> str:
    code = "from registry import amx; s = amx.status(); print(s.ready, s.reason)"
    done = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_turned_off_by_the_environment_says_so():
    assert _status_in_a_fresh_process({"REGISTRY_AMX": "0"}) == "False turned off by REGISTRY_AMX=0"


def test_a_missing_compiler_is_reported_not_hidden():
    out = _status_in_a_fresh_process({"CC": "no-such-compiler-xyz"})
    assert out.startswith("False no C compiler 'no-such-compiler-xyz'")


@pytest.mark.skipif(not CAPABLE, reason="builds only where the CPU has AMX and there is a compiler")
def test_builds_into_the_cache_directory_it_is_given(tmp_path):
    out = _status_in_a_fresh_process({"REGISTRY_CACHE_DIR": str(tmp_path)})
    assert out == "True ready"
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]


@pytest.mark.skipif(not CAPABLE, reason="builds only where the CPU has AMX and there is a compiler")
def test_an_unusable_home_falls_back_to_the_temporary_directory(tmp_path):
    home = tmp_path / "home"
    home.write_text("a file where the home folder should be")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    out = _status_in_a_fresh_process({"HOME": str(home), "TMPDIR": str(temporary), "REGISTRY_CACHE_DIR": ""})
    assert out == "True ready"
    assert [p.suffix for p in next(temporary.iterdir()).iterdir()] == [".so"]


def test_an_unusable_cache_directory_that_was_asked_for_is_reported(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")
    out = _status_in_a_fresh_process({"REGISTRY_CACHE_DIR": str(blocked / "kernels"), "CC": "cc"})
    if CAPABLE:
        assert out.startswith("False the kernel did not build or load: no writable folder")
        assert "set REGISTRY_CACHE_DIR" in out
    else:
        assert out.startswith("False")


def _truth(x, w, b, r, activation):
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    if activation == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    elif activation is not None:
        y = fused.ACTIVATIONS[activation](y)
    return y if r is None else y + r.double()


SHAPES = [  # (rows, out_features, in_features): what each exercises
    (1, 48, 64),  # a decode step: one row (dot products, not tiles), whole groups of 16 outputs
    (1, 53, 4160),  # one row: an output tail, rows long enough for the far prefetch
    (3, 37, 96),  # outputs past the last full tile of 16 (AVX-512 tail)
    (8, 250, 32),  # one k tile; a lone 16-output block after the 32-wide ones
    (40, 64, 128),  # row tiles in blocks of 32 and a last block of 16
    (130, 80, 64),  # two row chunks of the kernel's 128 rows
    (64, 32, 4096),  # k chunks of 256
    (100, 80, 2080),  # a last k chunk of one step, a lone 16-output block, a last block of 16 rows
    (200, 96, 320),  # k not a multiple of the chunk, rows across chunks
    (150, 53, 64),  # an output tail with rows across chunks
]


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in SHAPES])
@pytest.mark.parametrize("activation", list(amx.ACTIVATIONS))
def test_matches_a_float64_truth_to_bfloat16_rounding(shape, activation):
    rows, out_features, in_features = shape
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    w = (torch.randn(out_features, in_features, generator=g) / in_features**0.5).bfloat16()
    b = torch.randn(out_features, generator=g).bfloat16()
    r = torch.randn(rows, out_features, generator=g).bfloat16()
    for bias, residual in ((b, r), (None, None), (b, None)):
        truth = _truth(x, w, bias, residual, activation)
        got = amx.linear(x, w, bias, residual=residual, activation=activation)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
        # one rounding to bfloat16 (8 bits) after float32 accumulation
        error = (got.double() - truth).abs()
        assert bool((error <= 2**-7 * truth.abs() + 1e-3).all()), float(error.max())
        # and no worse than PyTorch's own bfloat16 linear followed by the same steps
        plain = _truth(x, w, bias, None, None).bfloat16()
        plain = fused.ACTIVATIONS[activation](plain) if activation else plain
        plain = plain if residual is None else plain + residual
        assert float(error.max()) <= 2 * float((plain.double() - truth).abs().max()) + 1e-3


@needs_kernel
@pytest.mark.parametrize("rows", [5, 1])  # tiles; one row's dot products
def test_writes_a_column_slice_and_reads_strided_rows_without_touching_the_rest(rows):
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(rows, 96, generator=g).bfloat16()
    x = wide[:, 16:80]  # rows 96 apart, 64 contiguous values each
    w = torch.randn(40, 128, generator=g).bfloat16()[:, 32:96]  # weight rows 128 apart
    out = torch.full((rows, 100), 7.0, dtype=torch.bfloat16)
    residual_rows = torch.zeros(rows, 50, dtype=torch.bfloat16)
    amx.linear(x, w, out=out[:, 30:70], residual=residual_rows[:, 5:45])  # residual rows 50 apart
    assert torch.equal(out[:, :30], torch.full((rows, 30), 7.0, dtype=torch.bfloat16))
    assert torch.equal(out[:, 70:], torch.full((rows, 30), 7.0, dtype=torch.bfloat16))
    truth = F.linear(x.double(), w.double())
    assert float((out[:, 30:70].double() - truth).abs().max()) <= 2**-7 * float(truth.abs().max())


@needs_kernel
def test_no_rows_give_an_empty_result():
    got = amx.linear(torch.empty(0, 64, dtype=torch.bfloat16), torch.randn(16, 64).bfloat16())
    assert got.shape == (0, 16)


@needs_kernel
def test_bad_operands_are_refused_with_the_rule():
    x, w = torch.randn(2, 64).bfloat16(), torch.randn(16, 64).bfloat16()
    bad = {
        "bias": dict(bias=torch.randn(16)),  # float32
        "bias ": dict(bias=torch.randn(8).bfloat16()),  # too short: the kernel would read past it
        "residual": dict(residual=torch.randn(1, 16).bfloat16()),  # one row for two
        "out": dict(out=torch.empty(1, 16, dtype=torch.bfloat16)),  # too few rows
        "out ": dict(out=torch.empty(2, 16)),  # float32
        "out  ": dict(out=torch.empty(16, 2, dtype=torch.bfloat16).t()),  # rows not contiguous
    }
    for name, kwargs in bad.items():
        with pytest.raises(ValueError, match=f"takes {name.strip()} as a bfloat16 CPU tensor"):
            amx.linear(x, w, **kwargs)
    for x_bad, w_bad in (
        (torch.randn(2, 48).bfloat16(), torch.randn(16, 48).bfloat16()),  # k tile is 32
        (x.float(), w.float()),
        (x, torch.randn(16, 96).bfloat16()),  # widths differ
        (torch.randn(2, 3, 64).bfloat16(), w),  # not 2-d
    ):
        with pytest.raises(ValueError, match="multiple of 32"):
            amx.linear(x_bad, w_bad)
    with pytest.raises(ValueError, match="gelu_new"):
        amx.linear(x, w, activation="gelu_new")
    assert not amx.supports(torch.randn(2, 0).bfloat16(), torch.randn(16, 0).bfloat16())


def test_linear_builds_the_kernel_itself_when_called_first():
    code = (
        "import torch; from registry import amx; "
        "print(amx.linear(torch.ones(1, 32).bfloat16(), torch.ones(16, 32).bfloat16())[0, 0].item() "
        "if amx.ready() else 'not ready')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("32.0" if CAPABLE else "not ready")


@needs_kernel
def test_nan_stays_nan_through_every_activation():
    x = torch.zeros(2, 32).bfloat16()
    x[0, 0] = float("nan")
    w = torch.ones(16, 32).bfloat16()
    for activation in amx.ACTIVATIONS:
        got = amx.linear(x, w, activation=activation)
        assert bool(got[0].isnan().all()), activation
        assert not bool(got[1].isnan().any()), activation


@needs_kernel
@pytest.mark.parametrize("activation", list(amx.ACTIVATIONS))
def test_large_pre_activations_are_exact_too(activation):
    """Far out, the activations' exp and reciprocal reach float32's denormal range (where the kernel
    flushes to zero instead of paying a microcode assist per value): still the truth to bfloat16 rounding."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(40, 64, generator=g) * 300).bfloat16()  # pre-activations of magnitude up to ~3000
    w = (torch.randn(48, 64, generator=g) / 8).bfloat16()
    b = torch.randn(48, generator=g).bfloat16()
    truth = _truth(x, w, b, None, activation)
    got = amx.linear(x, w, b, activation=activation).double()
    assert bool(got.isfinite().all()), activation
    # one bfloat16 rounding; the absolute term covers the left tails (erf's 1.5e-7 cancels in 1 + erf)
    assert bool(((got - truth).abs() <= 2**-7 * truth.abs() + 1e-5).all()), activation


@needs_kernel
def test_the_caller_s_floating_point_mode_is_restored():
    tiny = torch.tensor([3e-39])  # a float32 denormal: kept by PyTorch's default mode
    assert float(tiny * 1.0) != 0.0
    amx.linear(torch.randn(4, 64).bfloat16(), torch.randn(32, 64).bfloat16(), activation="silu")
    assert float(tiny * 1.0) != 0.0  # the kernel's flush-to-zero did not stay on this thread
    many = torch.full((1 << 22,), 3e-39)  # large enough for PyTorch to split it over its OpenMP threads,
    assert bool(((many * 1.0) != 0).all())  # the kernel's workers: their mode was restored too


@needs_kernel
def test_tanh_keeps_its_relative_precision_near_zero():
    x = torch.tensor([[1e-30, 1e-6, 3e-6, -2e-5, 0.01, -0.05, 0.07, 0.5]]).bfloat16()
    eye = torch.eye(8).bfloat16()
    w = torch.zeros(8, 32).bfloat16()
    w[:, :8] = eye
    xin = torch.zeros(1, 32).bfloat16()
    xin[0, :8] = x
    got = amx.linear(xin, w, activation="tanh").double()[0]
    truth = torch.tanh(x.double())[0]
    assert float(((got - truth).abs() / truth.abs()).max()) <= 2**-8  # one bfloat16 rounding


@needs_kernel
def test_threads_calling_at_once_get_their_own_results():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 544, generator=g).bfloat16()
    inputs = [torch.randn(rows, 544, generator=g).bfloat16() for rows in (1, 7, 40, 130)] * 3
    _same_in_threads(lambda x: amx.linear(x, w), inputs)


def _same_in_threads(compute, inputs: list[torch.Tensor]) -> None:
    """``compute`` of each input in its own thread, five times over, all threads at once: each result
    equals the one computed alone."""
    with torch.no_grad():
        expected = [compute(x) for x in inputs]
    results: dict[int, torch.Tensor] = {}

    def work(i: int) -> None:
        with torch.no_grad():
            for _ in range(5):
                results[i] = compute(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(results[i], expected[i]) for i in range(len(inputs)))


@needs_kernel
def test_threads_that_end_give_their_scratch_memory_back():
    w = torch.randn(16, 16384).bfloat16()
    x = torch.randn(128, 16384).bfloat16()  # 4 MiB of packed rows per calling thread

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def one_thread() -> None:
        t = threading.Thread(target=lambda: amx.linear(x, w))
        t.start()
        t.join()

    for _ in range(3):
        one_thread()
    before = rss()
    for _ in range(30):
        one_thread()
    assert rss() - before < 40 * 2**20  # 30 threads would have kept 120 MiB


@needs_kernel
def test_a_shared_or_foreign_build_folder_is_not_used(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    out = _status_in_a_fresh_process({"REGISTRY_CACHE_DIR": str(shared)})
    assert out.startswith("False the kernel did not build or load: no writable folder")
    assert "writable by other users" in out
    assert not any(shared.iterdir())


@needs_kernel
def test_fused_linear_runs_bfloat16_on_the_kernel_without_a_packed_copy():
    torch.manual_seed(0)
    group = [nn.Linear(64, n).bfloat16() for n in (32, 32, 16)]
    x = torch.randn(2, 3, 64).bfloat16()
    residual = torch.randn(2, 3, 80).bfloat16()
    with torch.no_grad():
        got = fused.linear(x, group, activation="gelu_tanh", residual=residual)
        expected = torch.cat(
            [amx.linear(x.reshape(6, 64), layer.weight, layer.bias, activation="gelu_tanh") for layer in group], dim=1
        ).reshape(2, 3, 80)
    assert torch.equal(got, expected + residual) or float((got - (expected + residual)).abs().max()) <= 2**-6
    assert group[0] not in fused._packed  # nothing packed: the kernel reads the layers' own weights


@needs_kernel
def test_many_rows_go_to_onednn_with_the_same_numbers(monkeypatch):
    monkeypatch.setattr(fused, "AMX_MAX_ROWS", 4)
    torch.manual_seed(0)
    layer = nn.Linear(64, 48).bfloat16()
    x = torch.randn(6, 64).bfloat16()
    with torch.no_grad():
        many = fused.linear(x, layer)
        few = torch.cat([fused.linear(x[i : i + 1], layer) for i in range(6)])
    assert float((many.float() - few.float()).abs().max()) <= 2**-6 * float(few.float().abs().max())
    if "onednn-bf16" in fused._kernels():
        assert layer in fused._packed


@needs_kernel
def test_a_broadcast_residual_is_added_to_every_row():
    torch.manual_seed(0)
    layer = nn.Linear(64, 48).bfloat16()
    x = torch.randn(5, 64).bfloat16()
    residual = torch.randn(48).bfloat16()  # one row for all: not the kernel's (rows, out) residual
    with torch.no_grad():
        got = fused.linear(x, layer, residual=residual)
        truth = F.linear(x.double(), layer.weight.double(), layer.bias.double()) + residual.double()
    assert got.shape == (5, 48)
    assert float((got.double() - truth).abs().max()) <= 2**-6 * float(truth.abs().max())


# -- chains: the steps of a block between two attentions' cores in one kernel call -----------------

# (rows, hidden, intermediate): one row; a few rows on tiles; two row chunks; widths with an output tail
# where the kernel allows one (out_features of the last layer)
CHAIN_SHAPES = [(1, 64, 128), (5, 96, 64), (130, 64, 96), (3, 128, 256)]


def _chain_operands(rows: int, hidden: int, inner: int, seed: int):
    g = torch.Generator().manual_seed(seed)

    def bf16(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).bfloat16()

    return dict(
        x=bf16(rows, hidden),
        r0=bf16(rows, hidden),
        dense=(bf16(hidden, hidden, scale=hidden**-0.5), bf16(hidden)),
        norm=(bf16(hidden, scale=0.5) + 1, bf16(hidden, scale=0.1), 1e-5),
        up=(bf16(inner, hidden, scale=hidden**-0.5), bf16(inner)),
        down=(bf16(hidden, inner, scale=inner**-0.5), bf16(hidden)),
    )


def _block_chain(o, **extra) -> torch.Tensor:
    """A whole block's chain on the operands of :func:`_chain_operands`."""
    project = (*o["dense"], o["r0"])
    return chains.run_chain(
        o["x"], project=project, norm=o["norm"], first=o["up"], activation="gelu_tanh", second=o["down"], **extra
    )


def _layer_norm(s: torch.Tensor, norm) -> torch.Tensor:
    return F.layer_norm(s, (s.shape[-1],), norm[0], norm[1], norm[2])


@needs_kernel
@pytest.mark.parametrize("shape", CHAIN_SHAPES, ids=[f"{m}x{h}x{i}" for m, h, i in CHAIN_SHAPES])
def test_a_chain_without_a_layernorm_is_its_layers_on_the_kernel_bit_for_bit(shape):
    o = _chain_operands(*shape, seed=sum(shape))
    s = amx.linear(o["x"], *o["dense"], residual=o["r0"])
    h = amx.linear(s, *o["up"], activation="gelu_tanh")
    expected = amx.linear(h, *o["down"], residual=s)
    got = chains.run_chain(
        o["x"], project=(*o["dense"], o["r0"]), first=o["up"], activation="gelu_tanh", second=o["down"]
    )
    assert torch.equal(got, expected)
    # one layer with a residual of the caller's, and two layers with one
    one = chains.run_chain(o["x"], first=o["dense"], residual=o["r0"])
    assert torch.equal(one, s)
    two = chains.run_chain(s, first=o["up"], activation="gelu_tanh", second=o["down"], residual=o["x"])
    assert torch.equal(two, amx.linear(h, *o["down"], residual=o["x"]))


@needs_kernel
@pytest.mark.parametrize("shape", CHAIN_SHAPES, ids=[f"{m}x{h}x{i}" for m, h, i in CHAIN_SHAPES])
def test_a_chain_with_a_layernorm_is_the_composition_up_to_the_layernorm_s_rounding(shape):
    o = _chain_operands(*shape, seed=7 * sum(shape))
    s = amx.linear(o["x"], *o["dense"], residual=o["r0"])
    h = amx.linear(_layer_norm(s, o["norm"]), *o["up"], activation="gelu_tanh")
    expected = amx.linear(h, *o["down"], residual=s)
    got = _block_chain(o)
    # the LayerNorm sums in another order than PyTorch's: a value may round the other way, and move the
    # sums after it by as much
    assert float((got.float() - expected.float()).abs().max()) <= 2**-6 * float(expected.float().abs().max())
    # LayerNorm then one layer (a query-key-value projection)
    qkv = chains.run_chain(s, norm=o["norm"], first=o["up"])
    truth = amx.linear(_layer_norm(s, o["norm"]), *o["up"])
    assert float((qkv.float() - truth.float()).abs().max()) <= 2**-6 * float(truth.float().abs().max())


@needs_kernel
@pytest.mark.parametrize("offset", [0.0, 30.0])  # a mean far from zero: the variance must not cancel
@pytest.mark.parametrize("rows", [1, 8, 64])
def test_the_chain_s_layernorm_rounds_like_pytorch_s_but_for_rare_values(rows, offset):
    g = torch.Generator().manual_seed(rows)
    hidden = 1024
    x = (torch.randn(rows, hidden, generator=g) * 3 + offset).bfloat16()
    norm = ((torch.randn(hidden, generator=g) * 0.5 + 1).bfloat16(), torch.randn(hidden, generator=g).bfloat16(), 1e-5)
    identity = (torch.eye(hidden).bfloat16(), None)  # the product of a bfloat16 value and 1 is exact
    got = chains.run_chain(x, norm=norm, first=identity)
    expected = _layer_norm(x, norm)
    differ = got != expected
    assert float(differ.float().mean()) <= 1e-3  # measured: at most a few values in 10^4
    # where they differ, by one step of bfloat16 rounding, or near zero by what float32 keeps of the
    # cancellation x * rstd - mean * rstd (mean * rstd is about 10 here: 2^-20 of it, times gamma)
    step = 2.0 ** (torch.floor(torch.log2(expected.float().abs().clamp_min(1e-30))) - 7)
    assert bool(((got.float() - expected.float()).abs() <= step + 2**-12)[differ].all())


@needs_kernel
def test_a_constant_row_normalizes_to_the_layernorm_s_bias():
    hidden = 64
    x = torch.full((2, hidden), 3.5, dtype=torch.bfloat16)
    beta = torch.linspace(-1, 1, hidden).bfloat16()
    got = chains.run_chain(
        x, norm=(torch.ones(hidden).bfloat16(), beta, 1e-5), first=(torch.eye(hidden).bfloat16(), None)
    )
    assert torch.equal(got, beta.expand(2, hidden))
    assert torch.equal(got, _layer_norm(x, (torch.ones(hidden).bfloat16(), beta, 1e-5)))


@needs_kernel
def test_a_chain_leaves_its_inputs_as_they_were():
    o = _chain_operands(3, 64, 128, seed=3)
    before = {name: [t.clone() for t in (v if isinstance(v, tuple) else (v,)) if isinstance(t, torch.Tensor)]
              for name, v in o.items()}  # fmt: skip
    chains.run_chain(
        o["x"], project=(*o["dense"], o["r0"]), norm=o["norm"], first=o["up"], activation="gelu", second=o["down"]
    )
    for name, tensors in before.items():
        now = [t for t in (o[name] if isinstance(o[name], tuple) else (o[name],)) if isinstance(t, torch.Tensor)]
        assert all(torch.equal(a, b) for a, b in zip(tensors, now, strict=True)), name


def _block_modules(hidden: int = 64, inner: int = 128, dtype=torch.bfloat16):
    torch.manual_seed(0)
    dense, up, down = nn.Linear(hidden, hidden), nn.Linear(hidden, inner), nn.Linear(inner, hidden)
    norm = nn.LayerNorm(hidden)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2)
        norm.bias.normal_(0, 0.2)
    return [m.to(dtype) for m in (dense, norm, up, down)]


def _composition(attention, residual, dense, norm, up, down):
    with fused.disabled():
        s = fused.linear(attention, dense, residual=residual)
        return fused.linear(fused.linear(norm(s), up, activation="gelu_tanh"), down, residual=s)


@needs_kernel
def test_attention_output_and_mlp_runs_as_one_kernel_call(monkeypatch):
    dense, norm, up, down = _block_modules()
    attention, residual = torch.randn(2, 3, 64).bfloat16(), torch.randn(2, 3, 64).bfloat16()
    calls = []
    real = chains.run_chain
    monkeypatch.setattr(chains, "run_chain", lambda *a, **k: calls.append(k) or real(*a, **k))
    with torch.no_grad():
        got, nothing = fused.attention_output_and_mlp(
            attention, residual, dense=dense, norm=norm, up=up, down=down, activation="gelu_tanh"
        )
        expected = _composition(attention, residual, dense, norm, up, down)
    assert nothing is None
    assert len(calls) == 1 and calls[0]["project"] is not None and calls[0]["norm"] is not None
    assert got.shape == (2, 3, 64)
    assert float((got.float() - expected.float()).abs().max()) <= 2**-6 * float(expected.float().abs().max())


def test_attention_output_and_mlp_elsewhere_is_the_composition_exactly():
    dense, norm, up, down = _block_modules(dtype=torch.float32)
    # one float32 row: F.linear's own numbers (a few rows would take the AVX-512 kernel's)
    attention, residual = torch.randn(1, 1, 64), torch.randn(1, 1, 64)
    with torch.no_grad():
        got, _ = fused.attention_output_and_mlp(
            attention, residual, dense=dense, norm=norm, up=up, down=down, activation="gelu_tanh"
        )
        s = F.linear(attention, dense.weight, dense.bias) + residual
        expected = F.linear(F.gelu(F.linear(norm(s), up.weight, up.bias), approximate="tanh"), down.weight, down.bias)
        expected = expected + s
    assert torch.equal(got, expected)


@needs_kernel
def test_a_layernorm_with_a_forward_hook_runs_as_a_module(monkeypatch):
    dense, norm, up, down = _block_modules()
    seen = []
    norm.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    calls = []
    real = chains.run_chain
    monkeypatch.setattr(chains, "run_chain", lambda *a, **k: calls.append(k) or real(*a, **k))
    x = torch.randn(4, 64).bfloat16()
    with torch.no_grad():
        got = fused.mlp(x, up, down, activation="gelu_tanh", residual=x, norm=norm)
        qkv = fused.linear(x, up, norm=norm)
    assert seen == [(4, 64), (4, 64)]  # the hook ran both times
    assert calls == [] or all(call["norm"] is None for call in calls)
    with torch.no_grad():
        h = norm(x)
        assert torch.equal(qkv, fused.linear(h, up))
        assert torch.equal(got, fused.linear(fused.linear(h, up, activation="gelu_tanh"), down, residual=x))


@needs_kernel
@pytest.mark.parametrize(
    "change",
    [
        "odd width",  # in_features not a multiple of the kernel's k tile
        "no affine",  # a LayerNorm without weights
        "float32 norm",  # parameters in another dtype
        "grad",  # autograd on
    ],
)
def test_what_the_chain_refuses_runs_as_the_composition(change):
    hidden = 48 if change == "odd width" else 64
    dense, norm, up, down = _block_modules(hidden=hidden)
    if change == "no affine":
        norm = nn.LayerNorm(hidden, elementwise_affine=False)
    if change == "float32 norm":
        norm = norm.float()
    x = torch.randn(3, hidden).bfloat16()
    context = torch.enable_grad() if change == "grad" else torch.no_grad()
    with context:
        assert fused._kernel_chain(x, norm=norm, first=up, activation="gelu_tanh", second=down, residual=x) is None
        got = fused.mlp(x, up, down, activation="gelu_tanh", residual=x, norm=norm)
        h = fused.linear(fused.linear(norm(x), up, activation="gelu_tanh"), down, residual=x)
    assert torch.equal(got, h)


def test_unknown_activations_are_refused_by_name():
    dense, norm, up, down = _block_modules(dtype=torch.float32)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="gelu_tanh"):
        fused.mlp(x, up, down, activation="swish")
    with pytest.raises(ValueError, match="not fusable"):
        fused.attention_output_and_mlp(x, x, dense=dense, norm=norm, up=up, down=down, activation="swish")


@needs_kernel
def test_a_profile_names_each_chain_with_its_steps():
    o = _chain_operands(3, 64, 128, seed=5)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        chains.run_chain(o["x"], norm=o["norm"], first=o["up"])
        chains.run_chain(o["x"], project=(*o["dense"], o["r0"]), norm=o["norm"], first=o["up"], second=o["down"])
    names = {event.name for event in profile.events()}
    assert "registry.amx.chain 3 rows 64->128 layernorm" in names
    assert "registry.amx.chain 3 rows 64->64 64->128 128->64 layernorm" in names


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5, 130])
def test_a_chain_computes_the_next_block_s_projection_as_its_own_call_would(rows):
    o = _chain_operands(rows, 64, 128, seed=11 * rows)
    g = torch.Generator().manual_seed(rows)
    next_norm = ((torch.randn(64, generator=g) * 0.3 + 1).bfloat16(), torch.randn(64, generator=g).bfloat16(), 1e-3)
    next_layer = ((torch.randn(192, 64, generator=g) / 8).bfloat16(), torch.randn(192, generator=g).bfloat16())
    out = torch.full((rows, 192), 7.0, dtype=torch.bfloat16)
    y = _block_chain(o, then=(next_norm, next_layer, out))
    alone = _block_chain(o)
    assert torch.equal(y, alone)
    assert torch.equal(out, chains.run_chain(alone, norm=next_norm, first=next_layer))


@needs_kernel
def test_attention_output_and_mlp_returns_the_next_projection_on_and_off_the_kernel():
    dense, norm, up, down = _block_modules()
    torch.manual_seed(1)
    next_norm, next_layer = nn.LayerNorm(64).bfloat16(), nn.Linear(64, 192).bfloat16()
    attention, residual = torch.randn(2, 3, 64).bfloat16(), torch.randn(2, 3, 64).bfloat16()
    with torch.no_grad():
        kwargs = dict(dense=dense, norm=norm, up=up, down=down, activation="gelu_tanh", then=(next_norm, next_layer))
        y, projection = fused.attention_output_and_mlp(attention, residual, **kwargs)
        assert projection.shape == (2, 3, 192)
        assert torch.equal(projection, fused.linear(y, next_layer, norm=next_norm))
        with fused.disabled():
            plain_y, plain_projection = fused.attention_output_and_mlp(attention, residual, **kwargs)
            assert torch.equal(plain_projection, fused.linear(plain_y, next_layer, norm=next_norm))


@needs_kernel
def test_a_chain_whose_last_width_differs_from_the_projection_s_is_refused_like_the_composition():
    """The projection's result is the last layer's residual: down must give back the block's width."""
    torch.manual_seed(0)
    dense, norm, up = nn.Linear(64, 64).bfloat16(), nn.LayerNorm(64).bfloat16(), nn.Linear(64, 96).bfloat16()
    down = nn.Linear(96, 128).bfloat16()
    attention, residual = torch.randn(1, 3, 64).bfloat16(), torch.randn(1, 3, 64).bfloat16()
    with torch.no_grad():
        assert fused._kernel_chain(attention, project=(dense, residual), norm=norm, first=up, second=down) is None
        with pytest.raises(RuntimeError):
            fused.attention_output_and_mlp(
                attention, residual, dense=dense, norm=norm, up=up, down=down, activation="gelu"
            )


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_threads_running_chains_at_once_get_their_own_results(dtype):
    """A chain's intermediates live in the calling thread's scratch: concurrent chains do not mix."""
    if dtype == torch.float32 and not avx512.ready():
        pytest.skip(f"AVX-512 kernel not usable here: {avx512.status().reason}")
    o = {k: tuple(t.to(dtype) if isinstance(t, torch.Tensor) else t for t in v) if isinstance(v, tuple) else v.to(dtype)
         for k, v in _chain_operands(16, 64, 128, seed=9).items()}  # fmt: skip
    inputs = [torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)).to(dtype) for rows in (2, 5, 16)] * 3

    def chain(x: torch.Tensor) -> torch.Tensor:
        residual = torch.ones_like(x)
        return chains.run_chain(
            x, project=(*o["dense"], residual), norm=o["norm"], first=o["up"], activation="gelu", second=o["down"]
        )

    _same_in_threads(chain, inputs)
