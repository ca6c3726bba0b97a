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


def test_an_expected_length_is_made_room_for_at_once_and_the_cache_still_grows_past_it():
    cache = DynamicCache(num_layers=1, expected_length=100)
    cache.update(0, *_kv(16, 0))
    buffer = cache._keys[0]
    assert buffer.shape[2] == 100
    for step in range(84):
        keys, _ = cache.update(0, *_kv(1, step + 1))
    assert cache._keys[0].data_ptr() == buffer.data_ptr() and keys.shape[2] == 100  # never reallocated
    keys, _ = cache.update(0, *_kv(1, 500))
    assert cache._keys[0].shape[2] == 200 and keys.shape[2] == 101
    small = DynamicCache(num_layers=1, expected_length=3)
    small.update(0, *_kv(1, 0))
    assert small._keys[0].shape[2] == MIN_CAPACITY  # never below the minimum


def test_a_far_longer_expected_length_is_not_reserved_up_front():
    """A generation allowed 100,000 tokens that stops early must not hold room for all of them: the first
    allocation takes the expected length only within twice what it would hold anyway (doubling's bound)."""
    cache = DynamicCache(num_layers=1, expected_length=100_000)
    cache.update(0, *_kv(16, 0))
    assert cache._keys[0].shape[2] == MIN_CAPACITY
    cache = DynamicCache(num_layers=1, expected_length=2 * MIN_CAPACITY)
    cache.update(0, *_kv(16, 0))
    assert cache._keys[0].shape[2] == 2 * MIN_CAPACITY  # the edge: exactly twice
    cache = DynamicCache(num_layers=1, expected_length=2 * 100 + 1)
    cache.update(0, *_kv(100, 0))
    assert cache._keys[0].shape[2] == 100


def test_an_empty_cache_reserves_its_first_buffers_for_the_shape_it_was_created_for():
    like = (2, 3, 4, torch.float32, torch.device("cpu"))
    assert DynamicCache(num_layers=2).reserve(5) is None  # created without a shape: update() decides it
    cache = DynamicCache(num_layers=2, expected_length=100, like=like)
    slots = cache.reserve(70)
    assert [tuple(k.shape) for k, _ in slots] == [(2, 3, 100, 4)] * 2  # as update() would: the expected length
    assert cache.get_seq_length() == 0 and cache.reserve(70)[0][0].data_ptr() == slots[0][0].data_ptr()
    assert cache.keys == [None, None] and cache.values == [None, None]  # reserved, not yet holding tokens
    keys, values = _kv(70, 0)
    for k, v in slots:  # what a kernel does: write, then commit
        k[:, :, :70], v[:, :, :70] = keys, values
    cache.commit(70)
    assert torch.equal(cache.keys[1], keys) and cache._keys[1].data_ptr() == slots[1][0].data_ptr()
    assert cache.update(0, *_kv(1, 1))[0].data_ptr() == slots[0][0].data_ptr()  # written in place after them
    small = DynamicCache(num_layers=1, like=like)
    assert small.reserve(3)[0][0].shape[2] == MIN_CAPACITY


@pytest.mark.parametrize("bad", [-1, 100.0, True, "80"])
def test_an_expected_length_that_is_not_a_token_count_is_refused(bad):
    with pytest.raises(ValueError, match="expected_length must be a whole number of tokens >= 0, or None"):
        DynamicCache(num_layers=1, expected_length=bad)


def test_generate_sizes_the_dynamic_cache_for_prompt_and_new_tokens(monkeypatch):
    import registry

    model = registry.build("bloom-560m", n_layer=2, hidden_size=32, n_head=4, vocab_size=60, cache="dynamic").eval()
    assert model.new_cache(2, 90).expected_length == 90
    made: list[DynamicCache] = []
    original = model.new_cache

    def keep(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(model, "new_cache", keep)
    ids = torch.randint(0, 60, (2, 70), generator=torch.Generator().manual_seed(0))
    model.generate(ids, max_new_tokens=10, eos_token_id=[])
    (cache,) = made
    assert [k.shape[2] for k in cache._keys] == [80, 80]  # 70 + 10: one allocation, no doubling to 128


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
