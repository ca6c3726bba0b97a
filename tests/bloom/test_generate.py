"""generate() against the reference's generate() on tiny random BLOOMs: greedy and seeded sampling
token-identical for every attention and cache plugin, with left padding, EOS (one or several),
min_new_tokens, repetition penalty; stop strings and streamers."""

from __future__ import annotations

import threading

import pytest
import torch

import registry
from registry.discovery import default_catalog
from registry.generate import TokenStreamer

from .conftest import CONFIGS, PAD, left_padded_batch


def _fitting(slot: str) -> list[str]:
    """Catalogued components of ``slot`` that selection accepts for the tests' BLOOM (h8-post-ln, CPU fp32)."""
    names = []
    for name in default_catalog().names(slot):
        report = registry.explain("bloom-560m", **CONFIGS["h8-post-ln"], device="cpu", **{slot: name})
        if report["slots"][slot]["chosen"] == name:
            names.append(name)
    return names


ATTENTIONS = _fitting("attention")
CACHES = _fitting("cache")


def reference_generate(ref, ids, mask, **options):
    options.setdefault("eos_token_id", None)
    with torch.no_grad():
        return ref.generate(input_ids=ids, attention_mask=mask, pad_token_id=PAD, **options)


def test_every_first_party_plugin_is_exercised():
    # 'fused-decode' refuses these heads of 8 values: test_fused_decode.py runs it on heads its kernel takes
    assert {"eager", "sdpa"} <= set(ATTENTIONS) and {"dynamic", "static"} <= set(CACHES)


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_greedy_generation_is_token_identical_with_left_padding(reference_checkpoint, attention, cache):
    ref, folder = reference_checkpoint("causal-lm", "h8-post-ln")
    ours = registry.from_pretrained(folder, attention=attention, cache=cache)
    assert ours.manifest["components"]["cache"]["chosen"] == cache
    ids, mask = left_padded_batch(length=7)
    expected = reference_generate(ref, ids, mask, max_new_tokens=12, do_sample=False)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    assert got.shape == (3, 7 + 12)
    assert torch.equal(got, expected)


def _token_emitted(ref, ids, mask, row: int, step: int) -> int:
    free = reference_generate(ref, ids, mask, max_new_tokens=10, do_sample=False)
    return int(free[row, ids.shape[1] + step])


@pytest.mark.parametrize("cache", CACHES)
def test_rows_that_reach_eos_are_padded_as_the_reference_does(reference_checkpoint, cache):
    ref, folder = reference_checkpoint("causal-lm", "h8-post-ln")
    ours = registry.from_pretrained(folder, attention="eager", cache=cache)
    ids, mask = left_padded_batch(length=7)
    eos = _token_emitted(ref, ids, mask, row=0, step=3)
    expected = reference_generate(ref, ids, mask, max_new_tokens=10, do_sample=False, eos_token_id=eos)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(got, expected)
    assert (got[0, 7 + 4 :] == PAD).all()


def test_several_eos_ids_and_early_stop_of_the_whole_batch(reference_checkpoint):
    ref, folder = reference_checkpoint("causal-lm", "h8-post-ln")
    ours = registry.from_pretrained(folder)
    ids, mask = left_padded_batch(length=7)
    eos = sorted({_token_emitted(ref, ids, mask, row=r, step=2) for r in range(3)})
    expected = reference_generate(ref, ids, mask, max_new_tokens=10, do_sample=False, eos_token_id=eos)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(got, expected)
    assert got.shape[1] < 7 + 10  # every row finished: generation stopped early


def test_min_new_tokens_suppresses_eos_as_the_reference_does(reference_checkpoint):
    ref, folder = reference_checkpoint("causal-lm", "h8-post-ln")
    ours = registry.from_pretrained(folder)
    ids, mask = left_padded_batch(length=7)
    eos = _token_emitted(ref, ids, mask, row=1, step=1)
    options = dict(max_new_tokens=10, eos_token_id=eos, min_new_tokens=5)
    expected = reference_generate(ref, ids, mask, do_sample=False, **options)
    got = ours.generate(ids, attention_mask=mask, pad_token_id=PAD, **options)
    assert torch.equal(got, expected)
    assert not (got[:, 7 : 7 + 5] == eos).any()


def test_repetition_penalty_is_the_reference_s(reference_checkpoint):
    ref, folder = reference_checkpoint("causal-lm", "h8-post-ln")
    ours = registry.from_pretrained(folder)
    ids, mask = left_padded_batch(length=7)
    plain = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    expected = reference_generate(ref, ids, mask, max_new_tokens=12, do_sample=False, repetition_penalty=10.0)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[], repetition_penalty=10.0)
    assert torch.equal(got, expected)
    assert not torch.equal(got, plain)


SAMPLING = [
    dict(top_k=20),
    dict(top_k=0, top_p=0.8),
    dict(temperature=0.7, top_k=30, top_p=0.9),
    dict(top_k=0, repetition_penalty=1.3),
    dict(),  # the reference's defaults (top_k=50)
]


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("options", SAMPLING, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_seeded_sampling_draws_the_reference_s_tokens(reference_checkpoint, options, cache):
    """The same filters in the same order, and the same draw: torch.manual_seed(s) for the reference,
    seed=s for ours, give the same tokens. Eager attention keeps the logits' differences to the linear
    layers' rounding (the float32 kernel for a few rows sums in another order: about 1e-7), so a token
    differs only where a draw or a top-p boundary falls that close."""
    ref, folder = reference_checkpoint("causal-lm", "h8-post-ln")
    ours = registry.from_pretrained(folder, cache=cache, attention="eager")
    ids, mask = left_padded_batch(length=7)
    torch.manual_seed(5)
    expected = reference_generate(ref, ids, mask, max_new_tokens=12, do_sample=True, **options)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[], do_sample=True, seed=5, **options)
    assert torch.equal(got, expected)


def test_sampling_is_reproducible_under_a_seed_or_a_generator():
    model = registry.build("bloom-560m", n_layer=2, hidden_size=32, n_head=4, vocab_size=50)
    ids = torch.tensor([[5, 6, 7]])
    options = dict(max_new_tokens=8, do_sample=True, top_k=10, eos_token_id=[])
    a = model.generate(ids, seed=7, **options)
    b = model.generate(ids, seed=7, **options)
    c = model.generate(ids, seed=8, **options)
    d = model.generate(ids, generator=torch.Generator().manual_seed(7), **options)
    assert torch.equal(a, b) and torch.equal(a, d) and a.shape == (1, 11)
    assert not torch.equal(a, c)


class CharTokenizer:
    """Token id i reads as chr(ord('a') + i % 26): enough to test stop strings on text."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + int(i) % 26) for i in ids)


def test_stop_strings_end_a_row_after_the_token_that_completes_them(reference_checkpoint):
    ref, folder = reference_checkpoint("causal-lm", "h8-post-ln")
    ours = registry.from_pretrained(folder)
    ours.tokenizer = CharTokenizer()
    ids, mask = left_padded_batch(length=7)
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    text = CharTokenizer().decode(free[0, 7:].tolist())
    stop = text[3:5]  # row 0 completes it at its 5th new token (or earlier, if it appears before)
    first = text.index(stop) + len(stop)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[], stop_strings=[stop, "zzzzzz"])
    assert torch.equal(got[0, : 7 + first], free[0, : 7 + first])
    assert (got[0, 7 + first :] == PAD).all()
    for row in (1, 2):  # rows without the stop string run on unchanged
        row_text = CharTokenizer().decode(got[row, 7:].tolist())
        if stop not in row_text:
            assert torch.equal(got[row], free[row, : got.shape[1]])


def test_stop_strings_need_a_tokenizer():
    model = registry.build("bloom-560m", n_layer=1, hidden_size=32, n_head=4, vocab_size=50)
    with pytest.raises(registry.InputError, match="tokenizer"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, stop_strings=["x"])


def test_a_callback_streamer_sees_every_new_token_in_order():
    model = registry.build("bloom-560m", n_layer=2, hidden_size=32, n_head=4, vocab_size=50)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    seen: list[torch.Tensor] = []
    out = model.generate(ids, max_new_tokens=6, eos_token_id=[], streamer=seen.append)
    assert len(seen) == 6 and all(t.shape == (2,) for t in seen)
    assert torch.equal(torch.stack(seen, 1), out[:, 3:])


def test_an_iterator_streamer_yields_tokens_while_generation_runs_in_a_thread():
    model = registry.build("bloom-560m", n_layer=2, hidden_size=32, n_head=4, vocab_size=50)
    ids = torch.tensor([[5, 6, 7]])
    streamer = TokenStreamer(timeout=60)
    result: dict[str, torch.Tensor] = {}
    thread = threading.Thread(
        target=lambda: result.update(out=model.generate(ids, max_new_tokens=5, eos_token_id=[], streamer=streamer))
    )
    thread.start()
    streamed = [tokens for tokens in streamer]
    thread.join()
    assert torch.equal(torch.stack(streamed, 1), result["out"][:, 3:])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(min_new_tokens=9, max_new_tokens=4), "min_new_tokens"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(seed=1, generator=torch.Generator()), "seed or a generator"),
    ],
)
def test_invalid_options_are_named(options, message):
    model = registry.build("bloom-560m", n_layer=1, hidden_size=32, n_head=4, vocab_size=50)
    with pytest.raises(registry.InputError, match=message):
        model.generate(torch.tensor([[1, 2]]), **options)


def test_generate_needs_a_causal_lm_head():
    model = registry.build("bloom-560m", n_layer=1, hidden_size=32, n_head=4, vocab_size=50, head="base")
    with pytest.raises(registry.InputError, match="causal-lm"):
        model.generate(torch.tensor([[1, 2]]))


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_each_decode_step_builds_the_alibi_bias_once_and_projects_one_position(monkeypatch, cache):
    from registry.interfaces import AlibiBias

    model = registry.build("bloom-560m", n_layer=4, hidden_size=32, n_head=4, vocab_size=50, cache=cache)
    builds: list[tuple[int, ...]] = []
    original = AlibiBias.materialize

    def counting(self, q, k):
        out = original(self, q, k)
        builds.append(tuple(out.shape))
        return out

    monkeypatch.setattr(AlibiBias, "materialize", counting)
    projected: list[tuple[int, ...]] = []
    head = model.head.lm_head
    head.register_forward_hook(lambda module, args, out: projected.append(tuple(out.shape)))
    ids = torch.tensor([[5, 6, 7, 8], [9, 9, 10, 11]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    model.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[])
    assert len(builds) == 5  # prefill + 4 decode steps, one each for all 4 layers
    assert projected == [(2, 1, 50)] * 5  # logits of the last position only


def test_greedy_choice_is_the_first_maximal_token_as_argmax():
    from registry.generate import choose

    scores = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -2.0, -1.0, -3.0]])
    assert choose(scores, do_sample=False, generator=None).tolist() == [1, 0, 0]
    wide = torch.randn(3, 250880).bfloat16().float()  # bfloat16 logits tie often
    assert torch.equal(choose(wide, do_sample=False, generator=None), wide.argmax(-1))


def test_plain_greedy_chooses_on_bfloat16_logits_as_on_their_float32_copy():
    """generate() skips the float32 copy of the logits when nothing processes them (plain greedy): the
    choice must be the float32 argmax's, ties included."""
    from registry.generate import choose

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(8, 250880, generator=g) * 4).bfloat16()  # ties at the top in most rows
    logits[0, 7] = logits[0, 250000] = logits[0].max() + 1  # a certain tie, the later one last
    logits[1, 3] = float("nan")  # a NaN row: argmax's answer too
    expected = logits.float().argmax(-1)
    assert torch.equal(choose(logits, do_sample=False, generator=None), expected)
    assert choose(logits, do_sample=False, generator=None)[0] == 7


@pytest.mark.parametrize(
    ("options", "steps_processed"),
    [
        ({}, []),
        ({"min_new_tokens": 2}, [0, 1]),
        ({"repetition_penalty": 1.3}, [0, 1, 2, 3]),
        ({"repetition_penalty": 1.0, "min_new_tokens": 1}, [0]),
        ({"do_sample": True, "seed": 0}, [0, 1, 2, 3]),
    ],
)
def test_logits_are_processed_exactly_where_an_option_changes_them(monkeypatch, options, steps_processed):
    import registry.generate as generation

    model = registry.build("bloom-560m", n_layer=1, hidden_size=32, n_head=4, vocab_size=60).eval()
    seen: list[int] = []
    original = generation.next_token_scores

    def spy(logits, tokens, step, resolved):
        seen.append(step)
        return original(logits, tokens, step, resolved)

    monkeypatch.setattr(generation, "next_token_scores", spy)
    ids = torch.randint(0, 60, (2, 3), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, max_new_tokens=4, eos_token_id=[7], **options)
    assert seen == steps_processed[: out.shape[1] - 3]


def test_float64_logits_are_rounded_to_float32_before_the_choice_as_the_reference_does():
    from registry.generate import _processes, resolve_options

    model = registry.build("bloom-560m", n_layer=1, hidden_size=32, n_head=4, vocab_size=60)
    options = resolve_options(
        model.config, max_new_tokens=4, min_new_tokens=0, do_sample=False, temperature=1.0, top_k=None,
        top_p=None, repetition_penalty=None, eos_token_id=[], pad_token_id=None, stop_strings=None,
    )  # fmt: skip
    near_tie = torch.tensor([[1.0, 1.0 + 2**-40]], dtype=torch.float64)  # equal once rounded to float32
    assert _processes(near_tie, 0, options)
    assert not _processes(near_tie.bfloat16(), 0, options) and not _processes(near_tie.float(), 0, options)


def test_an_empty_batch_generates_nothing():
    model = registry.build("bloom-560m", n_layer=1, hidden_size=32, n_head=4, vocab_size=300)
    got = model.generate(torch.empty(0, 5, dtype=torch.long), max_new_tokens=2, eos_token_id=[])
    assert got.shape == (0, 6)  # all rows of an empty batch are finished after the first step
