"""BERT as a decoder (is_decoder): causal LM against the reference, cached decoding equal to the
uncached forward, and cross-attention (encoder_hidden_states, encoder_attention_mask) with its keys
and values computed once and cached."""

from __future__ import annotations

import pytest
import torch

import plugins.families.bert as bert_module
import registry
from registry.interfaces import EncoderDecoderCache

from .conftest import TINY, VOCAB, max_diff, right_padded_batch

TOLERANCE = {"eager": 1e-5, "sdpa": 1e-4}
ATTENTION = ["eager", "sdpa"]
CROSS = {"is_decoder": True, "add_cross_attention": True}


def encoder_states(batch: int = 3, length: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, length, TINY["hidden_size"], generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 3:] = 0
    mask[2, 1:] = 0
    return states, mask


@pytest.mark.parametrize("attention", ATTENTION)
def test_causal_lm_logits_and_loss(reference_checkpoint, attention):
    ref, folder = reference_checkpoint("causal-lm")
    ours = registry.from_pretrained(folder, attention=attention)
    assert ours.manifest["components"]["head"]["chosen"] == "causal-lm"
    assert ours.manifest["components"]["cache"]["chosen"] == "dynamic"
    ids, mask, types = right_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
        got = ours(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    tol = TOLERANCE[attention]
    assert max_diff(got.logits, expected.logits) <= tol
    assert abs(got.loss.item() - expected.loss.item()) <= tol


def test_causal_means_causal(reference_checkpoint):
    """Changing a later token does not change earlier logits."""
    _, folder = reference_checkpoint("causal-lm")
    ours = registry.from_pretrained(folder, attention="sdpa")
    ids, _, _ = right_padded_batch()
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, ours(input_ids=changed).logits
    assert torch.equal(a[:, :-1], b[:, :-1]) and not torch.equal(a[:, -1], b[:, -1])


def decode_in_steps(model, ids, *, prefill: int, **extra):
    """Logits of a prefill of ``prefill`` tokens, then one token at a time through the cache."""
    with torch.no_grad():
        out = model(input_ids=ids[:, :prefill], use_cache=True, **extra)
        logits, cache = [out.logits], out.past_key_values
        for t in range(prefill, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True, **extra)
            logits.append(out.logits)
            cache = out.past_key_values
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize("attention", ATTENTION)
def test_cached_decoding_equals_the_uncached_forward(reference_checkpoint, attention):
    ref, folder = reference_checkpoint("causal-lm")
    ours = registry.from_pretrained(folder, attention=attention)
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(input_ids=ids, use_cache=False).logits
        reference = ref(input_ids=ids, use_cache=False).logits
    stepped, cache = decode_in_steps(ours, ids, prefill=4)
    assert cache.get_seq_length() == 10
    assert max_diff(stepped, full) <= TOLERANCE[attention]
    assert max_diff(stepped, reference) <= TOLERANCE[attention]


def test_cached_decoding_with_a_growing_attention_mask(reference_checkpoint):
    """Left-padded prompts decoded step by step, the mask growing by one each step."""
    _, folder = reference_checkpoint("causal-lm")
    ours = registry.from_pretrained(folder, attention="sdpa")
    ids = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        full = ours(input_ids=ids, attention_mask=mask, use_cache=False).logits
        out = ours(input_ids=ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        steps = [out.logits]
        for t in range(5, 8):
            out = ours(
                input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=out.past_key_values
            )
            steps.append(out.logits)
    stepped = torch.cat(steps, dim=1)
    real = mask.bool()
    assert max_diff(stepped[real], full[real]) <= 1e-4


def test_generate_continues_greedily(reference_checkpoint):
    ref, folder = reference_checkpoint("causal-lm")
    ours = registry.from_pretrained(folder, attention="sdpa")
    prompt = torch.randint(1, VOCAB, (2, 4), generator=torch.Generator().manual_seed(5))
    tokens = ours.generate(prompt, max_new_tokens=5)
    assert tokens.shape == (2, 9) and torch.equal(tokens[:, :4], prompt)
    # every new token is the argmax of the reference's logits over what came before
    with torch.no_grad():
        logits = ref(input_ids=tokens[:, :-1]).logits
    assert torch.equal(logits[:, 3:].argmax(-1), tokens[:, 4:])


@pytest.mark.parametrize("attention", ATTENTION)
def test_cross_attention(reference_checkpoint, attention):
    ref, folder = reference_checkpoint("causal-lm", **CROSS)
    ours = registry.from_pretrained(folder, attention=attention)
    ids, mask, types = right_padded_batch()
    states, states_mask = encoder_states()
    labels = ids.masked_fill(mask == 0, -100)
    inputs = dict(
        input_ids=ids,
        attention_mask=mask,
        token_type_ids=types,
        encoder_hidden_states=states,
        encoder_attention_mask=states_mask,
        labels=labels,
    )
    with torch.no_grad():
        expected, got = ref(**inputs), ours(**inputs)
    tol = TOLERANCE[attention]
    assert max_diff(got.logits, expected.logits) <= tol
    assert abs(got.loss.item() - expected.loss.item()) <= tol
    # the encoder states matter
    with torch.no_grad():
        other = ours(**{**inputs, "encoder_hidden_states": states.flip(1)})
    assert max_diff(other.logits, got.logits) > 1e-3


def test_cross_attention_weights(reference_checkpoint):
    ref, folder = reference_checkpoint("causal-lm", **CROSS)
    ours = registry.from_pretrained(folder, attention="eager")
    ids, mask, types = right_padded_batch()
    states, states_mask = encoder_states()
    inputs = dict(input_ids=ids, attention_mask=mask, encoder_hidden_states=states, encoder_attention_mask=states_mask)
    with torch.no_grad():
        expected = ref(**inputs, output_attentions=True)
        got = ours(**inputs, output_attentions=True)
    assert len(got.cross_attentions) == len(expected.cross_attentions) == TINY["num_hidden_layers"]
    for a, b in zip(got.cross_attentions, expected.cross_attentions, strict=True):
        assert max_diff(a, b) <= 1e-5
    for a, b in zip(got.attentions, expected.attentions, strict=True):
        assert max_diff(a, b) <= 1e-5


@pytest.mark.parametrize("attention", ATTENTION)
def test_cross_attention_keys_and_values_are_computed_once(reference_checkpoint, attention, monkeypatch):
    ref, folder = reference_checkpoint("causal-lm", **CROSS)
    ours = registry.from_pretrained(folder, attention=attention)
    ids = torch.randint(1, VOCAB, (3, 8), generator=torch.Generator().manual_seed(6))
    states, states_mask = encoder_states()
    extra = dict(encoder_hidden_states=states, encoder_attention_mask=states_mask)
    cross_keys = {id(layer.crossattention.self.key) for layer in ours.bert.encoder.layer}
    calls = []
    original = bert_module.linear

    def counting(x, layers, **options):
        if any(id(layer) in cross_keys for layer in (layers if isinstance(layers, tuple) else (layers,))):
            calls.append(x.shape)
        return original(x, layers, **options)

    monkeypatch.setattr(bert_module, "linear", counting)
    with torch.no_grad():
        first = ours(input_ids=ids[:, :3], use_cache=True, **extra).past_key_values
    cached = list(first.cross_attention)
    stepped, cache = decode_in_steps(ours, ids, prefill=3, **extra)
    assert isinstance(cache, EncoderDecoderCache)
    # once per layer per cache (two caches here: `first` and the one decode_in_steps made), not once per step
    assert len(calls) == 2 * TINY["num_hidden_layers"]
    assert all(k.shape == (3, TINY["num_attention_heads"], 5, 8) for k, _ in cached)
    with torch.no_grad():
        full = ours(input_ids=ids, use_cache=False, **extra).logits
        reference = ref(input_ids=ids, use_cache=False, **extra).logits
    assert max_diff(stepped, full) <= TOLERANCE[attention]
    assert max_diff(stepped, reference) <= TOLERANCE[attention]


def test_encoder_has_no_cache_and_decoder_heads_need_a_decoder():
    encoder = registry.build("bert-base-uncased", **{k: v for k, v in TINY.items() if k != "num_labels"})
    assert encoder.manifest["components"]["cache"]["chosen"] is None
    out = encoder(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
    assert "past_key_values" not in out
    with pytest.raises(registry.IncompatibleComponentsError, match="causal"):
        registry.build("bert-base-uncased", head="causal-lm", num_hidden_layers=1, device="meta")
    with pytest.raises(registry.IncompatibleComponentsError, match="encoder"):
        registry.build("bert-base-uncased", cache="dynamic", num_hidden_layers=1, device="meta")
    decoder = registry.build("bert-base-uncased", head="causal-lm", is_decoder=True, num_hidden_layers=1, device="meta")
    assert decoder.manifest["components"]["cache"]["chosen"] == "dynamic"
    with pytest.raises(registry.InvalidSpecError, match="is_decoder"):
        registry.spec("bert-base-uncased", add_cross_attention=True)


@pytest.mark.parametrize("position", ["relative-key", "relative-key-query"])
def test_cached_decoding_with_relative_positions(position):
    """Distances between the actual positions, with or without a cache (the reference 4.56 measured every
    cached query from the last key; ours is checked against its own uncached forward)."""
    sizes = {k: v for k, v in TINY.items() if k != "num_labels"}
    model = registry.build("bert-base-uncased", head="causal-lm", is_decoder=True, position=position, **sizes)
    with torch.no_grad():
        for table in model.bert.position.distance_embedding:
            table.weight.normal_(0, 1.0)  # large enough that a wrong distance shows
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
    stepped, _ = decode_in_steps(model, ids, prefill=4)
    assert max_diff(stepped, full) <= 1e-4


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("attention", ATTENTION)
def test_greedy_generation_is_the_reference_s_with_left_padding(reference_checkpoint, attention, cache):
    """BERT as a decoder generates through either cache; with left padding the positions count real
    tokens only, as the reference's generate() passes them."""
    ref, folder = reference_checkpoint("causal-lm")
    ours = registry.from_pretrained(folder, attention=attention, cache=cache)
    ids = torch.randint(1, VOCAB, (3, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        expected = ref.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[], pad_token_id=0)
    assert torch.equal(got, expected)
