"""BERT against the reference (transformers 5) on the same weights: every head, eager and sdpa, with
token_type_ids, right padding, labels for every problem_type, hidden states and attention weights."""

from __future__ import annotations

import pytest
import torch

import registry

from .conftest import TINY, VOCAB, max_diff, right_padded_batch, transformers

TOLERANCE = {"eager": 1e-5, "sdpa": 1e-4}
ATTENTION = ["eager", "sdpa"]


def run_both(ref, ours, **inputs):
    with torch.no_grad():
        return ref(**inputs), ours(**inputs)


@pytest.mark.parametrize("attention", ATTENTION)
def test_base_model_with_pooler_and_hidden_states(reference_checkpoint, attention):
    ref, folder = reference_checkpoint("base")
    ours = registry.from_pretrained(folder, attention=attention)
    assert ours.manifest["components"]["head"]["chosen"] == "base"
    assert ours.manifest["components"]["position"]["chosen"] == "absolute"
    ids, mask, types = right_padded_batch()
    expected, got = run_both(
        ref, ours, input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True
    )
    tol = TOLERANCE[attention]
    assert max_diff(got.last_hidden_state, expected.last_hidden_state) <= tol
    assert max_diff(got.pooler_output, expected.pooler_output) <= tol
    assert len(got.hidden_states) == len(expected.hidden_states) == TINY["num_hidden_layers"] + 1
    for a, b in zip(got.hidden_states, expected.hidden_states, strict=True):
        assert max_diff(a, b) <= tol


def test_token_types_and_padding_matter(reference_checkpoint):
    """The parity above is not vacuous: token types and the mask change the output."""
    _, folder = reference_checkpoint("base")
    ours = registry.from_pretrained(folder, attention="eager")
    ids, mask, types = right_padded_batch()
    with torch.no_grad():
        full = ours(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        no_types = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        no_mask = ours(input_ids=ids, token_type_ids=types).last_hidden_state
    assert max_diff(full, no_types) > 1e-2
    assert max_diff(full[1:], no_mask[1:]) > 1e-2  # rows 1 and 2 are padded


def test_inputs_embeds_and_position_ids(reference_checkpoint):
    ref, folder = reference_checkpoint("base")
    ours = registry.from_pretrained(folder, attention="eager")
    ids, mask, types = right_padded_batch()
    embeds = ref.embeddings.word_embeddings(ids).detach()
    positions = torch.arange(2, 2 + ids.shape[1]).expand_as(ids)
    expected, got = run_both(
        ref, ours, inputs_embeds=embeds, attention_mask=mask, token_type_ids=types, position_ids=positions
    )
    assert max_diff(got.last_hidden_state, expected.last_hidden_state) <= 1e-5


@pytest.mark.parametrize("attention", ATTENTION)
def test_masked_lm(reference_checkpoint, attention):
    ref, folder = reference_checkpoint("masked-lm")
    ours = registry.from_pretrained(folder, attention=attention)
    assert ours.manifest["components"]["head"]["chosen"] == "masked-lm"
    assert ours.bert.pooler is None  # as the reference's BertForMaskedLM
    ids, mask, types = right_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, ::2] = -100
    expected, got = run_both(ref, ours, input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    tol = TOLERANCE[attention]
    assert max_diff(got.logits, expected.logits) <= tol
    assert abs(got.loss.item() - expected.loss.item()) <= tol


def test_masked_lm_decoder_is_tied_with_its_own_bias(reference_checkpoint):
    _, folder = reference_checkpoint("masked-lm")
    ours = registry.from_pretrained(folder)
    predictions = ours.head.predictions
    assert predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    assert "head.predictions.bias" in dict(ours.named_parameters())
    assert not any(name.startswith("head.predictions.decoder") for name, _ in ours.named_parameters())


@pytest.mark.parametrize("attention", ATTENTION)
def test_pretraining(reference_checkpoint, attention):
    ref, folder = reference_checkpoint("pretraining")
    ours = registry.from_pretrained(folder, attention=attention)
    assert ours.manifest["components"]["head"]["chosen"] == "pretraining"
    ids, mask, types = right_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    nsp = torch.tensor([0, 1, 1])
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels, next_sentence_label=nsp)
    expected, got = run_both(ref, ours, **inputs)
    tol = TOLERANCE[attention]
    assert max_diff(got.prediction_logits, expected.prediction_logits) <= tol
    assert max_diff(got.seq_relationship_logits, expected.seq_relationship_logits) <= tol
    assert abs(got.loss.item() - expected.loss.item()) <= tol
    # the reference computes the loss only with both labels
    with torch.no_grad():
        assert ours(input_ids=ids, attention_mask=mask, labels=labels).loss is None


@pytest.mark.parametrize("attention", ATTENTION)
def test_next_sentence(reference_checkpoint, attention):
    ref, folder = reference_checkpoint("next-sentence")
    ours = registry.from_pretrained(folder, attention=attention)
    ids, mask, types = right_padded_batch()
    labels = torch.tensor([1, 0, 1])
    expected, got = run_both(ref, ours, input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    tol = TOLERANCE[attention]
    assert max_diff(got.logits, expected.logits) <= tol
    assert abs(got.loss.item() - expected.loss.item()) <= tol


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize(
    "problem_type,num_labels,labels",
    [
        (None, 3, torch.tensor([0, 2, 1])),  # inferred: single-label
        (None, 1, torch.tensor([0.5, -1.0, 2.0])),  # inferred: regression
        (None, 3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])),  # inferred: multi-label
        ("single_label_classification", 3, torch.tensor([1, 0, 2])),
        ("multi_label_classification", 3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])),
        ("regression", 3, torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.0, 0.3], [1.0, 1.0, 1.0]])),
        ("regression", 1, torch.tensor([0.5, -1.0, 2.0])),
    ],
)
def test_sequence_classification(reference_checkpoint, attention, problem_type, num_labels, labels):
    overrides = {"num_labels": num_labels}
    if problem_type is not None:
        overrides["problem_type"] = problem_type
    ref, folder = reference_checkpoint("sequence-classification", **overrides)
    ours = registry.from_pretrained(folder, attention=attention)
    assert ours.spec.task.num_labels == num_labels and ours.spec.task.problem_type == problem_type
    ids, mask, types = right_padded_batch()
    expected, got = run_both(ref, ours, input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    ref.config.problem_type = problem_type  # the reference remembers the type it inferred; reset it
    tol = TOLERANCE[attention]
    assert max_diff(got.logits, expected.logits) <= tol
    assert abs(got.loss.item() - expected.loss.item()) <= tol


@pytest.mark.parametrize("attention", ATTENTION)
def test_multiple_choice(reference_checkpoint, attention):
    ref, folder = reference_checkpoint("multiple-choice")
    ours = registry.from_pretrained(folder, attention=attention)
    ids, mask, types = right_padded_batch(batch=6, length=7)
    ids, mask, types = (t.view(2, 3, 7) for t in (ids, mask, types))  # (batch, choices, tokens)
    labels = torch.tensor([2, 0])
    expected, got = run_both(ref, ours, input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    assert got.logits.shape == (2, 3)
    tol = TOLERANCE[attention]
    assert max_diff(got.logits, expected.logits) <= tol
    assert abs(got.loss.item() - expected.loss.item()) <= tol


@pytest.mark.parametrize("attention", ATTENTION)
def test_token_classification(reference_checkpoint, attention):
    ref, folder = reference_checkpoint("token-classification")
    ours = registry.from_pretrained(folder, attention=attention)
    ids, mask, types = right_padded_batch()
    labels = (ids % 3).masked_fill(mask == 0, -100)
    expected, got = run_both(ref, ours, input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    tol = TOLERANCE[attention]
    assert max_diff(got.logits, expected.logits) <= tol
    assert abs(got.loss.item() - expected.loss.item()) <= tol


@pytest.mark.parametrize("attention", ATTENTION)
def test_question_answering(reference_checkpoint, attention):
    ref, folder = reference_checkpoint("question-answering", num_labels=2)
    ours = registry.from_pretrained(folder, attention=attention)
    ids, mask, types = right_padded_batch()
    start, end = torch.tensor([1, 3, 40]), torch.tensor([4, 5, 2])  # 40: outside the sequence, ignored
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types, start_positions=start, end_positions=end)
    expected, got = run_both(ref, ours, **inputs)
    tol = TOLERANCE[attention]
    assert max_diff(got.start_logits, expected.start_logits) <= tol
    assert max_diff(got.end_logits, expected.end_logits) <= tol
    assert abs(got.loss.item() - expected.loss.item()) <= tol


def test_eager_attention_weights(reference_checkpoint):
    ref, folder = reference_checkpoint("base")
    ours = registry.from_pretrained(folder, attention="eager")
    ids, mask, types = right_padded_batch()
    expected, got = run_both(
        ref, ours, input_ids=ids, attention_mask=mask, token_type_ids=types, output_attentions=True
    )
    assert len(got.attentions) == len(expected.attentions) == TINY["num_hidden_layers"]
    for a, b in zip(got.attentions, expected.attentions, strict=True):
        assert max_diff(a, b) <= 1e-5


@pytest.mark.parametrize("hidden_act", ["gelu_new", "gelu_pytorch_tanh", "relu", "silu"])
def test_hidden_act_from_the_config(reference_checkpoint, hidden_act):
    ref, folder = reference_checkpoint("masked-lm", hidden_act=hidden_act)
    ours = registry.from_pretrained(folder, attention="eager")
    assert ours.config.hidden_act == hidden_act
    ids, mask, types = right_padded_batch()
    expected, got = run_both(ref, ours, input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert max_diff(got.logits, expected.logits) <= 1e-5


def test_untied_decoder(reference_checkpoint):
    ref, folder = reference_checkpoint("masked-lm", tie_word_embeddings=False)
    ours = registry.from_pretrained(folder, attention="eager")
    assert ours.head.predictions.decoder.weight is not ours.bert.embeddings.word_embeddings.weight
    ids, mask, types = right_padded_batch()
    expected, got = run_both(ref, ours, input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert max_diff(got.logits, expected.logits) <= 1e-5


@pytest.mark.parametrize("head", ["base", "sequence-classification", "masked-lm", "multiple-choice", "pretraining"])
def test_random_build_matches_the_reference_on_its_weights(head, tmp_path):
    """Built here with random weights, saved, loaded by the reference: same outputs."""
    model = registry.build(
        "bert-base-uncased",
        head=head,
        attention="sdpa",
        **{k: v for k, v in TINY.items() if k != "num_labels"},
    )
    model.save_pretrained(tmp_path)
    ref = getattr(transformers, model.family.architectures[head]).from_pretrained(tmp_path).eval()
    ids, mask, types = right_padded_batch()
    if head == "multiple-choice":
        ids, mask, types = right_padded_batch(batch=4, length=9)
        ids, mask, types = (t.view(2, 2, 9) for t in (ids, mask, types))
    expected, got = run_both(ref, model, input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert max_diff(got[0], expected[0]) <= 1e-4
    assert model.config.vocab_size == VOCAB
