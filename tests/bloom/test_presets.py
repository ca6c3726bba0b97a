"""Presets: meta builds are instant and have the reference's parameter counts."""

from __future__ import annotations

import pytest
import torch

import registry

from .conftest import transformers

SIZES = {
    "bloom-560m": (1024, 24, 16),
    "bloom-1b1": (1536, 24, 16),
    "bloom-1b7": (2048, 24, 16),
    "bloom-3b": (2560, 30, 32),
    "bloom-7b1": (4096, 30, 32),
    "bloom": (14336, 70, 112),
}


def test_every_bloom_preset_is_offered():
    assert set(SIZES) <= set(registry.presets())


@pytest.mark.parametrize("name", list(SIZES))
def test_parameter_count_equals_the_reference(name):
    hidden, layers, heads = SIZES[name]
    model = registry.build(name, device="meta")
    assert (model.config.hidden_size, model.config.n_layer, model.config.n_head) == (hidden, layers, heads)
    config = transformers.BloomConfig(hidden_size=hidden, n_layer=layers, n_head=heads, vocab_size=250880)
    with torch.device("meta"):
        reference = transformers.BloomForCausalLM(config)
    assert model.num_parameters() == reference.num_parameters()


def test_176b_meta_build_allocates_nothing():
    """What makes the meta build instant: no tensor of the 176B model has storage.
    (Its time, about 0.1 s, is measured in docs/benchmarks.md, not asserted here.)"""
    model = registry.build("bloom", device="meta")
    assert model.num_parameters() == 176_247_271_424
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
