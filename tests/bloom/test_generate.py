"""Greedy generation against the reference's generate() (a first slice of the generation issue)."""

from __future__ import annotations

import pytest
import torch

import registry

from .conftest import left_padded_batch


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_greedy_generation_is_token_identical_with_left_padding(reference_checkpoint, attention):
    ref, folder = reference_checkpoint("causal-lm", "h8-post-ln")
    ours = registry.from_pretrained(folder, attention=attention)
    ids, mask = left_padded_batch(length=7)
    with torch.no_grad():
        expected = ref.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=3
        )
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(got, expected)


def test_rows_that_reach_eos_are_padded_as_the_reference_does(reference_checkpoint):
    ref, folder = reference_checkpoint("causal-lm", "h8-post-ln")
    ours = registry.from_pretrained(folder, attention="eager")
    ids, mask = left_padded_batch(length=7)
    with torch.no_grad():
        free = ref.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=3
        )
    eos = int(free[0, 7 + 3])  # a token row 0 emits at step 3: make it the EOS
    with torch.no_grad():
        expected = ref.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=3
        )
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=3)
    assert torch.equal(got, expected)


def test_sampling_is_reproducible_under_a_seed():
    model = registry.build("bloom-560m", n_layer=2, hidden_size=32, n_head=4, vocab_size=50)
    ids = torch.tensor([[5, 6, 7]])
    a = model.generate(ids, max_new_tokens=8, do_sample=True, top_k=10, seed=7, eos_token_id=[])
    b = model.generate(ids, max_new_tokens=8, do_sample=True, top_k=10, seed=7, eos_token_id=[])
    c = model.generate(ids, max_new_tokens=8, do_sample=True, top_k=10, seed=8, eos_token_id=[])
    assert torch.equal(a, b) and a.shape == (1, 11)
    assert not torch.equal(a, c)
