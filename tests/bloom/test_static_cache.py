"""The static cache inside generation: allocated once at prompt + max_new_tokens, written in place,
its buffers at the same addresses at every step; a clear error past its length."""

from __future__ import annotations

import pytest
import torch

import registry
from registry.generate import decode_step, prefill

TINY = dict(n_layer=2, hidden_size=32, n_head=4, vocab_size=60)


def test_generation_allocates_the_static_cache_once_and_never_moves_it(monkeypatch):
    model = registry.build("bloom-560m", cache="static", **TINY)
    made = []
    original = model.new_cache

    def spy(batch_size, max_length=None, **kw):
        cache = original(batch_size, max_length, **kw)
        made.append((batch_size, max_length, cache))
        return cache

    monkeypatch.setattr(model, "new_cache", spy)
    ids = torch.tensor([[5, 6, 7, 8], [3, 3, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    addresses = []

    def record(_tokens):
        cache = made[-1][2]
        addresses.append([(k.data_ptr(), v.data_ptr()) for k, v in zip(cache.keys, cache.values, strict=True)])

    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[], streamer=record)
    assert len(made) == 1
    batch, length, cache = made[0]
    assert (batch, length) == (2, 4 + 6)
    assert cache.keys[0].shape == (2, 4, 10, 8) and cache.get_seq_length() == 9  # the last token is not fed back
    assert out.shape == (2, 10)
    assert len(addresses) == 6 and all(a == addresses[0] for a in addresses)


def test_prefill_and_decode_write_in_place_at_stable_addresses():
    model = registry.build("bloom-560m", cache="static", **TINY)
    ids = torch.randint(0, 60, (2, 4), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    cache = model.new_cache(2, max_length=7)
    addresses = [(k.data_ptr(), v.data_ptr()) for k, v in zip(cache.keys, cache.values, strict=True)]
    logits = prefill(model, ids, mask[:, :4], cache, None)
    for length in range(5, 8):
        logits = decode_step(model, logits.argmax(-1), mask[:, :length], cache, None)
        assert [(k.data_ptr(), v.data_ptr()) for k, v in zip(cache.keys, cache.values, strict=True)] == addresses
    assert cache.get_seq_length() == 7
    with pytest.raises(registry.CacheOverflowError, match="holds 7 tokens"):
        decode_step(model, logits.argmax(-1), torch.ones(2, 8, dtype=torch.long), cache, None)


def test_a_forward_that_makes_its_own_static_cache_sizes_it_to_its_tokens():
    """No cache passed: the forward's cache holds exactly its tokens; decoding on is a clear error
    that says how to make a longer one."""
    model = registry.build("bloom-560m", cache="static", **TINY)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    assert out.past_key_values.max_length == 3 and out.past_key_values.get_seq_length() == 3
    with pytest.raises(registry.CacheOverflowError, match="max_length"), torch.no_grad():
        model(input_ids=torch.tensor([[4]]), past_key_values=out.past_key_values)
    with pytest.raises(registry.InputError, match="max_length"):
        model.new_cache(1)


def test_the_static_cache_refuses_keys_of_another_dtype():
    model = registry.build("bloom-560m", cache="static", **TINY)
    cache = model.new_cache(1, max_length=8, dtype=torch.bfloat16)
    with pytest.raises(registry.InputError, match="bfloat16"):
        model(input_ids=torch.tensor([[1, 2, 3]]), past_key_values=cache, use_cache=True)
