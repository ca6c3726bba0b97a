"""Tiny random BLOOM checkpoints written by the reference, in its layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 120
PAD = 3

CONFIGS = {
    # 6 heads: not a power of two, so ALiBi uses the interleaved extra slopes
    "h6": dict(hidden_size=48, n_layer=2, n_head=6),
    # post-LN residuals, and an epsilon far from the default so that ignoring it would show
    "h8-post-ln": dict(
        hidden_size=64, n_layer=3, n_head=8, apply_residual_connection_post_layernorm=True, layer_norm_epsilon=1e-2
    ),
    # pre-LN with widths the AMX kernel takes (multiples of 32): in bfloat16, each block's steps between
    # its attention's core and the next block's run as kernel chains (registry.fused.attention_output_and_mlp)
    "h4-kernel-widths": dict(hidden_size=64, n_layer=2, n_head=4),
    # heads of 32 values: steps with attention 'fused-decode' run as one kernel call
    # (registry.chains.run_decode_step); weights large enough for the attention to weigh in the logits
    "h2-decode-kernel": dict(hidden_size=64, n_layer=3, n_head=2, initializer_range=0.2),
    # heads of 48 values: the fused attention's dot products take a last half-chunk of 16
    "h2-decode-kernel-d48": dict(hidden_size=96, n_layer=2, n_head=2, initializer_range=0.2),
    # heads of 64 and 128 values: the prompt attention's weighted sums unrolled for them (bloom-560m, 7b1)
    "h2-decode-kernel-d64": dict(hidden_size=128, n_layer=2, n_head=2, initializer_range=0.2),
    "h2-decode-kernel-d128": dict(hidden_size=256, n_layer=2, n_head=2, initializer_range=0.2),
}

HEAD_CLASSES = {
    "base": "BloomModel",
    "causal-lm": "BloomForCausalLM",
    "sequence-classification": "BloomForSequenceClassification",
    "token-classification": "BloomForTokenClassification",
    "question-answering": "BloomForQuestionAnswering",
}


def reference_config(**overrides):
    base = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, num_labels=3)
    return transformers.BloomConfig(**{**base, **overrides})


def make_reference(head: str, config_name: str, **overrides):
    torch.manual_seed(1234)
    config = reference_config(**CONFIGS[config_name], **overrides)
    model = getattr(transformers, HEAD_CLASSES[head])(config).eval()
    # the reference zero-initialises biases: randomise them so that a dropped bias cannot hide
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model


@pytest.fixture(scope="session")
def reference_checkpoint(tmp_path_factory):
    """(head, config_name, **overrides) -> (reference model, folder it saved itself to)."""
    cache: dict = {}

    def make(head: str, config_name: str = "h6", **overrides):
        key = (head, config_name, tuple(sorted(overrides.items())))
        if key not in cache:
            model = make_reference(head, config_name, **overrides)
            folder = Path(tmp_path_factory.mktemp(f"{head}-{config_name}"))
            model.save_pretrained(folder)
            cache[key] = (model, folder)
        return cache[key]

    return make


def left_padded_batch(batch: int = 3, length: int = 9, seed: int = 0):
    """Token ids with left padding of different lengths per row, and the matching mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(batch):
        pad = (row * 2) % (length - 2)
        ids[row, :pad] = PAD
        mask[row, :pad] = 0
    return ids, mask
