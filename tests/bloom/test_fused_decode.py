"""Attention 'fused-decode': a decode step of BLOOM's blocks in one kernel call, attention and cache writes
included (registry.fused.DecodePlan; bfloat16 on the AMX kernel, float32 on the AVX-512 kernel), against
the module path ('sdpa') and the reference."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import registry
from registry import amx, avx512, chains
from registry.errors import CacheOverflowError, IncompatibleComponentsError
from registry.fused import disabled as fused_off
from registry.interfaces import KVCache

from .conftest import PAD, left_padded_batch

needs_amx = pytest.mark.skipif(not amx.ready(), reason=f"AMX kernel not usable here: {amx.status().reason}")
needs_avx512 = pytest.mark.skipif(
    not avx512.ready(), reason=f"AVX-512 kernel not usable here: {avx512.status().reason}"
)
# each dtype with the kernel its fused step runs on
DTYPES = [pytest.param("bfloat16", marks=needs_amx), pytest.param("float32", marks=needs_avx512)]


def _models(folder, cache: str = "dynamic", dtype: str = "bfloat16"):
    fused = registry.from_pretrained(folder, dtype=dtype, attention="fused-decode", cache=cache)
    plain = registry.from_pretrained(folder, dtype=dtype, attention="sdpa", cache=cache)
    return fused, plain


def _count_steps(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = chains.run_decode_step
    monkeypatch.setattr(chains, "run_decode_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _decode(model, ids, mask, tokens, cache=None):
    """Logits of the prompt's last position and of each decode step feeding ``tokens`` (batch, steps)."""
    out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    for step in range(tokens.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = model(input_ids=tokens[:, step : step + 1], attention_mask=mask, past_key_values=out.past_key_values)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1).float()


def _truth(ref, folder, ids, mask, tokens):
    """The reference's last-position logits over the same growing sequences, uncached: (float32, bfloat16)."""
    bf16 = type(ref).from_pretrained(folder, dtype=torch.bfloat16).eval()
    result = []
    for model in (ref, bf16):
        rows = []
        for step in range(tokens.shape[1] + 1):
            full = torch.cat([ids, tokens[:, :step]], 1)
            full_mask = torch.cat([mask, torch.ones_like(tokens[:, :step])], 1)
            rows.append(model(input_ids=full, attention_mask=full_mask).logits[:, -1].float())
        result.append(torch.stack(rows, 1))
    return result


@pytest.mark.parametrize("config", ["h2-decode-kernel", "h2-decode-kernel-d48"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_decode_steps_run_as_one_kernel_call_each_with_the_module_path_s_numbers(
    reference_checkpoint, monkeypatch, cache, dtype, config
):
    ref, folder = reference_checkpoint("causal-lm", config)
    fused, plain = _models(folder, cache, dtype)
    ids, mask = left_padded_batch(length=7)  # rows padded by 0, 2 and 4 tokens
    tokens = torch.randint(4, 100, (3, 6), generator=torch.Generator().manual_seed(1))
    steps = _count_steps(monkeypatch)
    with torch.no_grad():
        new = (lambda m: m.new_cache(3, 7 + 6)) if cache == "static" else (lambda m: None)
        got = _decode(fused, ids, mask, tokens, new(fused))
        # every decode step, and the prompt in bfloat16 (its 21 rows are more than the float32 kernel takes)
        fused_calls = tokens.shape[1] + (dtype == "bfloat16")
        assert len(steps) == fused_calls
        plain_logits = _decode(plain, ids, mask, tokens, new(plain))
        assert len(steps) == fused_calls  # 'sdpa' never fuses: the two can be A/B tested
        exact, reference = _truth(ref, folder, ids, mask, tokens)
    if dtype == "float32":  # the same function, summed in another order
        torch.testing.assert_close(got, exact, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got, plain_logits, atol=1e-4, rtol=1e-4)
        return
    # bfloat16 keeps 8 bits of mantissa: against the float32 truth, ours no worse than the reference
    reference_error = (reference - exact).abs().max()
    assert (got - exact).abs().max() <= 2 * reference_error + 1e-3
    assert (got - plain_logits).abs().max() <= 2 * reference_error + 1e-3


def _prompt(batch: int, length: int, pad: int, seed: int):
    """Token ids whose last row is left-padded by ``pad``, and the mask."""
    ids = torch.randint(4, 100, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    ids[-1, :pad], mask[-1, :pad] = PAD, 0
    return ids, mask


def _prompt_logits(model, ids, mask, cut=None, cache=None):
    """Logits at every position of a prompt fed whole, or as ids[:, :cut] then the rest (a second chunk)."""
    if cut is None:
        return model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits.float()
    first = model(input_ids=ids[:, :cut], attention_mask=mask[:, :cut], past_key_values=cache, use_cache=True)
    second = model(input_ids=ids[:, cut:], attention_mask=mask, past_key_values=first.past_key_values)
    return torch.cat([first.logits, second.logits], 1).float()


@needs_amx
@pytest.mark.parametrize("cut", [None, 37], ids=["whole", "in-two-chunks"])
@pytest.mark.parametrize("config", ["h2-decode-kernel", "h2-decode-kernel-d48", "h2-decode-kernel-d64",
                                    "h2-decode-kernel-d128"])  # fmt: skip
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_a_bfloat16_prompt_runs_as_one_kernel_call_with_the_module_path_s_numbers(
    reference_checkpoint, monkeypatch, cache, config, cut
):
    """Prompts of 45 tokens (several blocks of 16 and 32 keys, odd counts), the second row left-padded by 6:
    every real position's logits against the float32 truth and the module path ('sdpa'); in two chunks,
    the second (8 tokens) attends to the first's keys in the cache."""
    ref, folder = reference_checkpoint("causal-lm", config)
    fused, plain = _models(folder, cache)
    ids, mask = _prompt(2, 45, pad=6, seed=7)
    real = mask.bool()
    steps = _count_steps(monkeypatch)
    with torch.no_grad():
        new = (lambda m: m.new_cache(2, 45)) if cache == "static" else (lambda m: None)
        got = _prompt_logits(fused, ids, mask, cut, new(fused))
        assert len(steps) == (1 if cut is None else 2)
        plain_logits = _prompt_logits(plain, ids, mask, cut, new(plain))
        assert len(steps) == (1 if cut is None else 2)
        exact = ref(input_ids=ids, attention_mask=mask).logits.float()
        bf16 = type(ref).from_pretrained(folder, dtype=torch.bfloat16).eval()
        reference_error = (bf16(input_ids=ids, attention_mask=mask).logits.float() - exact)[real].abs().max()
    assert (got - exact)[real].abs().max() <= 2 * reference_error + 1e-3
    assert (got - plain_logits)[real].abs().max() <= 2 * reference_error + 1e-3


@needs_avx512
def test_a_float32_prompt_of_few_rows_runs_in_the_kernel_token_by_token(reference_checkpoint, monkeypatch):
    ref, folder = reference_checkpoint("causal-lm", "h2-decode-kernel-d48")
    fused, _ = _models(folder, dtype="float32")
    ids, mask = _prompt(2, 8, pad=3, seed=8)
    steps = _count_steps(monkeypatch)
    with torch.no_grad():
        got = _prompt_logits(fused, ids, mask, cut=5)  # 10 rows, then 6: at most the kernel's 16
        assert len(steps) == 2
        exact = ref(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], exact[mask.bool()], atol=1e-4, rtol=1e-4)


@needs_amx
def test_a_prompt_of_more_rows_than_the_kernel_takes_runs_module_by_module(reference_checkpoint, monkeypatch):
    _, folder = reference_checkpoint("causal-lm", "h2-decode-kernel")
    fused, plain = _models(folder)
    ids, mask = _prompt(2, 128, pad=0, seed=9)  # 256 rows: AMX_MAX_ROWS
    steps = _count_steps(monkeypatch)
    with torch.no_grad():
        got, expected = _prompt_logits(fused, ids, mask), _prompt_logits(plain, ids, mask)
    assert len(steps) == 0 and torch.equal(got, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_generation_is_the_module_path_s_and_the_reference_s_tokens(
    reference_checkpoint, monkeypatch, cache, dtype
):
    ref, folder = reference_checkpoint("causal-lm", "h2-decode-kernel")
    fused, plain = _models(folder, cache, dtype)
    reference = type(ref).from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    ids, mask = left_padded_batch(length=7)
    steps = _count_steps(monkeypatch)
    got = fused.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    assert len(steps) == 9 + (dtype == "bfloat16")  # the prompt gives the first new token (fused in bfloat16)
    expected = plain.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    with torch.no_grad():
        theirs = reference.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD
        )
    assert torch.equal(got, expected)
    assert torch.equal(got, theirs)


@needs_amx
def test_a_dynamic_cache_grows_inside_a_fused_step(reference_checkpoint, monkeypatch):
    ref, folder = reference_checkpoint("causal-lm", "h2-decode-kernel")
    fused, _ = _models(folder)
    ids = torch.randint(4, 100, (2, 62), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    tokens = torch.randint(4, 100, (2, 5), generator=torch.Generator().manual_seed(3))
    steps = _count_steps(monkeypatch)
    with torch.no_grad():
        got = _decode(fused, ids, mask, tokens)  # the buffers hold 64 tokens: the third step grows them
        assert len(steps) == 1 + 5  # the prompt, into an empty cache, then the steps
        exact, reference = _truth(ref, folder, ids, mask, tokens)
    assert (got - exact).abs().max() <= 2 * (reference - exact).abs().max() + 1e-3


@needs_amx
def test_past_a_static_cache_s_length_is_a_clear_error(reference_checkpoint):
    _, folder = reference_checkpoint("causal-lm", "h2-decode-kernel")
    fused, _ = _models(folder, "static")
    ids, mask = left_padded_batch(length=7)
    cache = fused.new_cache(3, 8)
    with torch.no_grad():
        fused(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        step = torch.full((3, 1), 5)
        fused(input_ids=step, attention_mask=torch.ones(3, 8, dtype=torch.long), past_key_values=cache)
        with pytest.raises(CacheOverflowError, match="holds 8 tokens"):
            fused(input_ids=step, attention_mask=torch.ones(3, 9, dtype=torch.long), past_key_values=cache)
    assert cache.get_seq_length() == 8  # the refused step stored nothing


class _Wrapped(KVCache):
    """A cache that does not hand out its buffers (KVCache.reserve's default)."""

    def __init__(self, inner: KVCache):
        self.inner = inner

    def update(self, layer, key, value):
        return self.inner.update(layer, key, value)

    def get_seq_length(self, layer: int = 0) -> int:
        return self.inner.get_seq_length(layer)


@needs_amx
def test_steps_the_kernel_cannot_take_run_module_by_module(reference_checkpoint, monkeypatch):
    _, folder = reference_checkpoint("causal-lm", "h2-decode-kernel")
    fused, _ = _models(folder)
    ids, mask = left_padded_batch(length=7)
    tokens = torch.randint(4, 100, (3, 3), generator=torch.Generator().manual_seed(4))
    steps = _count_steps(monkeypatch)
    with torch.no_grad():
        expected = _decode(fused, ids, mask, tokens)
        assert len(steps) == 1 + 3
        steps.clear()
        # a cache that does not hand out its buffers
        got = _decode(fused, ids, mask, tokens, _Wrapped(fused.new_cache(3, None)))
        assert len(steps) == 0 and (got - expected).abs().max() <= 0.1  # logits up to ~5: a few bfloat16 steps
        # hidden states asked for
        out = fused(input_ids=ids, attention_mask=mask, use_cache=True)
        steps.clear()
        step = fused(
            input_ids=tokens[:, :1], attention_mask=torch.cat([mask, torch.ones_like(mask[:, :1])], 1),
            past_key_values=out.past_key_values, output_hidden_states=True,
        )  # fmt: skip
        assert len(steps) == 0 and len(step.hidden_states) == 4
        # a forward hook inside a block: it runs, on the module path
        seen = []
        handle = fused.backbone.h[1].mlp.dense_4h_to_h.register_forward_hook(lambda *args: seen.append(1))
        got = _decode(fused, ids, mask, tokens)
        handle.remove()
        assert len(steps) == 0 and len(seen) == 4 and (got - expected).abs().max() <= 0.1


def test_fused_decode_is_refused_where_it_cannot_serve_with_the_reason(monkeypatch):
    with pytest.raises(IncompatibleComponentsError, match="runs on cpu, not meta"):
        registry.build("bloom-560m", n_layer=1, attention="fused-decode", device="meta")
    report = registry.explain("bert-base-uncased", num_hidden_layers=1, dtype="bfloat16", attention="fused-decode")
    assert "does not run its decode steps as one kernel call" in report["slots"]["attention"]["reason"]
    monkeypatch.setattr(amx, "status", lambda: amx.Status(False, "AMX switched off for this test"))
    monkeypatch.setattr(avx512, "status", lambda: avx512.Status(False, "AVX-512 switched off for this test"))
    with pytest.raises(IncompatibleComponentsError, match="AMX kernel for bfloat16, .*AMX switched off"):
        registry.build("bloom-560m", n_layer=1, dtype="bfloat16", attention="fused-decode")
    with pytest.raises(IncompatibleComponentsError, match="AVX-512 kernel for float32, .*AVX-512 switched off"):
        registry.build("bloom-560m", n_layer=1, dtype="float32", attention="fused-decode")
    # auto then takes sdpa, and says why fused-decode was not taken
    components = registry.build("bloom-560m", n_layer=1, dtype="bfloat16").manifest["components"]["attention"]
    candidates = {c["name"]: c for c in components["candidates"]}
    assert components["chosen"] == "sdpa" and "AMX switched off" in candidates["fused-decode"]["reasons"][0]


@needs_amx
def test_the_kept_plan_follows_replaced_parameters_and_replaced_blocks(reference_checkpoint, monkeypatch):
    _, folder = reference_checkpoint("causal-lm", "h2-decode-kernel")
    fused, plain = _models(folder)
    ids, mask = left_padded_batch(length=7)
    tokens = torch.randint(4, 100, (3, 2), generator=torch.Generator().manual_seed(5))
    steps = _count_steps(monkeypatch)
    with torch.no_grad():
        _decode(fused, ids, mask, tokens)  # a plan is made and kept
        assert len(steps) == 3
        for model in (fused, plain):  # a new parameter object, at a new address
            layer = model.backbone.h[1].mlp.dense_4h_to_h
            layer.weight = torch.nn.Parameter(layer.weight.detach().flip(0).clone())
        got, expected = _decode(fused, ids, mask, tokens), _decode(plain, ids, mask, tokens)
        assert len(steps) == 6
        assert (got - expected).abs().max() <= 0.1
        # a block wrapped after the plan was made, between two steps of one cache: the module path calls it
        out = fused(input_ids=ids, attention_mask=mask, use_cache=True)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = fused(input_ids=tokens[:, :1], attention_mask=mask, past_key_values=out.past_key_values)
        assert len(steps) == 8
        fused.backbone.h[2] = _Logged(fused.backbone.h[2])
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        fused(input_ids=tokens[:, 1:], attention_mask=mask, past_key_values=out.past_key_values)
        assert len(steps) == 8 and fused.backbone.h[2].calls == 1


class _Logged(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x, **kwargs):
        self.calls += 1
        return self.inner(x, **kwargs)


@needs_amx
def test_a_model_that_ran_fused_steps_copies_and_pickles(reference_checkpoint):
    _, folder = reference_checkpoint("causal-lm", "h2-decode-kernel")
    fused, _ = _models(folder)
    ids, mask = left_padded_batch(length=7)
    first = fused.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[])
    copied = copy.deepcopy(fused)  # its own parameters: its own plan
    with torch.no_grad():
        for p in fused.parameters():
            p.zero_()  # the original changes in place; the copy must not follow
    assert torch.equal(copied.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[]), first)
    buffer = io.BytesIO()
    torch.save(copied, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[]), first)


class _Doubled(torch.nn.Linear):
    """A linear layer with a forward of its own: the fast path must call it, not read its weight."""

    def forward(self, x):
        return 2 * super().forward(x)


class _Scaled(torch.nn.Module):
    """A weight parametrization: the weight is computed on each access (no parameter of that name)."""

    def forward(self, weight):
        return 3 * weight


@needs_amx
def test_replaced_parametrized_or_subclassed_layers_are_followed(reference_checkpoint, monkeypatch):
    from torch.nn.utils import parametrize

    _, folder = reference_checkpoint("causal-lm", "h2-decode-kernel")
    fused, plain = _models(folder)
    ids, mask = left_padded_batch(length=7)
    tokens = torch.randint(4, 100, (3, 2), generator=torch.Generator().manual_seed(6))
    steps = _count_steps(monkeypatch)
    with torch.no_grad():
        _decode(fused, ids, mask, tokens)  # a plan is kept
        assert len(steps) == 3
        replaced = []  # kept alive: the plan must notice the new module, not the old one's end
        for model in (fused, plain):  # a new module inside a kept block: a new plan reads its weights
            old = model.backbone.h[0].mlp.dense_4h_to_h
            replaced.append(old)
            new = torch.nn.Linear(old.in_features, old.out_features, dtype=old.weight.dtype).eval()
            new.weight.copy_(old.weight * 5)
            new.bias.copy_(old.bias)
            model.backbone.h[0].mlp.dense_4h_to_h = new
        got, expected = _decode(fused, ids, mask, tokens), _decode(plain, ids, mask, tokens)
        assert len(steps) == 6 and (got - expected).abs().max() <= 0.1
        for model in (fused, plain):  # a parametrized weight: computed per access, never planned
            parametrize.register_parametrization(model.backbone.h[1].self_attention.dense, "weight", _Scaled())
            model.eval()
        got, expected = _decode(fused, ids, mask, tokens), _decode(plain, ids, mask, tokens)
        assert len(steps) == 6 and torch.isfinite(got).all() and (got - expected).abs().max() <= 0.1
        for model in (fused, plain):  # a subclass with its own forward: called as a module
            parametrize.remove_parametrizations(model.backbone.h[1].self_attention.dense, "weight")
            old = model.backbone.h[1].self_attention.dense
            doubled = _Doubled(old.in_features, old.out_features, dtype=old.weight.dtype).eval()
            doubled.load_state_dict(old.state_dict())
            model.backbone.h[1].self_attention.dense = doubled
        got, expected = _decode(fused, ids, mask, tokens), _decode(plain, ids, mask, tokens)
        assert len(steps) == 6 and (got - expected).abs().max() <= 0.1
        with fused_off():
            unfused = _decode(plain, ids, mask, tokens)
        assert (expected - unfused).abs().max() <= 0.1  # the subclass's forward ran on the fast path too


def test_fused_decode_refuses_heads_its_kernel_does_not_take_without_building_kernels(monkeypatch):
    def no_kernels():
        raise AssertionError("selection built a kernel to refuse a model it could refuse without one")

    report = registry.explain("bloom-560m", hidden_size=160, n_head=4, n_layer=1, dtype="bfloat16")
    attention = report["slots"]["attention"]
    candidates = {c["name"]: c for c in attention["candidates"]}
    assert attention["chosen"] == "sdpa" and "heads of 40" in candidates["fused-decode"]["reasons"][0]
    monkeypatch.setattr(amx, "status", no_kernels)
    monkeypatch.setattr(avx512, "status", no_kernels)
    assert registry.explain("bloom-560m", n_layer=1, device="meta")["slots"]["attention"]["chosen"] == "sdpa"
    assert registry.explain("bert-base-uncased", num_hidden_layers=1)["slots"]["attention"]["chosen"] == "sdpa"


@needs_avx512
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_seeded_sampling_on_fused_steps_draws_the_reference_s_tokens(reference_checkpoint, monkeypatch, cache):
    ref, folder = reference_checkpoint("causal-lm", "h2-decode-kernel")
    fused, _ = _models(folder, cache, "float32")
    ids, mask = left_padded_batch(length=7)
    steps = _count_steps(monkeypatch)
    options = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    torch.manual_seed(5)
    with torch.no_grad():
        expected = ref.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=10, pad_token_id=PAD, eos_token_id=None, **options
        )
    got = fused.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[], seed=5, **options)
    assert len(steps) == 9 and torch.equal(got, expected)
