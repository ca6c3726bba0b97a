"""Conformance of every catalogued KV cache: the same logits as the growing cache, through the model
and directly; fixed-shape caches keep their buffers' addresses and refuse to overflow."""

from __future__ import annotations

import pytest
import torch

import registry
from registry.discovery import default_catalog
from registry.interfaces import BuildContext, new_cache

from .test_components import SMALL, _batch, _usable

CONTEXT = BuildContext(config=None, num_layers=2, num_heads=3, head_dim=4, hidden_size=12)


def _cache(name: str, *, batch: int = 2, max_length: int = 6):
    plugin = default_catalog().get("cache", name)
    return plugin, new_cache(
        plugin, CONTEXT, batch_size=batch, max_length=max_length, dtype=torch.float32, device=torch.device("cpu")
    )


def _kv(tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, tokens, 4, generator=g), torch.randn(2, 3, tokens, 4, generator=g)


@pytest.mark.parametrize("name", _usable("cache"))
def test_stored_keys_and_values_come_back_in_order(name):
    _, cache = _cache(name)
    steps = [_kv(3, 0), _kv(1, 1), _kv(2, 2)]
    for layer in range(2):
        for k, v in steps:
            keys, values = cache.update(layer, k, v)
    stored = sum(k.shape[2] for k, _ in steps)
    assert cache.get_seq_length() == stored == 6
    torch.testing.assert_close(keys[:, :, :stored], torch.cat([k for k, _ in steps], 2), rtol=0, atol=0)
    torch.testing.assert_close(values[:, :, :stored], torch.cat([v for _, v in steps], 2), rtol=0, atol=0)


@pytest.mark.parametrize("name", _usable("cache"))
def test_fixed_shape_caches_keep_their_buffers_and_refuse_to_overflow(name):
    plugin, cache = _cache(name, max_length=6)
    if not plugin.capabilities.fixed_shape:
        pytest.skip(f"cache '{name}' grows (fixed_shape=False)")
    assert cache.max_length == 6 and cache.key_length(2) == 6
    first = cache.update(0, *_kv(4, 0))
    addresses = (first[0].data_ptr(), first[1].data_ptr())
    second = cache.update(0, *_kv(2, 1))
    assert (second[0].data_ptr(), second[1].data_ptr()) == addresses
    assert second[0].shape == (2, 3, 6, 4)
    with pytest.raises(registry.CacheOverflowError, match="holds 6 tokens"):
        cache.update(0, *_kv(1, 2))


@pytest.mark.parametrize("name", _usable("cache"))
def test_every_cache_gives_the_growing_cache_s_logits(name):
    ids, mask = _batch()
    model = registry.build("bloom-560m", **SMALL, cache=name)
    reference = registry.build("bloom-560m", **SMALL, cache="dynamic")
    reference.load_state_dict(model.state_dict())

    def stepped(m):
        cache = m.new_cache(batch_size=3, max_length=8)
        with torch.no_grad():
            out = m(input_ids=ids[:, :5], attention_mask=mask[:, :5], past_key_values=cache, use_cache=True)
            logits = [out.logits]
            for t in range(5, 8):
                out = m(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache)
                logits.append(out.logits)
        return torch.cat(logits, 1)

    real = mask.bool()
    torch.testing.assert_close(stepped(model)[real], stepped(reference)[real], atol=1e-6, rtol=1e-6)
