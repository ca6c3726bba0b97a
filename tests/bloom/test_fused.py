"""BLOOM's linear layers through registry.fused (CPU inference): the plain path's numbers, in float32
exactly as far as generation can tell, in bfloat16 to its rounding and close to the reference's."""

from __future__ import annotations

import pytest
import torch

import registry
from plugins.families.bloom import BloomAttention
from registry import amx, avx512, chains, fused

from .conftest import PAD, left_padded_batch


def test_float32_eager_logits_are_the_reference_s_to_the_last_bit(reference_checkpoint):
    ref, folder = reference_checkpoint("causal-lm", "h8-post-ln")
    ours = registry.from_pretrained(folder, attention="eager")
    ids, mask = left_padded_batch(length=7)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got[mask.bool()], expected[mask.bool()])


def test_float32_generation_is_the_same_with_and_without_the_fused_path(reference_checkpoint):
    _, folder = reference_checkpoint("causal-lm", "h8-post-ln")
    model = registry.from_pretrained(folder)
    ids, mask = left_padded_batch(length=7)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        with fused.disabled():
            plain_logits = model(input_ids=ids, attention_mask=mask).logits
    fast = model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    with fused.disabled():
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    torch.testing.assert_close(logits, plain_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(fast, plain)


@pytest.mark.parametrize(
    ("config_name", "cache"),
    [(config, cache) for config in ("h8-post-ln", "h4-kernel-widths") for cache in ("dynamic", "static")],
)
def test_bfloat16_logits_are_close_to_the_reference_s(reference_checkpoint, config_name, cache):
    ref, folder = reference_checkpoint("causal-lm", config_name)
    ours = registry.from_pretrained(folder, dtype="bfloat16", cache=cache)
    reference = type(ref).from_pretrained(folder, dtype=torch.bfloat16).eval()  # the shared one stays fp32
    ids, mask = left_padded_batch(length=7)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits.float()
        got = ours(input_ids=ids, attention_mask=mask).logits.float()
        with fused.disabled():
            plain = ours(input_ids=ids, attention_mask=mask).logits.float()
        exact = ref(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    # bfloat16 keeps 8 bits of mantissa: compare against the float32 truth, ours no worse than the reference
    ours_error = (got - exact)[real].abs().max()
    reference_error = (expected - exact)[real].abs().max()
    assert ours_error <= 2 * reference_error + 1e-3
    assert (got - plain)[real].abs().max() <= 2 * reference_error + 1e-3


@pytest.mark.skipif(not amx.ready(), reason=f"AMX kernel not usable here: {amx.status().reason}")
def test_bfloat16_blocks_run_as_one_kernel_chain_each_and_generate_as_the_plain_path(reference_checkpoint, monkeypatch):
    _, folder = reference_checkpoint("causal-lm", "h4-kernel-widths")
    model = registry.from_pretrained(folder, dtype="bfloat16", attention="sdpa")  # chains per block
    ids, mask = left_padded_batch(length=7)
    calls = []
    real = chains.run_chain
    monkeypatch.setattr(chains, "run_chain", lambda *a, **k: calls.append(k) or real(*a, **k))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    # the first block's input LayerNorm and query-key-value projection; then per block its output
    # projection, both residuals, the second LayerNorm, the MLP, and (but for the last block) the next
    # block's input LayerNorm and projection
    steps = [tuple(k.get(step) is not None for step in ("project", "norm", "second", "then")) for k in calls]
    assert steps == [(False, True, False, False), (True, True, True, True), (True, True, True, False)]
    fast = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    with fused.disabled():
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    # the same tokens as the plain path (oneDNN and PyTorch's LayerNorm): on this model no choice is
    # close enough for the two paths' bfloat16 rounding to decide it
    assert torch.equal(fast, plain)


@pytest.mark.skipif(not amx.ready(), reason=f"AMX kernel not usable here: {amx.status().reason}")
def test_a_block_whose_input_a_hook_changes_projects_it_itself(reference_checkpoint, monkeypatch):
    _, folder = reference_checkpoint("causal-lm", "h4-kernel-widths")
    model = registry.from_pretrained(folder, dtype="bfloat16", attention="sdpa")  # chains per block
    ids, mask = left_padded_batch(length=7)
    handed = []  # per block: whether it was handed its projection by the block before
    core = BloomAttention.core
    monkeypatch.setattr(
        BloomAttention, "core", lambda self, x, **k: handed.append(k.get("projected") is not None) or core(self, x, **k)
    )
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        assert handed == [False, True]
        # the block before would otherwise compute this block's query-key-value projection itself, from
        # the input the hook has not yet changed
        shift = torch.linspace(-2, 2, 64).bfloat16()  # per feature: survives the LayerNorm
        model.backbone.h[1].register_forward_pre_hook(lambda module, args: (args[0] + shift,))
        handed.clear()
        got = model(input_ids=ids, attention_mask=mask).logits.float()
        assert handed == [False, False]
        with fused.disabled():
            plain = model(input_ids=ids, attention_mask=mask).logits.float()
    real = mask.bool()
    assert (got - plain)[real].abs().max() <= 0.01


@pytest.mark.skipif(not avx512.ready(), reason=f"AVX-512 kernel not usable here: {avx512.status().reason}")
def test_float32_decode_steps_run_as_chains_and_generate_the_reference_s_tokens(reference_checkpoint, monkeypatch):
    ref, folder = reference_checkpoint("causal-lm", "h4-kernel-widths")
    model = registry.from_pretrained(folder, attention="sdpa")  # chains per block
    ids, mask = left_padded_batch(length=7)
    calls = []
    real = chains.run_chain
    monkeypatch.setattr(chains, "run_chain", lambda *a, **k: calls.append(k) or real(*a, **k))
    got = model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    with torch.no_grad():
        expected = ref.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=PAD
        )
    assert torch.equal(got, expected)
    # the prompt (21 rows) runs module by module; each of the 9 decode steps (3 rows): the first block's
    # LayerNorm and projection, then one chain per block, the first carrying the second block's projection
    steps = [tuple(k.get(step) is not None for step in ("project", "norm", "second", "then")) for k in calls]
    assert steps == [(False, True, False, False), (True, True, True, True), (True, True, True, False)] * 9


def _handed(monkeypatch) -> list[bool]:
    """Per block call: whether it was handed its projection by the block before."""
    handed: list[bool] = []
    core = BloomAttention.core
    monkeypatch.setattr(
        BloomAttention, "core", lambda self, x, **k: handed.append(k.get("projected") is not None) or core(self, x, **k)
    )
    return handed


@pytest.mark.skipif(not amx.ready(), reason=f"AMX kernel not usable here: {amx.status().reason}")
def test_a_block_whose_output_a_hook_changes_hands_nothing_on(reference_checkpoint, monkeypatch):
    _, folder = reference_checkpoint("causal-lm", "h4-kernel-widths")
    model = registry.from_pretrained(folder, dtype="bfloat16", attention="sdpa")  # chains per block
    ids, mask = left_padded_batch(length=7)
    shift = torch.linspace(-2, 2, 64).bfloat16()
    # a hook that returns the reference's (output, weights) pair, changed
    model.backbone.h[0].register_forward_hook(lambda module, args, out: (out[0] + shift, out[1]))
    handed = _handed(monkeypatch)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits.float()
        assert handed == [False, False]
        with fused.disabled():
            plain = model(input_ids=ids, attention_mask=mask).logits.float()
    assert (got - plain)[mask.bool()].abs().max() <= 0.01


def test_a_block_replaced_by_a_wrapper_runs_as_it_is_called(reference_checkpoint, monkeypatch):
    _, folder = reference_checkpoint("causal-lm", "h4-kernel-widths")
    model = registry.from_pretrained(folder)
    ids, mask = left_padded_batch(length=7)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits

    class Wrapper(torch.nn.Module):  # takes only the reference's arguments (a checkpointing wrapper, say)
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, x, *, mask, bias, positions, rotate, cache, need_weights):
            return self.block(x, mask=mask, bias=bias, positions=positions, rotate=rotate, cache=cache,
                              need_weights=need_weights)  # fmt: skip

    model.backbone.h[1] = Wrapper(model.backbone.h[1])
    handed = _handed(monkeypatch)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    assert handed == [False, False]
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_hooks_on_linear_layers_run_and_change_what_they_return(reference_checkpoint, dtype):
    ref, folder = reference_checkpoint("causal-lm", "h2-decode-kernel")
    ours = registry.from_pretrained(folder, dtype=dtype)
    reference = type(ref).from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    ids, mask = left_padded_batch(length=7)
    seen = []

    def halve(module, args, output):
        seen.append(module)
        return output * 0.5

    for model in (ours, reference):  # the last block's qkv is projected by the block before it, unhooked
        h = model.backbone.h if model is ours else model.transformer.h
        for layer in (h[1].self_attention.query_key_value, h[0].mlp.dense_4h_to_h):
            layer.register_forward_hook(halve)
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask).logits.float()
        assert len(seen) == 2
        expected = reference(input_ids=ids, attention_mask=mask).logits.float()
        exact = ref(input_ids=ids, attention_mask=mask).logits  # unhooked
    real = mask.bool()
    change = (expected - exact)[real].abs().max()
    assert change > 0.5  # the hooks change the logits
    assert (got - expected)[real].abs().max() <= (1e-5 if dtype == "float32" else 0.05 * change)
