"""Generation: prefill, then one token at a time through the model's KV cache.

Split into small functions (``prefill``, ``decode_step``, ``choose``) so each step is one unit a
compiler or a CUDA graph can take whole.
"""

from __future__ import annotations

import torch
from torch import Tensor

from registry.errors import InputError


@torch.no_grad()
def prefill(model, input_ids: Tensor, attention_mask: Tensor):  # type: ignore[no-untyped-def]
    """Run the prompt; return the last position's logits and the filled cache."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :], out.past_key_values


@torch.no_grad()
def decode_step(model, token: Tensor, attention_mask: Tensor, cache):  # type: ignore[no-untyped-def]
    """Feed one token per row; return its logits and the cache."""
    out = model(input_ids=token[:, None], attention_mask=attention_mask, past_key_values=cache, use_cache=True)
    return out.logits[:, -1, :], out.past_key_values


def choose(
    logits: Tensor, *, do_sample: bool, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> Tensor:
    """Greedy argmax, or a sample from the temperature / top-k filtered distribution."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(
    model,  # type: ignore[no-untyped-def]
    input_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
) -> Tensor:
    """Continue ``input_ids`` (batch, prompt) by up to ``max_new_tokens``; return prompt + new tokens.

    Rows that reach an EOS token are padded with ``pad_token_id`` from then on; generation stops when
    every row has finished. Left-pad batched prompts and pass their ``attention_mask``.

    Raises:
        InputError: a model without a causal LM head, or invalid options.
    """
    head = model.manifest["components"]["head"]["chosen"]
    if head != "causal-lm":
        raise InputError(f"generate() needs the 'causal-lm' head; this model has '{head}'")
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise InputError(f"temperature must be > 0 when sampling, got {temperature}")
    config = model.config
    eos = eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None)
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
    if pad is None:
        pad = int(eos_ids[0]) if eos_ids.numel() else 0
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    tokens = input_ids
    if max_new_tokens == 0:
        return tokens
    logits, cache = prefill(model, input_ids, attention_mask)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        token = choose(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, generator=generator)
        token = torch.where(finished, torch.full_like(token, pad), token)
        tokens = torch.cat([tokens, token[:, None]], dim=1)
        if eos_ids.numel():
            finished = finished | torch.isin(token, eos_ids)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        logits, cache = decode_step(model, token, attention_mask, cache)
    return tokens
