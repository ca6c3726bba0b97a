"""Checkpoints in the reference's layout: both directions, prefixes, shards, dtype, strictness."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import registry

from .conftest import VOCAB, left_padded_batch, transformers


def test_saved_here_loads_in_the_reference(reference_checkpoint, tmp_path):
    _, folder = reference_checkpoint("causal-lm")
    ours = registry.from_pretrained(folder, attention="eager")
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["BloomForCausalLM"] and config["model_type"] == "bloom"
    back = transformers.BloomForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        assert torch.allclose(
            back(input_ids=ids, attention_mask=mask).logits, ours(input_ids=ids, attention_mask=mask).logits, atol=1e-5
        )


@pytest.mark.parametrize("head", ["sequence-classification", "token-classification", "question-answering", "base"])
def test_every_head_round_trips_through_the_reference(reference_checkpoint, tmp_path, head):
    _, folder = reference_checkpoint(head)
    ours = registry.from_pretrained(folder, attention="eager")
    ours.save_pretrained(tmp_path)
    cls = getattr(transformers, json.loads((tmp_path / "config.json").read_text())["architectures"][0])
    back = cls.from_pretrained(tmp_path).eval()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        a, b = back(input_ids=ids, attention_mask=mask), ours(input_ids=ids, attention_mask=mask)
    assert torch.allclose(a[0], b[0], atol=1e-5)


def test_random_build_saves_and_reloads_identically(tmp_path):
    model = registry.build("bloom-560m", n_layer=2, hidden_size=32, n_head=4, vocab_size=VOCAB)
    model.save_pretrained(tmp_path)
    again = registry.from_pretrained(tmp_path)
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)
    assert again.spec.config == model.spec.config


def test_checkpoint_without_the_base_prefix(reference_checkpoint, tmp_path):
    """The original bigscience checkpoints store BloomForCausalLM keys without 'transformer.'."""
    ref, folder = reference_checkpoint("causal-lm")
    tensors = load_file(folder / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, tmp_path / "model.safetensors")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    ours = registry.from_pretrained(tmp_path, attention="eager")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        assert torch.allclose(
            ours(input_ids=ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits, atol=1e-5
        )


def test_sharded_checkpoint_with_index(reference_checkpoint, tmp_path):
    ref, folder = reference_checkpoint("causal-lm")
    ours = registry.from_pretrained(folder)
    registry.save_pretrained(ours, tmp_path, max_shard_bytes=20_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    again = registry.from_pretrained(tmp_path, attention="eager")
    assert again.manifest["checkpoint"]["files"] == shards
    back = transformers.BloomForCausalLM.from_pretrained(tmp_path).eval()  # the reference reads our shards
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(again(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5)
        assert torch.allclose(back(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5)


def test_dtype_on_load(reference_checkpoint):
    _, folder = reference_checkpoint("causal-lm")
    model = registry.from_pretrained(folder, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.spec.dtype == "bfloat16"


_PEAK_SCRIPT = """
import sys, torch, registry
def rss():  # resident bytes now (memory-mapped weight pages count once they are read)
    return int(open('/proc/self/statm').read().split()[1]) * 4096
registry.from_pretrained(sys.argv[2])  # warm up: code paths and allocator, not weights
before = rss()
model = registry.from_pretrained(sys.argv[1])
with torch.no_grad():
    touched = sum(float(p.sum()) for p in model.parameters())
print(rss() - before)
"""


def test_loading_holds_one_copy_of_the_weights(tmp_path):
    """The peak memory of a load grows by about one copy of the weights, not two."""
    import subprocess
    import sys

    model = registry.build("bloom-560m", n_layer=2, hidden_size=512, n_head=8, vocab_size=16000)
    model.save_pretrained(tmp_path / "big")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    registry.build("bloom-560m", n_layer=1, hidden_size=16, n_head=2, vocab_size=100).save_pretrained(tmp_path / "tiny")
    command = [sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / "big"), str(tmp_path / "tiny")]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    growth = int(result.stdout.strip().splitlines()[-1])
    assert 0.5 * weight_bytes < growth < 1.5 * weight_bytes, (
        f"loading grew memory by {growth / weight_bytes:.2f}x the weights"
    )


def test_head_from_base_checkpoint_is_initialised_and_reported(reference_checkpoint):
    _, folder = reference_checkpoint("base")
    model = registry.from_pretrained(folder, head="sequence-classification")
    report = model.manifest["checkpoint"]
    assert report["initialized"] == ["score.weight"]
    assert model.head.score.weight.abs().sum() > 0


def test_base_from_task_checkpoint_reports_dropped_head_keys(reference_checkpoint):
    _, folder = reference_checkpoint("token-classification")
    model = registry.from_pretrained(folder, head="base")
    assert sorted(model.manifest["checkpoint"]["unused"]) == ["classifier.bias", "classifier.weight"]


def test_missing_tensors_are_listed(reference_checkpoint, tmp_path):
    _, folder = reference_checkpoint("causal-lm")
    tensors = load_file(folder / "model.safetensors")
    del tensors["transformer.h.1.mlp.dense_4h_to_h.weight"], tensors["transformer.ln_f.bias"]
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(folder / "config.json", tmp_path)
    with pytest.raises(
        registry.CheckpointError,
        match=r"transformer\.h\.1\.mlp\.dense_4h_to_h\.weight.*ln_f\.bias|ln_f\.bias.*dense_4h_to_h",
    ):
        registry.from_pretrained(tmp_path)


def test_misshaped_tensors_are_listed(reference_checkpoint, tmp_path):
    _, folder = reference_checkpoint("causal-lm")
    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.h.0.self_attention.dense.weight"] = torch.zeros(48, 40)
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(folder / "config.json", tmp_path)
    with pytest.raises(
        registry.CheckpointError,
        match=r"h\.0\.self_attention\.dense\.weight: checkpoint \[48, 40\] vs model \[48, 48\]",
    ):
        registry.from_pretrained(tmp_path)


def test_unexpected_backbone_tensors_are_an_error(reference_checkpoint, tmp_path):
    _, folder = reference_checkpoint("causal-lm")
    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.h.7.mlp.dense_4h_to_h.weight"] = torch.zeros(2, 2)
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(folder / "config.json", tmp_path)
    with pytest.raises(registry.CheckpointError, match=r"does not: transformer\.h\.7"):
        registry.from_pretrained(tmp_path)


def test_truncated_safetensors_file(reference_checkpoint, tmp_path):
    _, folder = reference_checkpoint("causal-lm")
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    shutil.copy(folder / "config.json", tmp_path)
    with pytest.raises(registry.CheckpointError, match="model.safetensors"):
        registry.from_pretrained(tmp_path)


def test_folder_without_weights_or_config(tmp_path):
    with pytest.raises(registry.CheckpointError, match="config.json"):
        registry.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bloom"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(registry.CheckpointError, match="pickled weights are not loaded"):
        registry.from_pretrained(tmp_path)
    with pytest.raises(registry.CheckpointError, match="does not exist"):
        registry.from_pretrained(tmp_path / "nowhere")


def test_config_maps_to_spec_and_back(reference_checkpoint, tmp_path):
    ref, folder = reference_checkpoint("sequence-classification", "h8-post-ln", problem_type="regression")
    model = registry.from_pretrained(folder)
    assert model.config.apply_residual_connection_post_layernorm is True
    assert model.spec.task.problem_type == "regression" and model.spec.task.num_labels == 3
    model.save_pretrained(tmp_path)
    back = transformers.AutoConfig.from_pretrained(tmp_path)
    for field in (
        "hidden_size",
        "n_layer",
        "n_head",
        "vocab_size",
        "layer_norm_epsilon",
        "pad_token_id",
        "problem_type",
        "num_labels",
    ):
        assert getattr(back, field) == getattr(ref.config, field), field
