"""Generation: prefill, then one token at a time through the model's KV cache.

Split into small functions (``prefill``, ``decode_step``, ``next_token_scores``, ``choose``) so that
each step is one unit a compiler or a CUDA graph can take whole. The logits processing follows the
reference's order and arithmetic (repetition penalty, minimum new tokens, then temperature, top-k,
top-p), so a seeded run draws from the same distributions.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from registry import avx512
from registry.errors import InputError


@runtime_checkable
class Streamer(Protocol):
    """Receives each generated step: ``put(tokens)`` with a LongTensor (batch,) holding the new token of
    every row (``pad_token_id`` for rows that have finished), then ``end()`` once."""

    def put(self, tokens: Tensor) -> None: ...

    def end(self) -> None: ...


class TokenStreamer:
    """A streamer to iterate over from another thread while ``generate`` runs.

    Example:
        >>> streamer = TokenStreamer()
        >>> threading.Thread(target=model.generate, args=(ids,), kwargs={"streamer": streamer}).start()
        >>> for tokens in streamer:      # LongTensor (batch,), one per step
        ...     print(tokenizer.decode(tokens[:1]), end="", flush=True)
    """

    _DONE = object()

    def __init__(self, timeout: float | None = None):
        self._queue: queue.Queue[Any] = queue.Queue()
        self.timeout = timeout

    def put(self, tokens: Tensor) -> None:
        self._queue.put(tokens.detach().cpu())

    def end(self) -> None:
        self._queue.put(self._DONE)

    def __iter__(self) -> Iterator[Tensor]:
        while True:
            item = self._queue.get(timeout=self.timeout)
            if item is self._DONE:
                return
            yield item


StreamerLike = Streamer | Callable[[Tensor], Any]


@dataclass(frozen=True)
class GenerationOptions:
    """Checked generation settings (see :func:`generate` for their meaning)."""

    max_new_tokens: int
    min_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    repetition_penalty: float | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    stop_strings: tuple[str, ...]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(message)


def resolve_options(
    config: Any,
    *,
    max_new_tokens: int,
    min_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float | None,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int | None,
    stop_strings: str | Sequence[str] | None,
) -> GenerationOptions:
    """Validate the options and fill EOS and padding from the model's config.

    EOS: ``eos_token_id`` if given (``[]`` for none), else the config's. Padding: ``pad_token_id``,
    else the config's, else the first EOS id, else 0.

    Raises:
        InputError: a value out of range, naming it and what is allowed.
    """
    _check(max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {max_new_tokens}")
    _check(
        0 <= min_new_tokens <= max_new_tokens,
        f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens}",
    )
    _check(temperature > 0, f"temperature must be > 0, got {temperature} (do_sample=False is greedy)")
    _check(top_k is None or top_k >= 0, f"top_k must be >= 0 (0 or None: no top-k filter), got {top_k}")
    _check(top_p is None or 0 < top_p <= 1, f"top_p must be in (0, 1] or None, got {top_p}")
    _check(
        repetition_penalty is None or repetition_penalty > 0,
        f"repetition_penalty must be > 0 (1.0 is none), got {repetition_penalty}",
    )
    eos = eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None)
    eos_ids = (eos,) if isinstance(eos, int) else tuple(int(e) for e in (eos or ()))
    pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    stops = (stop_strings,) if isinstance(stop_strings, str) else tuple(stop_strings or ())
    _check(all(isinstance(s, str) and s for s in stops), f"stop_strings must be non-empty strings, got {stops!r}")
    return GenerationOptions(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        do_sample=do_sample,
        temperature=float(temperature),
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        eos_token_ids=eos_ids,
        pad_token_id=int(pad),
        stop_strings=stops,
    )


@torch.no_grad()
def prefill(model: Any, input_ids: Tensor, attention_mask: Tensor, cache: Any, position_ids: Tensor | None) -> Tensor:
    """Run the prompt through the model, filling ``cache``; return the last position's logits (B, V)."""
    extra = {} if position_ids is None else {"position_ids": position_ids}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
        **extra,
    )
    return out.logits[:, -1, :]


@torch.no_grad()
def decode_step(model: Any, token: Tensor, attention_mask: Tensor, cache: Any, position_ids: Tensor | None) -> Tensor:
    """Feed one token per row, (B,); return its logits (B, V)."""
    extra = {} if position_ids is None else {"position_ids": position_ids}
    out = model(input_ids=token[:, None], attention_mask=attention_mask, past_key_values=cache, use_cache=True, **extra)
    return out.logits[:, -1, :]


def position_ids_from_mask(mask: Tensor) -> Tensor:
    """Positions that count real tokens only (left padding does not shift them); padding gets 1, as
    the reference gives it. For families whose positions are model inputs (absolute embeddings)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def next_token_scores(logits: Tensor, tokens: Tensor, step: int, options: GenerationOptions) -> Tensor:
    """The processed float32 scores of the next token, (B, V).

    ``tokens`` (B, prompt + step) are every token so far, prompt padding included (as the reference
    penalises them); ``step`` counts the new tokens already generated.
    """
    scores = logits.float()
    penalty = _active_penalty(options)
    if penalty is not None:
        seen = scores.gather(1, tokens)
        penalised = torch.where(seen < 0, seen * penalty, seen / penalty)
        scores = scores.scatter(1, tokens, penalised)
    if _holds_back_eos(step, options):
        scores[:, list(options.eos_token_ids)] = float("-inf")
    if not options.do_sample:
        return scores
    if options.temperature != 1.0:
        scores = scores / options.temperature
    if options.top_k and options.top_k < scores.shape[-1]:
        kth = torch.topk(scores, options.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if options.top_p is not None and options.top_p < 1.0:
        scores = _nucleus(scores, options.top_p)
    return scores


def _active_penalty(options: GenerationOptions) -> float | None:
    """The repetition penalty, or None where there is none (1.0 changes nothing)."""
    return options.repetition_penalty if options.repetition_penalty not in (None, 1.0) else None


def _holds_back_eos(step: int, options: GenerationOptions) -> bool:
    return step < options.min_new_tokens and bool(options.eos_token_ids)


# dtypes whose float32 copy is exact: for them the argmax of the logits is that of next_token_scores'
_WIDENED_EXACTLY = (torch.bfloat16, torch.float16, torch.float32)


def _processes(logits: Tensor, step: int, options: GenerationOptions) -> bool:
    """Whether :func:`next_token_scores` can change the argmax at this step: a processor applies
    (sampling filters only apply when sampling), or its float32 copy of the logits rounds them."""
    return (
        options.do_sample
        or _active_penalty(options) is not None
        or _holds_back_eos(step, options)
        or logits.dtype not in _WIDENED_EXACTLY
    )


def _nucleus(scores: Tensor, top_p: float) -> Tensor:
    """Keep the most probable tokens whose probabilities sum to at least ``top_p`` (at least one).

    A token stays when the mass of the tokens ranked below it exceeds ``1 - top_p``, the reference's
    criterion, computed on scores sorted in ascending order."""
    ascending, order = torch.sort(scores, dim=-1)
    mass_up_to = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = mass_up_to <= 1 - top_p
    drop_sorted[:, -1] = False
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def choose(scores: Tensor, *, do_sample: bool, generator: torch.Generator | None) -> Tensor:
    """The next token of each row, (B,): the argmax, or a draw from softmax(scores)."""
    if not do_sample:
        if avx512.supports_argmax(scores) and avx512.ready():
            return avx512.argmax(scores)  # the same indices, at memory speed (see registry.avx512.argmax)
        return scores.max(dim=-1).indices  # max's indices are argmax's (the first maximal entry), 3x faster
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _StopStrings:
    """Marks rows whose generated text contains one of the stop strings (the token that completes
    it is kept, as the reference keeps it)."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...], prompt_length: int):
        self.tokenizer, self.stops, self.start = tokenizer, stops, prompt_length

    def __call__(self, tokens: Tensor, finished: Tensor) -> Tensor:
        hit = finished.clone()
        for row in (~finished).nonzero().flatten().tolist():
            text = self.tokenizer.decode(tokens[row, self.start :].tolist())
            hit[row] = any(stop in text for stop in self.stops)
        return hit


def _emit(streamer: StreamerLike | None, tokens: Tensor) -> None:
    if streamer is None:
        return
    if isinstance(streamer, Streamer):
        streamer.put(tokens)
    else:
        streamer(tokens)


@torch.no_grad()
def generate(
    model: Any,
    input_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    max_new_tokens: int = 20,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer: Any = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    streamer: StreamerLike | None = None,
) -> Tensor:
    """Continue ``input_ids`` (batch, prompt) by up to ``max_new_tokens``; return prompt + new tokens.

    The KV cache comes from the model's cache plugin, sized for prompt + ``max_new_tokens`` (a static
    cache is allocated once, at that size). Left-pad batched prompts and pass their ``attention_mask``.
    A row finishes at one of the EOS ids or when its new text contains a stop string; from then on it
    is filled with ``pad_token_id``. Generation stops when every row has finished.

    Args:
        min_new_tokens: EOS is suppressed until this many new tokens exist.
        do_sample: draw from the processed distribution instead of taking the argmax.
        temperature, top_k, top_p: sampling filters, applied in that order; top_k is 50 by default,
            as in the reference (``None`` or 0: no top-k filter).
        repetition_penalty: divides positive (multiplies negative) scores of tokens already present.
        eos_token_id: one id or several; ``[]`` for none; default the config's.
        stop_strings: needs ``tokenizer`` (``model.generate`` passes the attached one).
        seed, generator: the random source of sampling (a seed makes a fresh generator).
        streamer: a callable, or an object with ``put``/``end`` (see :class:`Streamer`), given the
            new token of every row after each step.

    Raises:
        InputError: a model without a causal LM head, invalid options, or stop strings without a
            tokenizer.
    """
    head = model.manifest["components"]["head"]["chosen"]
    if head != "causal-lm":
        raise InputError(f"generate() needs the 'causal-lm' head; this model has '{head}'")
    if input_ids.dim() != 2:
        raise InputError(f"input_ids has shape {tuple(input_ids.shape)}; expected (batch, prompt tokens)")
    options = resolve_options(
        model.config,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        stop_strings=stop_strings,
    )
    if options.stop_strings and tokenizer is None:
        raise InputError("stop_strings need a tokenizer to read the generated text; pass tokenizer=...")
    if seed is not None and generator is not None:
        raise InputError("pass a seed or a generator, not both")
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    batch, prompt = input_ids.shape
    device = input_ids.device
    total = prompt + options.max_new_tokens
    # fixed buffers: new tokens and mask columns are written in place, never concatenated
    tokens = torch.full((batch, total), options.pad_token_id, dtype=input_ids.dtype, device=device)
    tokens[:, :prompt] = input_ids
    mask = torch.ones(batch, total, dtype=torch.long, device=device)
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise InputError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected that of input_ids "
                f"{tuple(input_ids.shape)}"
            )
        mask[:, :prompt] = attention_mask
    if options.max_new_tokens == 0:
        return input_ids
    stop = _StopStrings(tokenizer, options.stop_strings, prompt) if options.stop_strings else None
    eos = torch.tensor(options.eos_token_ids, dtype=input_ids.dtype, device=device)
    positions = position_ids_from_mask(mask) if "position_ids" in model.family.backbone_inputs else None
    cache = model.new_cache(batch, total)
    logits = prefill(model, input_ids, mask[:, :prompt], cache, None if positions is None else positions[:, :prompt])
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    length = prompt
    try:
        for step in range(options.max_new_tokens):
            if _processes(logits, step, options):
                scores = next_token_scores(logits, tokens[:, :length], step, options)
            else:  # plain greedy: the argmax of the logits is that of their float32 copy (exact widening)
                scores = logits
            token = choose(scores, do_sample=options.do_sample, generator=generator)
            token = token.masked_fill(finished, options.pad_token_id)
            tokens[:, length] = token
            length += 1
            _emit(streamer, token)
            if eos.numel():
                finished |= torch.isin(token, eos)
            if stop is not None:
                finished = stop(tokens[:, :length], finished)
            if length == total or bool(finished.all()):
                break
            step_positions = None if positions is None else positions[:, length - 1 : length]
            logits = decode_step(model, token, mask[:, :length], cache, step_positions)
    finally:
        if isinstance(streamer, Streamer):
            streamer.end()
    return tokens[:, :length]


__all__ = [
    "GenerationOptions",
    "Streamer",
    "TokenStreamer",
    "choose",
    "decode_step",
    "generate",
    "next_token_scores",
    "position_ids_from_mask",
    "prefill",
    "resolve_options",
]
