"""Relative positions (relative-key, relative-key-query) against transformers 4.56.2.

Transformers 5 dropped them, so the reference's outputs were written once by
tests/bert/make_relative_reference.py (its docstring has the command) into tests/bert/data/<type>/:
the reference's own checkpoint, its inputs and its outputs. Loading that checkpoint here also checks
the key mapping of the per-layer distance tables and the unused absolute table the reference keeps.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import registry

from .conftest import max_diff

DATA = Path(__file__).parent / "data"
KINDS = {"relative_key": "relative-key", "relative_key_query": "relative-key-query"}
TOLERANCE = {"eager": 1e-5, "sdpa": 1e-4}


def expected(kind: str) -> dict[str, torch.Tensor]:
    return load_file(DATA / kind / "expected.safetensors")


def test_reference_data_was_written_by_4_56_2():
    for kind in KINDS:
        with safe_open(str(DATA / kind / "expected.safetensors"), "pt") as f:
            assert f.metadata()["transformers"] == "4.56.2"
        assert json.loads((DATA / kind / "config.json").read_text())["position_embedding_type"] == kind


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_matches_the_reference(kind, attention):
    model = registry.from_pretrained(DATA / kind, attention=attention)
    assert model.manifest["components"]["position"]["chosen"] == KINDS[kind]
    # the reference keeps an absolute table it does not read: reported as unused, not loaded
    assert model.manifest["checkpoint"]["unused"] == ["embeddings.position_embeddings.weight"]  # a BertModel: no prefix
    data = expected(kind)
    inputs = {k.removeprefix("input."): v for k, v in data.items() if k.startswith("input.")}
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    tol = TOLERANCE[attention]
    assert max_diff(out.last_hidden_state, data["last_hidden_state"]) <= tol
    assert max_diff(out.pooler_output, data["pooler_output"]) <= tol
    for i, hidden in enumerate(out.hidden_states):
        assert max_diff(hidden, data[f"hidden_states.{i}"]) <= tol


@pytest.mark.parametrize("kind", list(KINDS))
def test_attention_weights_match_the_reference(kind):
    model = registry.from_pretrained(DATA / kind, attention="eager")
    data = expected(kind)
    inputs = {k.removeprefix("input."): v for k, v in data.items() if k.startswith("input.")}
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    for i, weights in enumerate(out.attentions):
        assert max_diff(weights, data[f"attentions.{i}"]) <= 1e-5


def test_the_two_kinds_differ_and_positions_matter():
    """The key term of relative-key-query is not a no-op, and the tables are read."""
    data = expected("relative_key")
    inputs = {k.removeprefix("input."): v for k, v in data.items() if k.startswith("input.")}
    key = registry.from_pretrained(DATA / "relative_key", attention="eager")
    # the same weights with the key term added
    key_query = registry.from_pretrained(DATA / "relative_key", attention="eager", position="relative-key-query")
    with torch.no_grad():
        a = key(**inputs).last_hidden_state
        b = key_query(**inputs).last_hidden_state
        for table in key.bert.position.distance_embedding:
            table.weight.zero_()
        c = key(**inputs).last_hidden_state
    assert max_diff(a, b) > 1e-3 and max_diff(a, c) > 1e-3


def test_saved_here_records_the_position_type(tmp_path):
    model = registry.from_pretrained(DATA / "relative_key_query", attention="eager")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["position_embedding_type"] == "relative_key_query"
    again = registry.from_pretrained(tmp_path, attention="eager")
    assert again.manifest["components"]["position"]["chosen"] == "relative-key-query"
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)


def test_a_backend_without_query_key_bias_is_refused_at_selection():
    """Said in explain() and at build time, never at forward time."""
    sdpa = registry.default_catalog().get("attention", "sdpa")

    class NoQueryKeyBias(type(sdpa)):
        name = "no-qk-attn"
        capabilities = replace(sdpa.capabilities, bias_kinds=frozenset({"alibi", "tensor"}), priority=100)

    registry.register(NoQueryKeyBias())
    report = registry.explain("bert-base-uncased", position="relative-key", attention="no-qk-attn")
    slot = report["slots"]["attention"]
    assert slot["chosen"] is None
    reasons = {c["name"]: c["reasons"] for c in slot["candidates"]}
    assert any("query-key" in r for r in reasons["no-qk-attn"])
    assert reasons["sdpa"] == [] and reasons["eager"] == []
    with pytest.raises(registry.IncompatibleComponentsError, match="query-key"):
        registry.build("bert-base-uncased", position="relative-key", attention="no-qk-attn", device="meta")
    # auto skips it despite its priority, and says why in the manifest
    model = registry.build("bert-base-uncased", position="relative-key", num_hidden_layers=1, device="meta")
    assert model.manifest["components"]["attention"]["chosen"] == "sdpa"
    # with absolute positions nothing needs that bias kind: it is accepted
    model = registry.build("bert-base-uncased", attention="no-qk-attn", num_hidden_layers=1, device="meta")
    assert model.manifest["components"]["attention"]["chosen"] == "no-qk-attn"


def test_too_long_for_the_distance_tables():
    model = registry.from_pretrained(DATA / "relative_key", attention="eager")
    with pytest.raises(registry.InputError, match="max_position_embeddings is 16"):
        model(input_ids=torch.ones(1, 17, dtype=torch.long))
