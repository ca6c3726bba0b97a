"""BLOOM against the reference (transformers) on the same weights: every head, both attention
backends, left padding, labels, hidden states, attention weights, cached decoding."""

from __future__ import annotations

import pytest
import torch

import registry

from .conftest import CONFIGS, PAD, VOCAB, left_padded_batch

TOLERANCE = {"eager": 1e-5, "sdpa": 1e-4}
ATTENTION = ["eager", "sdpa"]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("attention", ATTENTION)
def test_causal_lm_logits_loss_hidden_states(reference_checkpoint, config_name, attention):
    ref, folder = reference_checkpoint("causal-lm", config_name)
    ours = registry.from_pretrained(folder, attention=attention)
    assert ours.manifest["components"]["head"]["chosen"] == "causal-lm"  # from config.json's architectures
    ids, mask = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
        got = ours(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    tol = TOLERANCE[attention]
    assert max_diff(got.logits, expected.logits) <= tol
    assert abs(got.loss.item() - expected.loss.item()) <= tol
    assert len(got.hidden_states) == len(expected.hidden_states) == CONFIGS[config_name]["n_layer"] + 1
    for a, b in zip(got.hidden_states, expected.hidden_states, strict=True):
        assert max_diff(a, b) <= tol


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_eager_attention_weights(reference_checkpoint, config_name):
    ref, folder = reference_checkpoint("causal-lm", config_name)
    ours = registry.from_pretrained(folder, attention="eager")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, output_attentions=True)
        got = ours(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(got.attentions) == len(expected.attentions)
    for a, b in zip(got.attentions, expected.attentions, strict=True):
        assert max_diff(a, b) <= 1e-5


def test_sdpa_refuses_attention_weights_clearly(reference_checkpoint):
    _, folder = reference_checkpoint("causal-lm")
    ours = registry.from_pretrained(folder, attention="sdpa")
    with pytest.raises(registry.CapabilityError, match="eager"):
        ours(input_ids=torch.tensor([[5, 6]]), output_attentions=True)


@pytest.mark.parametrize("attention", ATTENTION)
def test_base_model(reference_checkpoint, attention):
    ref, folder = reference_checkpoint("base")
    ours = registry.from_pretrained(folder, attention=attention)
    assert ours.manifest["components"]["head"]["chosen"] == "base"
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask)
        got = ours(input_ids=ids, attention_mask=mask)
    assert max_diff(got.last_hidden_state, expected.last_hidden_state) <= TOLERANCE[attention]


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize(
    "problem_type,labels",
    [
        (None, torch.tensor([0, 2, 1])),  # inferred: single-label
        ("single_label_classification", torch.tensor([1, 0, 2])),
        ("multi_label_classification", torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])),
        ("regression", torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.0, 0.3], [1.0, 1.0, 1.0]])),
    ],
)
def test_sequence_classification(reference_checkpoint, attention, problem_type, labels):
    ref, folder = reference_checkpoint("sequence-classification", problem_type=problem_type)
    ours = registry.from_pretrained(folder, attention=attention)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, labels=labels)
        got = ours(input_ids=ids, attention_mask=mask, labels=labels)
    tol = TOLERANCE[attention]
    assert got.logits.shape == (3, 3)
    assert max_diff(got.logits, expected.logits) <= tol
    assert abs(got.loss.item() - expected.loss.item()) <= tol


def test_sequence_classification_regression_single_label(reference_checkpoint):
    ref, folder = reference_checkpoint("sequence-classification", num_labels=1)
    ours = registry.from_pretrained(folder, attention="eager")
    ids, mask = left_padded_batch()
    labels = torch.tensor([0.3, -0.2, 1.5])
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, labels=labels)
        got = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert max_diff(got.logits, expected.logits) <= 1e-5
    assert abs(got.loss.item() - expected.loss.item()) <= 1e-5


def test_sequence_classification_right_padding_uses_last_real_token(reference_checkpoint):
    ref, folder = reference_checkpoint("sequence-classification")
    ours = registry.from_pretrained(folder, attention="eager")
    ids = torch.tensor([[7, 8, 9, PAD, PAD], [10, 11, 12, 13, 14]])
    mask = (ids != PAD).long()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask)
        got = ours(input_ids=ids, attention_mask=mask)
    assert max_diff(got.logits, expected.logits) <= 1e-5


@pytest.mark.parametrize("attention", ATTENTION)
def test_token_classification(reference_checkpoint, attention):
    ref, folder = reference_checkpoint("token-classification")
    ours = registry.from_pretrained(folder, attention=attention)
    ids, mask = left_padded_batch()
    labels = torch.randint(0, 3, ids.shape).masked_fill(mask == 0, -100)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, labels=labels)
        got = ours(input_ids=ids, attention_mask=mask, labels=labels)
    tol = TOLERANCE[attention]
    assert max_diff(got.logits, expected.logits) <= tol
    assert abs(got.loss.item() - expected.loss.item()) <= tol
    assert "past_key_values" not in got  # the reference's TokenClassifierOutput has no cache


@pytest.mark.parametrize("attention", ATTENTION)
def test_question_answering(reference_checkpoint, attention):
    ref, folder = reference_checkpoint("question-answering")
    ours = registry.from_pretrained(folder, attention=attention)
    ids, mask = left_padded_batch()
    start, end = torch.tensor([3, 5, 40]), torch.tensor([4, 8, 2])  # 40: outside the sequence, ignored
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, start_positions=start, end_positions=end)
        got = ours(input_ids=ids, attention_mask=mask, start_positions=start, end_positions=end)
    tol = TOLERANCE[attention]
    assert max_diff(got.start_logits, expected.start_logits) <= tol
    assert max_diff(got.end_logits, expected.end_logits) <= tol
    assert abs(got.loss.item() - expected.loss.item()) <= tol


@pytest.mark.parametrize("attention", ATTENTION)
def test_cached_decoding_equals_uncached_forward(reference_checkpoint, attention):
    ref, folder = reference_checkpoint("causal-lm", "h8-post-ln")
    ours = registry.from_pretrained(folder, attention=attention)
    ids, mask = left_padded_batch(length=10)
    prompt, rest = 6, 4
    with torch.no_grad():
        full = ours(input_ids=ids, attention_mask=mask).logits
        out = ours(input_ids=ids[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for t in range(prompt, prompt + rest):
            out = ours(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache)
            cache = out.past_key_values
            steps.append(out.logits)
        reference_full = ref(input_ids=ids, attention_mask=mask).logits
    stepped = torch.cat(steps, dim=1)
    real = mask.bool()  # padded positions have no meaning; compare every real token
    assert max_diff(stepped[real], full[real]) <= TOLERANCE[attention]
    assert max_diff(stepped[real], reference_full[real]) <= TOLERANCE[attention]
    assert cache.get_seq_length() == prompt + rest


def test_padded_positions_match_the_reference_too(reference_checkpoint):
    """Fully masked query rows (left padding) give the reference's uniform attention, not NaN."""
    ref, folder = reference_checkpoint("causal-lm")
    ours = registry.from_pretrained(folder, attention="sdpa")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask).logits
        expected = ref(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(got).all()
    assert max_diff(got, expected) <= 1e-4


@pytest.mark.parametrize("attention", ATTENTION)
def test_pretraining_tp_slow_but_exact(reference_checkpoint, attention):
    ref, folder = reference_checkpoint("causal-lm", pretraining_tp=2, slow_but_exact=True)
    ours = registry.from_pretrained(folder, attention=attention)
    assert ours.config.slow_but_exact and ours.config.pretraining_tp == 2
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    assert max_diff(got, expected) <= TOLERANCE[attention]


def test_inputs_embeds(reference_checkpoint):
    ref, folder = reference_checkpoint("causal-lm")
    ours = registry.from_pretrained(folder, attention="eager")
    ids, mask = left_padded_batch()
    embeds = ref.transformer.word_embeddings(ids).detach()
    with torch.no_grad():
        expected = ref(inputs_embeds=embeds, attention_mask=mask).logits
        got = ours(inputs_embeds=embeds, attention_mask=mask).logits
    assert max_diff(got, expected) <= 1e-5


def test_return_dict_false_gives_the_reference_tuple(reference_checkpoint):
    ref, folder = reference_checkpoint("causal-lm")
    ours = registry.from_pretrained(folder, attention="eager")
    ids = torch.randint(4, VOCAB, (2, 5))
    with torch.no_grad():
        expected = ref(input_ids=ids, labels=ids, return_dict=False, use_cache=False)
        got = ours(input_ids=ids, labels=ids, return_dict=False, use_cache=False)
    assert len(got) == len(expected) == 2  # (loss, logits)
    assert max_diff(got[1], expected[1]) <= 1e-5


@pytest.mark.parametrize("which", ["hidden_dropout", "attention_dropout"])
@pytest.mark.parametrize("attention", ATTENTION)
def test_dropout_is_active_in_training_only(which, attention):
    model = registry.build(
        "bloom-560m", n_layer=2, hidden_size=32, n_head=4, vocab_size=VOCAB, attention=attention, **{which: 0.5}
    )
    with torch.no_grad():  # sharper attention, so that dropping attention probabilities shows
        for block in model.backbone.h:
            block.self_attention.query_key_value.weight.mul_(20)
    ids = torch.randint(4, VOCAB, (2, 6))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
        assert torch.equal(a, b)
        model.train()
        c = model(input_ids=ids, use_cache=False).logits
    assert not torch.allclose(a, c)


def test_bfloat16_load_and_forward(reference_checkpoint):
    ref, folder = reference_checkpoint("causal-lm")
    ours = registry.from_pretrained(folder, attention="sdpa", dtype="bfloat16")
    assert ours.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    ids, mask = left_padded_batch()
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask).logits.float()
        expected = ref(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    # bf16 has 8 bits of mantissa: agreement to a few percent of the logit scale
    assert max_diff(got[real], expected[real]) <= 0.05 * expected.abs().max().item()


@pytest.mark.parametrize("attention", ATTENTION)
def test_alibi_bias_is_built_once_per_forward(monkeypatch, attention):
    """Every layer shares one ALiBi bias; its tensor is materialised once per forward (sdpa folds it
    into the mask once), not once per layer."""
    from registry.interfaces import AlibiBias

    built = []
    original = AlibiBias.materialize

    def counting(self, q, k):
        if (q.dtype, q.device) not in self._memo:
            built.append(id(self))
        return original(self, q, k)

    monkeypatch.setattr(AlibiBias, "materialize", counting)
    model = registry.build("bloom-560m", n_layer=4, hidden_size=32, n_head=4, vocab_size=VOCAB, attention=attention)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert len(built) == 1
