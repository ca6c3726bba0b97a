"""A/B testing: variants on shared weights, numerics that find the first diverging layer, speed, memory,
and the report's JSON, Markdown and plot."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import registry
from registry.ab import (
    ABReport,
    MissingDependencyError,
    _make_variant,
    _peak_bytes,
    _prepare_inputs,
    bootstrap_ci,
    default_tolerance,
    difference,
)
from registry.interfaces import AttentionBackend, AttentionCapabilities, AttentionOutput

BLOOM = dict(n_layer=3, hidden_size=32, n_head=4, vocab_size=1000)
BERT = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=1000)
FAST = dict(repeats=2, new_tokens=3)
EAGER, SDPA = {"attention": "eager"}, {"attention": "sdpa"}


class PerturbedAttention(AttentionBackend):
    """Eager attention whose output is scaled by 1.05 in blocks ``start`` and after (0-based).

    A backend is never told its layer: it counts its calls, which a forward makes once per block, in
    order, so ``calls % n_layer`` is the block index."""

    name = "perturbed"
    capabilities = AttentionCapabilities(bias_kinds=frozenset({"alibi", "tensor", "query-key"}), priority=-1)

    def __init__(self, start: int, n_layer: int):
        self.start, self.n_layer, self.calls = start, n_layer, 0

    def __call__(self, q, k, v, *, mask, bias, scale, dropout=0.0, need_weights=False):
        eager = registry.discovery.default_catalog().get("attention", "eager")
        out = eager(q, k, v, mask=mask, bias=bias, scale=scale, dropout=dropout)
        block = self.calls % self.n_layer
        self.calls += 1
        return AttentionOutput(out.output * 1.05 if block >= self.start else out.output, None)


@pytest.fixture(scope="module")
def bloom_report() -> ABReport:
    registry.reset()
    return registry.ab("bloom-560m", EAGER, SDPA, **FAST, **BLOOM)


def test_eager_and_sdpa_agree_on_bloom(bloom_report):
    report = bloom_report
    verdict = report.verdict
    assert verdict.matches and verdict.first_divergent_layer is None
    assert verdict.tolerance == 1e-4 and verdict.tolerance_source == "default for float32 vs float32"
    assert "B matches A within 1e-04" in verdict.summary
    numerics = report.numerics
    assert numerics["output"] == "logits" and 0 < numerics["max_rel"] < 1e-5
    assert [row["name"] for row in numerics["layers"]] == ["embeddings", "block 1", "block 2", "block 3 + final norm"]
    assert numerics["layers"][0]["max_abs"] == 0.0  # the embeddings do not involve attention
    assert numerics["distribution"]["top1_agreement"] == 1.0 and numerics["distribution"]["kl_max"] < 1e-6
    assert numerics["distribution"]["positions"] == 2 * 32 - 8  # the padded quarter of row 2 is left out
    assert numerics["greedy"]["agreement"] == 1.0 and numerics["greedy"]["first_difference_step"] is None
    assert numerics["greedy"]["new_tokens"] == 3
    assert report.a["components"]["attention"] == "eager" and report.b["components"]["attention"] == "sdpa"
    metrics = report.speed["metrics"]
    assert set(metrics) == {"prefill", "generate", "decode"}
    for metric in metrics.values():
        assert len(metric["a"]["samples"]) == len(metric["b"]["samples"]) == 2
        low, high = metric["speedup_ci"]
        assert low <= metric["speedup"] <= high or metric["faster"] != "neither"
    assert verdict.metric == "generate" and verdict.faster in ("a", "b", "neither")


def test_eager_and_sdpa_agree_on_bert():
    report = registry.ab("bert-base-uncased", EAGER, SDPA, **FAST, **BERT)
    assert report.verdict.matches and report.verdict.first_divergent_layer is None
    assert report.numerics["output"] == "logits" and report.numerics["max_rel"] < 1e-5
    assert report.numerics["greedy"] == {"skipped": "greedy generation needs the causal-lm head on both variants"}
    assert report.numerics["distribution"]["top1_agreement"] == 1.0
    assert set(report.speed["metrics"]) == {"forward"} and report.verdict.metric == "forward"


@pytest.mark.parametrize("start", [0, 1])
def test_perturbed_attention_is_a_mismatch_that_names_the_first_layer(start):
    registry.register(PerturbedAttention(start, BLOOM["n_layer"]))
    report = registry.ab("bloom-560m", EAGER, {"attention": "perturbed"}, **FAST, **BLOOM)
    verdict = report.verdict
    assert not verdict.matches
    # hidden state i is the output of block i (1-based): a perturbation in block index `start` shows at start + 1
    assert verdict.first_divergent_layer == start + 1
    layers = report.numerics["layers"]
    assert all(row["max_abs"] == 0.0 for row in layers[: start + 1])
    assert all(not row["within"] for row in layers[start + 1 :])
    assert (
        "does NOT match A" in verdict.summary
        and f"starting at layer {start + 1} (block {start + 1})" in verdict.summary
    )
    assert f"| {start + 1} | block {start + 1} |" in report.to_markdown() and "DIVERGES" in report.to_markdown()


def test_variants_share_the_source_tensors_and_convert_only_for_another_dtype():
    source = registry.build("bloom-560m", **BLOOM)
    same = _make_variant("A", source, EAGER, seed=0)
    pointers = {name: t.data_ptr() for name, t in source.state_dict().items()}
    assert {name: t.data_ptr() for name, t in same.model.state_dict().items()} == pointers
    assert same.weights["shared"] == same.weights["tensors"] == len(pointers) and same.weights["converted"] == 0
    assert same.model.manifest["components"]["attention"]["chosen"] == "eager"
    half = _make_variant("B", source, {"dtype": "bfloat16"}, seed=0)
    assert half.model.dtype == torch.bfloat16 and half.weights["shared"] == 0
    assert half.weights["converted"] == len(pointers)
    torch.testing.assert_close(
        half.model.transformer.h[0].mlp.dense_h_to_4h.weight.float(),
        source.transformer.h[0].mlp.dense_h_to_4h.weight,
        rtol=1e-2,
        atol=0,
    )


def test_report_counts_shared_weights_once(bloom_report):
    memory = bloom_report.memory
    assert bloom_report.a["weights"]["shared"] == bloom_report.a["weights"]["tensors"]
    assert memory["shared_weight_bytes"] == memory["a"]["weights_bytes"] == memory["b"]["weights_bytes"]
    expected = sum(p.numel() * 4 for p in registry.build("bloom-560m", **BLOOM, device="meta").parameters())
    assert memory["a"]["weights_bytes"] == expected
    assert memory["a"]["peak_bytes"] == expected + memory["a"]["run_peak_bytes"] and memory["a"]["run_peak_bytes"] > 0


def test_bfloat16_against_float32_runs_with_a_looser_stated_tolerance():
    report = registry.ab("bloom-560m", {}, {"dtype": "bfloat16"}, **FAST, **BLOOM)
    assert report.verdict.tolerance == default_tolerance("float32", "bfloat16") == 5e-2
    assert report.verdict.tolerance_source == "default for float32 vs bfloat16"
    assert report.b["dtype"] == "bfloat16" and report.b["weights"]["converted"] == report.b["weights"]["tensors"]
    assert 1e-4 < report.numerics["max_rel"] < 5e-2 and report.verdict.matches
    assert report.memory["b"]["weights_bytes"] * 2 == report.memory["a"]["weights_bytes"]
    strict = registry.ab("bloom-560m", {}, {"dtype": "bfloat16"}, tolerance=1e-4, **FAST, **BLOOM)
    assert not strict.verdict.matches and strict.verdict.tolerance_source == "given"


def test_a_equal_to_b_is_a_null_test_and_hook_plugins_add_metrics():
    class Metrics:
        @registry.hookimpl
        def registry_ab_metrics(self, a, b):
            return {"logit_norm_ratio": float(b.logits.norm() / a.logits.norm())}

    registry.register_hooks(Metrics())
    report = registry.ab("bloom-560m", EAGER, EAGER, **FAST, **BLOOM)
    assert report.verdict.matches and report.numerics["max_abs"] == 0.0
    assert report.numerics["distribution"]["kl_max"] == 0.0
    assert report.numerics["extra"] == {"logit_norm_ratio": 1.0}
    assert "| logit_norm_ratio | 1 | registry_ab_metrics hook |" in report.to_markdown()


def test_an_already_built_model_and_explicit_inputs():
    model = registry.build("bloom-560m", **BLOOM)
    chosen = model.manifest["components"]["attention"]["chosen"]
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0
    report = registry.ab(model, EAGER, SDPA, inputs={"input_ids": ids, "attention_mask": mask}, **FAST)
    assert report.a["weights"]["source"] == "the given model's" and report.verdict.matches
    assert report.numerics["inputs"] == "2 x 12 token ids, 19 real tokens"
    assert report.numerics["distribution"]["positions"] == 19
    # the variants use the given model's tensors: it is left as it was
    assert model.manifest["components"]["attention"]["chosen"] == chosen != "eager"
    assert _prepare_inputs(model, ids[0], seed=0)["input_ids"].shape == (1, 12)
    with pytest.raises(registry.InputError, match="text inputs need a tokenizer"):
        _prepare_inputs(model, "hello", seed=0)
    with pytest.raises(registry.InputError, match="need 'input_ids'"):
        _prepare_inputs(model, {"attention_mask": mask}, seed=0)


def test_json_has_the_six_parts_and_is_plain_data(bloom_report):
    data = json.loads(json.dumps(bloom_report.to_dict()))
    assert set(data) == {"a", "b", "numerics", "speed", "memory", "verdict"}
    assert data["a"]["overrides"] == EAGER and data["b"]["overrides"] == SDPA
    assert data["a"]["dtype"] == "float32" and data["a"]["device"] == "cpu"
    assert set(data["verdict"]) >= {"matches", "tolerance", "first_divergent_layer", "faster", "speedup", "summary"}
    assert data["verdict"]["speedup_ci"][0] <= data["verdict"]["speedup_ci"][1]


def test_markdown_report(bloom_report):
    text = bloom_report.to_markdown()
    for heading in ("# A/B: bloom-560m", "## Variants", "## Outputs", "## Agreement", "## Layers", "## Speed"):
        assert heading in text
    assert bloom_report.verdict.summary in text and "random (seed 0" in text
    assert "| A (attention=eager) | eager | alibi |" in text


def test_plot_is_written(bloom_report, tmp_path):
    pytest.importorskip("matplotlib")
    path = bloom_report.plot(tmp_path / "ab.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_plot_without_matplotlib_says_what_to_install(bloom_report, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingDependencyError, match="pip install matplotlib"):
        bloom_report.plot(tmp_path / "ab.png")


@pytest.mark.parametrize(
    "a,b,error,message",
    [
        ({}, {"attention": "nope"}, registry.UnknownComponentError, "attention 'nope' is unknown"),
        ({}, {"n_layers": 2}, registry.UnknownOverrideError, "unknown override 'n_layers'"),
        ({}, {"hidden_size": 64}, registry.InvalidSpecError, "must keep the shape of every weight"),
    ],
)
def test_bad_variants_are_typed_errors(a, b, error, message):
    with pytest.raises(error, match=message):
        registry.ab("bloom-560m", a, b, **FAST, **BLOOM)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a CPU-only torch gives")
def test_a_cuda_variant_without_cuda_is_a_clear_error():
    with pytest.raises(registry.InvalidSpecError, match="this torch sees no CUDA device"):
        registry.ab("bloom-560m", {}, {"device": "cuda"}, **FAST, **BLOOM)


def test_bad_options_are_input_errors():
    with pytest.raises(registry.InputError, match="repeats must be >= 2"):
        registry.ab("bloom-560m", EAGER, SDPA, repeats=1, **BLOOM)


def test_difference_is_relative_to_the_scale_of_a_over_real_tokens():
    x = torch.tensor([[[1.0, -4.0], [100.0, 100.0]]])  # (batch 1, tokens 2, 2)
    y = torch.tensor([[[1.0, -3.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 0]])  # the second token is padding: its huge difference is ignored
    assert difference(x, y, mask) == {"max_abs": 1.0, "mean_abs": 0.5, "max_rel": 0.25, "mean_rel": 0.2}


def test_bootstrap_interval():
    assert bootstrap_ci([2.0, 2.0, 2.0], [1.0, 1.0, 1.0], lambda a, b: sum(a) / sum(b)) == (2.0, 2.0)
    low, high = bootstrap_ci([1.0, 2.0, 3.0, 4.0], [1.5, 2.5, 3.5, 4.5], lambda a, b: max(a) / max(b))
    assert low < 1 < high
    assert bootstrap_ci([1.0, 2.0], [3.0, 1.0], lambda a, b: a[0] / b[0], seed=3) == bootstrap_ci(
        [1.0, 2.0], [3.0, 1.0], lambda a, b: a[0] / b[0], seed=3
    )


def test_cpu_peak_tracking_counts_live_tensors_until_freed():
    with _peak_bytes(torch.device("cpu")) as measured:
        x = torch.ones(1000)  # 4000 bytes
        y = x * 2  # 8000 live
        del x
        z = y + 1  # 8000 live again (x was freed)
        y.add_(1)  # in place: nothing new
        del y
    assert measured == {"peak": 8000, "retained": 4000}  # z is still alive
    del z
