"""Conformance: every catalogued plugin against the eager reference path, on the same weights.

Parametrised over the catalog at collection time, so an installed third-party plugin is tested the
day it is installed (``pip install my-flash-attn && pytest tests/conformance``).
"""

from __future__ import annotations

import pytest
import torch

import registry
from registry.discovery import default_catalog

SMALL = dict(n_layer=2, hidden_size=48, n_head=6, vocab_size=97, pad_token_id=0)


def _usable(kind: str) -> list[str]:
    catalog = default_catalog()
    names = []
    for name in catalog.names(kind):
        try:
            catalog.get(kind, name)
        except registry.RegistryError:
            continue
        names.append(name)
    return names


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 97, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


# each plugin is tested in the first of these dtypes its selection accepts on this machine (float32 where
# it can: tight tolerances), against the eager path in the same dtype; and in the first of these shapes it
# accepts (heads of 8 values, else heads of 32, which kernels that need wide heads take)
DTYPES = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=4e-2, rtol=4e-2)}
SHAPES = (SMALL, dict(SMALL, hidden_size=64, n_head=2))


def _pair(slot: str, name: str, **overrides):
    """(candidate model, eager reference model, tolerances) on the same weights, in the first shape and
    dtype the selection accepts the candidate in; skip if it refuses every one."""
    reasons = []
    for shape, dtype in ((shape, dtype) for shape in SHAPES for dtype in DTYPES):
        report = registry.explain("bloom-560m", **{**shape, slot: name, "dtype": dtype, **overrides})
        choice = report["slots"][slot]
        if choice["chosen"] == name:
            break
        reasons.append(f"{dtype}, hidden {shape['hidden_size']}: {choice['reason']}")
    else:
        pytest.skip(f"{slot} '{name}' does not fit a CPU BLOOM: {'; '.join(reasons)}")
    candidate = registry.build("bloom-560m", **{**shape, slot: name, "dtype": dtype, **overrides}).eval()
    reference = registry.build("bloom-560m", **{**shape, "attention": "eager", "dtype": dtype, **overrides}).eval()
    reference.load_state_dict(candidate.state_dict())
    return candidate, reference, DTYPES[dtype]


@pytest.mark.parametrize("name", _usable("attention"))
def test_attention_matches_eager_with_padding_and_cache(name):
    model, reference, tolerance = _pair("attention", name)
    ids, mask = _batch()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
        real = mask.bool()
        torch.testing.assert_close(got[real], expected[real], **tolerance)
        out = model(input_ids=ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        steps = [out.logits]
        for t in range(5, 8):
            out = model(
                input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=out.past_key_values
            )
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1)[real], expected[real], **tolerance)


@pytest.mark.parametrize("name", _usable("attention"))
def test_attention_capabilities_are_honest(name):
    backend = default_catalog().get("attention", name)
    caps = backend.capabilities
    from registry.interfaces import Mask

    dtypes = [dtype for dtype in DTYPES if str(dtype).removeprefix("torch.") in caps.dtypes]
    if "cpu" not in caps.devices or not dtypes:
        pytest.skip(f"'{name}' runs on no CPU dtype of {', '.join(map(str, DTYPES))}")
    q = torch.randn(1, 2, 3, 8, dtype=dtypes[0])
    out = backend(
        q, q, q, mask=Mask(q_len=3, k_len=3, causal=True), bias=None, scale=0.5, need_weights=caps.attention_weights
    )
    assert out.output.shape == (1, 2, 3, 8)
    assert (out.weights is not None) == caps.attention_weights


@pytest.mark.parametrize("name", _usable("cache"))
def test_cache_decoding_equals_the_uncached_forward(name):
    model, _, _ = _pair("cache", name)
    ids, mask = _batch()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        cache = model.new_cache(batch_size=3, max_length=8)
        out = model(input_ids=ids[:, :4], attention_mask=mask[:, :4], past_key_values=cache, use_cache=True)
        steps = [out.logits]
        for t in range(4, 8):
            out = model(
                input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=out.past_key_values
            )
            steps.append(out.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], atol=1e-5, rtol=1e-5)


FAMILY_SHAPES = {
    "bloom-560m": SMALL,
    "bert-base-uncased": dict(
        num_hidden_layers=2, hidden_size=48, num_attention_heads=6, intermediate_size=96, vocab_size=97
    ),
}


@pytest.mark.parametrize("preset", [p for p in FAMILY_SHAPES if p in registry.presets()])
@pytest.mark.parametrize("name", _usable("head"))
def test_every_head_builds_and_runs_where_selection_accepts_it(name, preset):
    shape = FAMILY_SHAPES[preset]
    report = registry.explain(preset, **shape, head=name)
    if report["slots"]["head"]["chosen"] != name:
        pytest.skip(f"head '{name}' is refused for {preset}: {report['slots']['head']['reason']}")
    model = registry.build(preset, **shape, head=name)
    ids, mask = _batch()
    if name == "multiple-choice":  # (batch, choices, tokens), as the reference's multiple-choice models
        ids, mask = ids[:, None].expand(3, 2, 8), mask[:, None].expand(3, 2, 8)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    assert len(out) > 0 and all(torch.isfinite(v).all() for v in out.values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("name", _usable("attention"))
def test_attention_matches_eager_in_the_encoder_family(name):
    if "bert-base-uncased" not in registry.presets():
        pytest.skip("the bert family is not installed")
    shape = FAMILY_SHAPES["bert-base-uncased"]
    report = registry.explain("bert-base-uncased", **shape, attention=name, head="base")
    if report["slots"]["attention"]["chosen"] != name:
        pytest.skip(f"attention '{name}' does not fit bert here: {report['slots']['attention']['reason']}")
    model = registry.build("bert-base-uncased", **shape, attention=name, head="base")
    reference = registry.build("bert-base-uncased", **shape, attention="eager", head="base")
    reference.load_state_dict(model.state_dict())
    ids, mask = _batch()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)
