"""registry-rotary: installed as a third party, found by entry point, correct against the complex form."""

from __future__ import annotations

import torch
from registry_rotary import RotaryEncoding

import registry
from registry.interfaces import Positions


def test_listed_with_its_own_distribution():
    record = {r["name"]: r for r in registry.catalog()["position"]}["rotary"]
    assert (record["distribution"], record["status"]) == ("registry-rotary", "ok")


def test_rotation_equals_complex_multiplication():
    """Channels (i, i + D/2) as one complex number, multiplied by exp(i * pos * base^(-2i/D))."""
    torch.manual_seed(0)
    B, H, T, D = 2, 3, 5, 8
    q, k = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    rq, _ = RotaryEncoding(D).rotate(q, k, Positions(query=pos, key=pos))
    freq = 10000.0 ** (-torch.arange(0, D, 2).double() / D)
    phase = torch.polar(torch.ones(B, T, D // 2, dtype=torch.float64), pos[..., None].double() * freq)[:, None]
    z = torch.complex(q[..., : D // 2].double(), q[..., D // 2 :].double()) * phase
    expected = torch.cat([z.real, z.imag], dim=-1).float()
    assert torch.allclose(rq, expected, atol=1e-5)


def test_scores_depend_on_relative_position_only():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    enc = RotaryEncoding(16)
    pos = torch.arange(6)[None]
    a = enc.rotate(q, k, Positions(query=pos, key=pos))
    b = enc.rotate(q, k, Positions(query=pos + 13, key=pos + 13))
    assert torch.allclose(a[0] @ a[1].transpose(-1, -2), b[0] @ b[1].transpose(-1, -2), atol=1e-4)


def test_bloom_with_rotary_positions_decodes_consistently():
    model = registry.build("bloom-560m", position="rotary", n_layer=2, hidden_size=32, n_head=4, vocab_size=64)
    with torch.no_grad():  # sharper attention than the 0.02-std init, so positions visibly matter
        for block in model.backbone.h:
            block.self_attention.query_key_value.weight.mul_(40)
    chosen = model.manifest["components"]["position"]
    assert (chosen["chosen"], chosen["distribution"]) == ("rotary", "registry-rotary")
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        out = model(input_ids=ids[:, :4], use_cache=True)
        steps = [out.logits]
        for t in range(4, 7):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=out.past_key_values)
            steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    alibi = registry.build("bloom-560m", n_layer=2, hidden_size=32, n_head=4, vocab_size=64)
    alibi.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(alibi(input_ids=ids).logits, full, atol=1e-3)  # the position plugin matters


def test_odd_head_dim_is_refused_at_selection():
    report = registry.explain("bloom-560m", position="rotary", hidden_size=36, n_head=4)
    assert report["slots"]["position"]["chosen"] is None
    assert "even head_dim" in report["slots"]["position"]["reason"]
