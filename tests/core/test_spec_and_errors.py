"""Specs (validation, overrides, serialisation) and the errors bad input gets."""

from __future__ import annotations

import pytest
import torch

import registry
from registry.interfaces import PositionCapabilities, PositionEncoding, PositionPlugin


def test_spec_from_preset_with_overrides():
    spec = registry.spec("bloom-7b1", attention="sdpa", n_layer=2, dtype="bfloat16", num_labels=4)
    assert (spec.family, spec.name, spec.config.hidden_size, spec.config.n_layer) == ("bloom", "bloom-7b1", 4096, 2)
    assert spec.components.attention == "sdpa" and spec.dtype == "bfloat16" and spec.task.num_labels == 4


@pytest.mark.parametrize("suffix", [".json", ".toml", ".yaml"])
def test_spec_round_trips_through_files(tmp_path, suffix):
    spec = registry.spec("bloom-560m", attention="eager", n_layer=3, head="token-classification", num_labels=5)
    path = tmp_path / f"model{suffix}"
    spec.save(path)
    again = registry.ModelSpec.from_file(path)
    assert again == spec
    model = registry.build(path, device="meta")
    assert model.spec.config.n_layer == 3 and model.manifest["components"]["head"]["chosen"] == "token-classification"


def test_build_from_dict_and_from_spec():
    spec = registry.spec("bloom-560m", n_layer=1)
    assert registry.build(spec, device="meta").config.n_layer == 1
    data = {"family": "bloom", "config": {"hidden_size": 32, "n_layer": 2, "n_head": 4}}
    assert registry.build(data, device="meta").config.hidden_size == 32


def test_resolved_spec_and_manifest_record_every_choice():
    model = registry.build("bloom-560m", n_layer=1, device="meta")
    assert model.spec.components.attention == "sdpa"  # resolved, no longer auto
    components = model.manifest["components"]
    assert components["attention"]["reason"].startswith("auto: highest priority of")
    assert components["position"]["reason"].startswith("auto: family 'bloom' default")
    assert components["position"]["chosen"] == "alibi"
    assert components["attention"]["distribution"] == "registry-transformers"
    rebuilt = registry.build(model.spec, device="meta")  # the resolved spec rebuilds the same model
    assert rebuilt.spec == model.spec


def test_unknown_component_says_did_you_mean():
    with pytest.raises(
        registry.UnknownComponentError, match=r"attention 'spda' is unknown; available: .*sdpa.*did you mean 'sdpa'"
    ):
        registry.build("bloom-560m", attention="spda", device="meta")


def test_unknown_preset():
    with pytest.raises(registry.UnknownPresetError, match=r"did you mean 'bloom-560m'"):
        registry.build("bloom-560", device="meta")


def test_unknown_override_key_is_named():
    with pytest.raises(registry.UnknownOverrideError, match=r"unknown override 'n_layers'.*did you mean 'n_layer'"):
        registry.build("bloom-560m", n_layers=2, device="meta")
    with pytest.raises(registry.UnknownOverrideError, match="device"):
        registry.spec("bloom-560m", device="meta")


def test_inconsistent_dims():
    with pytest.raises(registry.InvalidSpecError, match=r"hidden_size \(100\) must be divisible by n_head \(3\)"):
        registry.build("bloom-560m", hidden_size=100, n_head=3, device="meta")


def test_invalid_values_name_the_field():
    with pytest.raises(registry.InvalidSpecError, match="config.n_layer"):
        registry.spec("bloom-560m", n_layer=0)
    with pytest.raises(registry.InvalidSpecError, match="dtype"):
        registry.spec("bloom-560m", dtype="float8")
    with pytest.raises(registry.InvalidSpecError, match="config.not_a_field: unknown field"):
        registry.build({"family": "bloom", "config": {"not_a_field": 1}}, device="meta")


def test_malformed_spec_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("family = [unclosed")
    with pytest.raises(registry.InvalidSpecError, match="bad.toml"):
        registry.ModelSpec.from_file(path)


def test_token_ids_outside_the_vocabulary():
    model = registry.build("bloom-560m", n_layer=1, hidden_size=32, n_head=4, vocab_size=50)
    with pytest.raises(registry.InputError, match=r"token id 50 is outside the vocabulary: ids must be in \[0, 49\]"):
        model(input_ids=torch.tensor([[1, 50]]))
    with pytest.raises(registry.InputError, match="-1"):
        model(input_ids=torch.tensor([[-1, 3]]))


def test_mask_of_the_wrong_shape_and_arguments_the_family_does_not_take():
    model = registry.build("bloom-560m", n_layer=1, hidden_size=32, n_head=4, vocab_size=50)
    with pytest.raises(registry.InputError, match=r"attention_mask has shape \(1, 3\); expected \(batch=1"):
        model(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3))
    with pytest.raises(registry.InputError, match="does not take token_type_ids"):
        model(input_ids=torch.tensor([[1, 2]]), token_type_ids=torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(registry.InputError, match="head 'causal-lm' does not take start_positions"):
        model(input_ids=torch.tensor([[1, 2]]), start_positions=torch.tensor([0]))


def test_explicit_choice_that_cannot_work_lists_reasons_and_explain_shows_them():
    class QueryBiasOnly(PositionPlugin):
        name = "needs-query-bias"
        capabilities = PositionCapabilities(effects=frozenset({"bias"}), bias_kind="query-key")

        def create(self, context):
            return PositionEncoding()

    registry.register(QueryBiasOnly())
    from registry.interfaces import AttentionBackend, AttentionCapabilities

    class AlibiOnly(AttentionBackend):
        name = "alibi-only"
        capabilities = AttentionCapabilities(bias_kinds=frozenset({"alibi"}))

        def __call__(self, q, k, v, *, mask, bias, scale, dropout=0.0, need_weights=False):
            raise AssertionError("never called")

    registry.register(AlibiOnly())
    with pytest.raises(
        registry.IncompatibleComponentsError,
        match=r"attention 'alibi-only' cannot be used here: position 'needs-query-bias' needs a 'query-key' score bias",
    ):
        registry.build("bloom-560m", attention="alibi-only", position="needs-query-bias", device="meta")
    report = registry.explain("bloom-560m", position="needs-query-bias")
    candidates = {c["name"]: c for c in report["slots"]["attention"]["candidates"]}
    assert candidates["alibi-only"]["accepted"] is False
    assert candidates["eager"]["accepted"] and candidates["sdpa"]["accepted"]
    assert "alibi-only" in report["text"]
    # explain() reports an explicit refusal instead of raising
    report = registry.explain("bloom-560m", attention="alibi-only", position="needs-query-bias")
    assert report["slots"]["attention"]["chosen"] is None
    assert "refused" in report["slots"]["attention"]["reason"]


def test_head_that_the_family_cannot_serve_is_refused():
    from registry.interfaces import HeadCapabilities, HeadPlugin

    class NeedsPooler(HeadPlugin):
        name = "needs-pooler"
        capabilities = HeadCapabilities(needs=frozenset({"pooler"}))

        def create(self, context):
            raise AssertionError("never called")

    registry.register(NeedsPooler())
    with pytest.raises(registry.IncompatibleComponentsError, match="needs pooler, which family 'bloom' does not offer"):
        registry.build("bloom-560m", head="needs-pooler", device="meta")


def test_nothing_is_half_built_on_error():
    """A failing build raises before any module exists; the catalog stays usable."""
    with pytest.raises(registry.InvalidSpecError):
        registry.build("bloom-560m", hidden_size=10, n_head=3)
    assert registry.build("bloom-560m", n_layer=1, device="meta").config.n_layer == 1
