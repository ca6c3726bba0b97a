"""Discovery: lazy listing, provenance, third-party and broken plugins, duplicates, allow/deny."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import registry
from registry.interfaces import AttentionBackend, AttentionCapabilities, AttentionOutput

THIRD_PARTY_MODULE = '''
"""A third-party attention backend: eager math written independently, to be found by entry point."""
import torch
from registry.interfaces import AttentionBackend, AttentionCapabilities, AttentionOutput
from registry.masking import additive_mask_and_bias


class MyFlash(AttentionBackend):
    name = "my-flash"
    capabilities = AttentionCapabilities(bias_kinds=frozenset({"alibi", "tensor"}), priority=1)

    def __call__(self, q, k, v, *, mask, bias, scale, dropout=0.0, need_weights=False):
        scores = q @ k.transpose(-1, -2) * scale
        extra = additive_mask_and_bias(mask, bias, q, k)
        if extra is not None:
            scores = scores + extra
        return AttentionOutput(torch.softmax(scores.float(), -1).to(q.dtype) @ v, None)


my_flash = MyFlash()
'''


def make_distribution(site, name: str, version: str, entry_points: str, modules: dict[str, str]) -> None:
    """Write an installed-looking distribution (dist-info with entry points) into ``site``."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for module in [m for m in sys.modules if m.startswith("thirdparty_")]:
        del sys.modules[module]


def records(kind: str) -> dict[str, dict]:
    return {r["name"]: r for r in registry.catalog()[kind]}


def test_listing_imports_no_plugin_module():
    code = (
        "import sys, registry; c = registry.catalog(); "
        "assert c['attention'] and c['family']; "
        "loaded = [m for m in sys.modules if m == 'plugins' or m.startswith('plugins.')]; "
        "assert not loaded, loaded; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_catalog_has_provenance_and_first_party_components():
    catalog = registry.catalog()
    sdpa = {r["name"]: r for r in catalog["attention"]}["sdpa"]
    assert sdpa["distribution"] == "registry-transformers" and sdpa["version"]
    assert sdpa["status"] == "ok" and sdpa["loaded"] is False and sdpa["capabilities"] is None
    for kind, names in {
        "attention": {"eager", "sdpa"},
        "position": {"alibi"},
        "cache": {"dynamic"},
        "family": {"bloom"},
        "head": {"base", "causal-lm", "sequence-classification", "token-classification", "question-answering"},
    }.items():
        assert names <= {r["name"] for r in catalog[kind]}


def test_catalog_load_fills_capabilities():
    sdpa = {r["name"]: r for r in registry.catalog(load=True)["attention"]}["sdpa"]
    assert sdpa["loaded"] is True and "alibi" in sdpa["capabilities"]["bias_kinds"]


def test_third_party_plugin_is_listed_with_provenance_and_selectable(site):
    make_distribution(
        site,
        "thirdparty-flash",
        "1.2.3",
        "[registry.attention]\nmy-flash = thirdparty_flash:my_flash\n",
        {"thirdparty_flash": THIRD_PARTY_MODULE},
    )
    registry.reset()
    record = records("attention")["my-flash"]
    assert (record["distribution"], record["version"], record["status"]) == ("thirdparty-flash", "1.2.3", "ok")
    assert "thirdparty_flash" not in sys.modules  # listed, not imported
    model = registry.build("bloom-560m", n_layer=2, hidden_size=32, n_head=4, vocab_size=64, attention="my-flash")
    chosen = model.manifest["components"]["attention"]
    assert chosen["chosen"] == "my-flash" and chosen["distribution"] == "thirdparty-flash"
    reference = registry.build("bloom-560m", n_layer=2, hidden_size=32, n_head=4, vocab_size=64, attention="eager")
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)


def test_broken_plugin_is_listed_and_isolated(site):
    make_distribution(
        site,
        "thirdparty-broken",
        "0.1",
        "[registry.attention]\nbroken-attn = thirdparty_broken:attn\n",
        {"thirdparty_broken": "raise RuntimeError('needs a GPU library that is missing')\n"},
    )
    registry.reset()
    catalog = registry.catalog(load=True)
    broken = {r["name"]: r for r in catalog["attention"]}["broken-attn"]
    assert broken["status"] == "broken" and "needs a GPU library that is missing" in broken["error"]
    # everything else still works, and explain() shows the broken candidate with its reason
    model = registry.build("bloom-560m", n_layer=1, hidden_size=32, n_head=4, vocab_size=64, device="meta")
    assert model.manifest["components"]["attention"]["chosen"] == "sdpa"
    candidates = {c["name"]: c for c in registry.explain("bloom-560m")["slots"]["attention"]["candidates"]}
    assert not candidates["broken-attn"]["accepted"]
    with pytest.raises(registry.IncompatibleComponentsError, match="broken"):
        registry.build("bloom-560m", attention="broken-attn", device="meta")


def test_plugin_object_of_the_wrong_kind_is_broken(site):
    make_distribution(
        site,
        "thirdparty-wrong",
        "0.1",
        "[registry.attention]\nwrong = thirdparty_wrong:thing\n",
        {"thirdparty_wrong": "thing = 42\n"},
    )
    registry.reset()
    wrong = {r["name"]: r for r in registry.catalog(load=True)["attention"]}["wrong"]
    assert wrong["status"] == "broken" and "not a AttentionBackend" in wrong["error"]


def test_two_distributions_offering_one_name_is_an_error_naming_both(site):
    for dist in ("thirdparty-a", "thirdparty-b"):
        make_distribution(
            site,
            dist,
            "1.0",
            f"[registry.attention]\nsame-name = thirdparty_{dist[-1]}:my_flash\n",
            {f"thirdparty_{dist[-1]}": THIRD_PARTY_MODULE.replace('"my-flash"', '"same-name"')},
        )
    registry.reset()
    record = records("attention")["same-name"]
    assert record["status"] == "broken"
    assert "thirdparty-a" in record["error"] and "thirdparty-b" in record["error"]
    with pytest.raises(registry.IncompatibleComponentsError, match="thirdparty-a.*thirdparty-b"):
        registry.build("bloom-560m", attention="same-name", device="meta")


def test_deny_and_allow_lists_by_api_and_environment(monkeypatch):
    registry.configure(deny=["attention:sdpa"])
    assert records("attention")["sdpa"]["status"] == "blocked"
    model = registry.build("bloom-560m", n_layer=1, device="meta")
    assert model.manifest["components"]["attention"]["chosen"] == "eager"
    candidates = {c["name"]: c for c in model.manifest["components"]["attention"]["candidates"]}
    assert not candidates["sdpa"]["accepted"] and "deny list" in candidates["sdpa"]["reasons"][0]

    registry.reset()
    monkeypatch.setenv("REGISTRY_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("REGISTRY_PLUGINS_ALLOW", "dist:registry-transformers")
    registry.reset()
    assert records("attention")["sdpa"]["status"] == "ok"
    monkeypatch.setenv("REGISTRY_PLUGINS_ALLOW", "bloom,alibi,eager,dynamic,causal-lm")
    registry.reset()
    assert records("attention")["sdpa"]["status"] == "blocked"
    assert "autoload is disabled" in records("attention")["sdpa"]["error"]
    model = registry.build("bloom-560m", n_layer=1, device="meta")
    assert model.manifest["components"]["attention"]["chosen"] == "eager"


class Doubled(AttentionBackend):
    """A deliberately different backend for registration tests."""

    name = "doubled"
    capabilities = AttentionCapabilities(bias_kinds=frozenset({"alibi"}))

    def __call__(self, q, k, v, *, mask, bias, scale, dropout=0.0, need_weights=False):
        return AttentionOutput(torch.zeros_like(q), None)


def test_register_in_process_and_duplicates():
    registry.register(Doubled())
    assert records("attention")["doubled"]["origin"] == "register"
    model = registry.build("bloom-560m", n_layer=1, attention="doubled", device="meta")
    assert model.manifest["components"]["attention"]["chosen"] == "doubled"
    with pytest.raises(registry.DuplicateComponentError, match="already exists"):
        registry.register(Doubled())
    clash = Doubled()
    clash.name = "sdpa"
    with pytest.raises(registry.DuplicateComponentError, match="registry-transformers"):
        registry.register(clash)
    registry.register(clash, replace=True)
    assert records("attention")["sdpa"]["origin"] == "register"
    registry.unregister("attention", "doubled")
    assert "doubled" not in records("attention")


def test_hooks_offer_presets_and_see_builds():
    seen = []

    class Hooks:
        @registry.hookimpl
        def registry_presets(self):
            return {"tiny-bloom": {"family": "bloom", "config": {"hidden_size": 32, "n_layer": 1, "n_head": 4}}}

        @registry.hookimpl
        def registry_build_finished(self, model, manifest):
            seen.append(manifest["spec"]["name"])

    registry.register_hooks(Hooks())
    assert "tiny-bloom" in registry.presets()
    model = registry.build("tiny-bloom", device="meta")
    assert model.config.hidden_size == 32 and seen == ["tiny-bloom"]
