"""Tiny random BERT checkpoints written by the reference (transformers 5), in its layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 99
PAD = 0
MAX_POSITIONS = 24
TYPES = 2

TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=MAX_POSITIONS,
    type_vocab_size=TYPES,
    pad_token_id=PAD,
    num_labels=3,
)

HEAD_CLASSES = {
    "base": "BertModel",
    "pretraining": "BertForPreTraining",
    "causal-lm": "BertLMHeadModel",
    "masked-lm": "BertForMaskedLM",
    "next-sentence": "BertForNextSentencePrediction",
    "sequence-classification": "BertForSequenceClassification",
    "multiple-choice": "BertForMultipleChoice",
    "token-classification": "BertForTokenClassification",
    "question-answering": "BertForQuestionAnswering",
}


def reference_config(**overrides):
    config = transformers.BertConfig(**{**TINY, **overrides})
    config._attn_implementation = "eager"  # the reference's plainest path is the yardstick
    return config


def randomize(model):
    """The reference zero-initialises biases and sets LayerNorm weights to one: randomise them so that a
    dropped bias or a swapped LayerNorm cannot hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
            elif "LayerNorm.weight" in name:
                p.normal_(1.0, 0.1)
    return model


def make_reference(head: str, **overrides):
    torch.manual_seed(1234)
    if head == "causal-lm":
        overrides = {"is_decoder": True, **overrides}
    model = getattr(transformers, HEAD_CLASSES[head])(reference_config(**overrides))
    return randomize(model).eval()


@pytest.fixture(scope="session")
def reference_checkpoint(tmp_path_factory):
    """(head, **config overrides) -> (reference model, the folder it saved itself to)."""
    cache: dict = {}

    def make(head: str, **overrides):
        key = (head, tuple(sorted(overrides.items())))
        if key not in cache:
            model = make_reference(head, **overrides)
            folder = Path(tmp_path_factory.mktemp(f"bert-{head}"))
            model.save_pretrained(folder)
            cache[key] = (model, folder)
        return cache[key]

    return make


def right_padded_batch(batch: int = 3, length: int = 9, seed: int = 0):
    """(input_ids, attention_mask, token_type_ids): right padding of different lengths per row, and two
    segments per row (sentence A: type 0, sentence B: type 1), as a tokenizer makes for pairs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    types = torch.zeros_like(ids)
    for row in range(batch):
        real = length - (row * 3) % (length - 2)
        ids[row, real:] = PAD
        mask[row, real:] = 0
        types[row, real // 2 : real] = 1
    return ids, mask, types


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()
