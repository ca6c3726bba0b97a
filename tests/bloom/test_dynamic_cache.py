"""The dynamic cache's growth: new tokens are written into spare room (no copy of the history per step),
the room doubles when it runs out, views show exactly the tokens held, and shrink() gives the room back."""

from __future__ import annotations

import pytest
import torch

from plugins.cache.dynamic import MIN_CAPACITY, DynamicCache


def _kv(tokens: int, seed: int, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, tokens, 4, generator=g), torch.randn(batch, 3, tokens, 4, generator=g)


def test_steps_write_in_place_until_the_room_runs_out_then_it_doubles():
    cache = DynamicCache(num_layers=1)
    written = [_kv(5, 0)]
    cache.update(0, *written[0])
    buffer = cache._keys[0]
    assert buffer.shape[2] == MIN_CAPACITY
    for step in range(1, MIN_CAPACITY - 5 + 1):  # fill the first buffer exactly
        written.append(_kv(1, step))
        keys, values = cache.update(0, *written[-1])
        assert cache._keys[0].data_ptr() == buffer.data_ptr()  # no reallocation, no copy of the history
        assert keys.shape[2] == 5 + step and keys.data_ptr() == buffer.data_ptr()
    written.append(_kv(1, 999))
    keys, values = cache.update(0, *written[-1])  # one past the capacity
    assert cache._keys[0].shape[2] == 2 * MIN_CAPACITY and cache._keys[0].data_ptr() != buffer.data_ptr()
    assert cache.get_seq_length() == MIN_CAPACITY + 1
    assert torch.equal(keys, torch.cat([k for k, _ in written], 2))
    assert torch.equal(values, torch.cat([v for _, v in written], 2))
    assert torch.equal(cache.keys[0], keys) and torch.equal(cache.values[0], values)


def test_a_prompt_longer_than_the_minimum_gets_exactly_its_room():
    cache = DynamicCache(num_layers=2)
    cache.update(1, *_kv(100, 0))
    assert cache._keys[1].shape[2] == 100 and cache.keys[0] is None and cache.get_seq_length(1) == 100


def test_shrink_gives_the_spare_room_back_and_keeps_the_tokens():
    cache = DynamicCache(num_layers=1)
    k, v = _kv(7, 0)
    cache.update(0, k, v)
    cache.shrink()
    assert cache._keys[0].shape[2] == 7 and torch.equal(cache.keys[0], k) and torch.equal(cache.values[0], v)
    more = _kv(1, 1)
    keys, _ = cache.update(0, *more)  # grows again from there
    assert torch.equal(keys, torch.cat([k, more[0]], 2))


def test_reorder_moves_rows_with_their_room():
    cache = DynamicCache(num_layers=1)
    k, v = _kv(3, 0)
    cache.update(0, k, v)
    cache.reorder(torch.tensor([1, 0]))
    assert torch.equal(cache.keys[0], k.flip(0))
    keys, _ = cache.update(0, *_kv(1, 1))
    assert keys.shape == (2, 3, 4, 4)


def test_appending_another_batch_size_is_an_error_that_says_what_is_held():
    cache = DynamicCache(num_layers=1)
    cache.update(0, *_kv(3, 0))
    with pytest.raises(ValueError, match=r"cannot append keys/values of shape \(3, 3, 1, 4\)"):
        cache.update(0, *_kv(1, 1, batch=3))


def test_a_refused_update_leaves_the_cache_as_it_was():
    cache = DynamicCache(num_layers=1)
    k, v = _kv(MIN_CAPACITY, 0)  # a full buffer: the next token needs a new one
    cache.update(0, k, v)
    bad_value = torch.randn(2, 3, 1, 4, dtype=torch.float64)  # right shape, another dtype
    with pytest.raises(ValueError, match="float64"):
        cache.update(0, torch.randn(2, 3, 1, 4), bad_value)
    assert cache.get_seq_length() == MIN_CAPACITY
    assert torch.equal(cache.keys[0], k) and torch.equal(cache.values[0], v)
    more = _kv(1, 1)
    keys, values = cache.update(0, *more)
    assert keys.shape[2] == values.shape[2] == MIN_CAPACITY + 1
    assert torch.equal(values, torch.cat([v, more[1]], 2))


def test_keys_and_values_of_different_lengths_are_refused():
    cache = DynamicCache(num_layers=1)
    with pytest.raises(ValueError, match="keys hold 2 new tokens but values 1"):
        cache.update(0, torch.randn(2, 3, 2, 4), torch.randn(2, 3, 1, 4))
    assert cache.get_seq_length() == 0
