"""registry.fused.linear (the CPU inference path BERT's layers run through) against the plain
F.linear path: same numbers in float32, bfloat16 to its rounding, row blocks, re-packing after a
weight changes, no packed copy where the memory is not there, and training untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import registry
from registry import fused

from .conftest import TINY, max_diff, right_padded_batch

SIZES = {k: v for k, v in TINY.items() if k != "num_labels"}


def layers(dtype=torch.float32):
    torch.manual_seed(0)
    group = [nn.Linear(16, n).to(dtype) for n in (8, 8, 4)]
    with torch.no_grad():
        for layer in group:
            layer.bias.normal_()
    return group


@pytest.mark.parametrize("shape", [(3, 7), (1, 1)], ids=["rows", "one-row"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh", "relu", "silu", "tanh"])
def test_fused_equals_plain(dtype, tol, activation, shape):
    group = layers(dtype)
    x = torch.randn(*shape, 16).to(dtype)
    residual = torch.randn(*shape, 20).to(dtype)
    weight = torch.cat([layer.weight for layer in group]).float()
    bias = torch.cat([layer.bias for layer in group]).float()
    expected = F.linear(x.float(), weight, bias)
    if activation is not None:
        expected = fused.ACTIVATIONS[activation](expected)
    with torch.no_grad():
        got = fused.linear(x, group, activation=activation)
        with_residual = fused.linear(x, group, activation=activation, residual=residual)
    assert got.dtype == dtype and got.shape == (*shape, 20)
    assert max_diff(got, expected) <= tol
    assert max_diff(with_residual, expected + residual.float()) <= 2 * tol


def test_row_blocks_give_the_same_result(monkeypatch):
    if "onednn-bf16" not in fused._kernels():
        pytest.skip("no oneDNN bfloat16 kernels in this build")
    monkeypatch.setattr(fused, "ROW_BLOCK", 4)
    group = layers(torch.bfloat16)
    x = torch.randn(5, 6, 16).to(torch.bfloat16)  # 30 rows: blocks of 4 (and a last one of 2)
    residual = torch.randn(5, 6, 20).to(torch.bfloat16)
    with torch.no_grad():
        whole = fused._run_blocks(lambda rows: fused.linear(x.reshape(30, 16)[rows], group), 30, 0)
        blocked = fused._run_blocks(lambda rows: fused.linear(x.reshape(30, 16)[rows], group), 30, 4)
        chosen = fused.linear(x, group, residual=residual)
        with fused.disabled():
            plain = fused.linear(x, group, residual=residual)
    assert torch.equal(whole, blocked)
    assert max_diff(chosen, plain) <= 3e-2


def test_weights_changed_in_place_are_repacked():
    group = layers()
    x = torch.randn(4, 16)
    with torch.no_grad():
        before = fused.linear(x, group)
        for layer in group:
            layer.weight.mul_(2)
        after = fused.linear(x, group)
        with fused.disabled():
            plain = fused.linear(x, group)
    assert max_diff(after, plain) <= 1e-6 and max_diff(after, before) > 1e-2


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="gelu_new"):
        fused.linear(torch.randn(2, 16), layers()[0], activation="gelu_new")


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 0.1)])
def test_bert_fused_and_plain_agree(dtype, tol):
    model = registry.build("bert-base-uncased", head="base", dtype=dtype, **SIZES)
    ids, mask, types = right_padded_batch()
    with torch.inference_mode():
        fast = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        with fused.disabled():
            plain = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert max_diff(fast, plain) <= tol


def test_training_takes_the_plain_path_and_gets_gradients():
    model = registry.build("bert-base-uncased", head="sequence-classification", **SIZES)
    model.train()
    ids, mask, types = right_padded_batch()
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=torch.tensor([0, 1, 1]))
    out.loss.backward()
    attention = model.bert.encoder.layer[0].attention.self
    for layer in (attention.query, attention.key, attention.value):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert model.bert.pooler.dense.weight.grad is not None


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_project_is_a_bias_free_linear(dtype, tol, rows):
    torch.manual_seed(0)
    weight = torch.randn(40, 16).to(dtype)
    x = torch.randn(rows, 1, 16).to(dtype)
    with torch.no_grad():
        got = fused.project(x, weight)
    assert got.shape == (rows, 1, 40) and got.dtype == dtype
    assert max_diff(got, F.linear(x.float(), weight.float())) <= tol


def _many_rows_group(dtype):
    torch.manual_seed(0)
    group = [nn.Linear(64, 32).to(dtype) for _ in range(3)]
    return group, torch.randn(300, 64).to(dtype)  # above every packing threshold (256 rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_memory_for_a_packed_copy_the_layers_run_unpacked_and_say_so(monkeypatch, caplog, dtype):
    if ("onednn-bf16" if dtype == torch.bfloat16 else "mkl-fp32") not in fused._kernels():
        pytest.skip("no packing kernel for this dtype in this torch build")
    monkeypatch.setattr(fused, "_memory", lambda: (3 * 2**30, 8 * 2**30))  # 3 of 8 GiB available
    monkeypatch.setattr(fused, "PACK_MEMORY_RESERVE", 0.375)  # keep 3 GiB: no room for any copy
    monkeypatch.setattr(fused, "_declined_warned", False)
    group, x = _many_rows_group(dtype)
    with torch.no_grad(), caplog.at_level("WARNING", logger="registry.fused"):
        got = fused.linear(x, group, activation="relu")
        again = fused.linear(x, group, activation="relu")
        with fused.disabled():
            plain = fused.linear(x, group, activation="relu")
    assert fused._packed[group[0]][tuple(id(layer) for layer in group)][1] is None
    assert fused.packing()["unpacked_groups"] >= 1
    assert sum("not packing linear weights" in r.getMessage() for r in caplog.records) == 1  # once
    if dtype == torch.float32:
        assert torch.equal(got, plain)  # F.linear itself
    else:
        assert max_diff(got, plain) <= 3e-2
    assert torch.equal(got, again)


def test_with_memory_to_spare_the_copy_is_made_and_counted(monkeypatch):
    if "mkl-fp32" not in fused._kernels():
        pytest.skip("no MKL packing in this torch build")
    monkeypatch.setattr(fused, "_memory", lambda: (6 * 2**30, 8 * 2**30))
    group, x = _many_rows_group(torch.float32)
    with torch.no_grad():
        fused.linear(x, group)
    entry = fused._packed[group[0]][tuple(id(layer) for layer in group)][1]
    assert entry is not None
    assert entry[4] == 2 * 3 * 32 * 64 * 4  # the packed copy and the concatenated weight MKL keeps beside it
    assert fused.packing()["packed_bytes"] >= entry[4] and fused.packing()["packed_groups"] >= 1


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 0.1)])
def test_bert_mlps_run_as_one_kernel_chain_each_where_a_kernel_takes_them(dtype, tol, monkeypatch):
    """Kernel widths (multiples of 32) and a few rows: each layer's MLP and its residual in one call, the
    post-LN LayerNorm as a module after it; the same numbers as the plain path."""
    from registry import chains

    sizes = {**SIZES, "intermediate_size": 64}
    model = registry.build("bert-base-uncased", head="base", dtype=dtype, **sizes)
    ids = torch.randint(5, 90, (2, 3))  # 6 rows: the float32 kernel's decode-step range
    calls = []
    real = chains.run_chain
    monkeypatch.setattr(chains, "run_chain", lambda *a, **k: calls.append(k) or real(*a, **k))
    with torch.inference_mode():
        fast = model(input_ids=ids).last_hidden_state
        with fused.disabled():
            plain = model(input_ids=ids).last_hidden_state
    with torch.no_grad():
        kernel_ready = fused._chain_kernel(torch.empty(6, 32, dtype=getattr(torch, dtype))) is not None
    assert len(calls) == (2 if kernel_ready else 0)  # one per layer
    assert all(k["second"] is not None and k["residual"] is not None and k["norm"] is None for k in calls)
    assert max_diff(fast, plain) <= tol
