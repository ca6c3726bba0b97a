"""registry.fused.linear (the CPU inference path BERT's layers run through) against the plain
F.linear path: same numbers in float32, bfloat16 to its rounding, row blocks, re-packing after a
weight changes, and training untouched."""

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
