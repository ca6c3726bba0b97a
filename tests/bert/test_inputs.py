"""Bad input is a typed error (registry.InputError) that names the limit, before any tensor op fails."""

from __future__ import annotations

import pytest
import torch

import registry

from .conftest import MAX_POSITIONS, TINY, TYPES, VOCAB

SIZES = {k: v for k, v in TINY.items() if k != "num_labels"}


@pytest.fixture(scope="module")
def encoder():
    return registry.build("bert-base-uncased", head="base", attention="sdpa", **SIZES)


def ids(batch: int, length: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))


def test_sequence_longer_than_max_position_embeddings(encoder):
    encoder(input_ids=ids(1, MAX_POSITIONS))  # the longest that fits
    with pytest.raises(registry.InputError, match=f"max_position_embeddings is {MAX_POSITIONS}"):
        encoder(input_ids=ids(1, MAX_POSITIONS + 1))
    with pytest.raises(registry.InputError, match="max_position_embeddings"):
        encoder(input_ids=ids(1, 3), position_ids=torch.tensor([[0, 1, MAX_POSITIONS]]))


def test_cached_decoding_past_max_position_embeddings():
    decoder = registry.build("bert-base-uncased", head="causal-lm", is_decoder=True, **SIZES)
    out = decoder(input_ids=ids(1, MAX_POSITIONS), use_cache=True)
    with pytest.raises(registry.InputError, match=f"max_position_embeddings is {MAX_POSITIONS}"):
        decoder(input_ids=ids(1, 1), past_key_values=out.past_key_values)


def test_token_type_ids_out_of_range(encoder):
    x = ids(2, 5)
    with pytest.raises(registry.InputError, match=f"type_vocab_size is {TYPES}.*\\[0, {TYPES - 1}\\]"):
        encoder(input_ids=x, token_type_ids=torch.full_like(x, TYPES))
    with pytest.raises(registry.InputError, match="token type id -1"):
        encoder(input_ids=x, token_type_ids=torch.full_like(x, -1))
    with pytest.raises(registry.InputError, match=r"token_type_ids has shape \(2, 4\); expected \(batch=2, tokens=5\)"):
        encoder(input_ids=x, token_type_ids=torch.zeros(2, 4, dtype=torch.long))


def test_token_ids_out_of_range(encoder):
    with pytest.raises(registry.InputError, match=f"\\[0, {VOCAB - 1}\\]"):
        encoder(input_ids=torch.tensor([[1, VOCAB]]))


@pytest.mark.parametrize("shape", [(2, 4), (3, 5), (2, 1, 5), (5,)])
def test_attention_mask_shape(encoder, shape):
    with pytest.raises(registry.InputError, match=r"attention_mask has shape .*expected \(batch=2, tokens=5\)"):
        encoder(input_ids=ids(2, 5), attention_mask=torch.ones(shape, dtype=torch.long))


def test_encoder_attention_mask_shape():
    decoder = registry.build("bert-base-uncased", head="causal-lm", is_decoder=True, add_cross_attention=True, **SIZES)
    states = torch.randn(2, 6, TINY["hidden_size"])
    decoder(input_ids=ids(2, 5), encoder_hidden_states=states, encoder_attention_mask=torch.ones(2, 6))
    with pytest.raises(registry.InputError, match=r"encoder_attention_mask .*expected \(batch=2, tokens=6\)"):
        decoder(input_ids=ids(2, 5), encoder_hidden_states=states, encoder_attention_mask=torch.ones(2, 5))
    with pytest.raises(registry.InputError, match="encoder_hidden_states has shape"):
        decoder(input_ids=ids(2, 5), encoder_hidden_states=torch.randn(2, 6, 7))
    with pytest.raises(registry.InputError, match="without encoder_hidden_states"):
        decoder(input_ids=ids(2, 5), encoder_attention_mask=torch.ones(2, 6))


def test_cross_attention_inputs_need_cross_attention_layers(encoder):
    with pytest.raises(registry.InputError, match="add_cross_attention"):
        encoder(input_ids=ids(2, 5), encoder_hidden_states=torch.randn(2, 6, TINY["hidden_size"]))
    with pytest.raises(registry.InputError, match="is_decoder"):
        encoder(input_ids=ids(2, 5), past_key_values=object())


def test_multiple_choice_inputs_need_a_choice_dimension():
    model = registry.build("bert-base-uncased", head="multiple-choice", **SIZES)
    x = ids(6, 5).view(2, 3, 5)
    assert model(input_ids=x).logits.shape == (2, 3)
    with pytest.raises(registry.InputError, match="num_choices"):
        model(input_ids=ids(2, 5))
    with pytest.raises(registry.InputError, match="attention_mask has shape"):
        model(input_ids=x, attention_mask=torch.ones(2, 2, 5))


def test_labels_the_head_does_not_take(encoder):
    with pytest.raises(registry.InputError, match="does not take next_sentence_label"):
        encoder(input_ids=ids(1, 3), next_sentence_label=torch.tensor([0]))
