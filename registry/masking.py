"""Helpers for attention backends that need masks and biases as tensors.

Everything here is memoised on the per-forward :class:`Mask`, so the layers of one forward build
the combined tensor once (unless the bias depends on the queries).
"""

from __future__ import annotations

from torch import Tensor

from registry.interfaces import Mask, ScoreBias


def additive_mask_and_bias(mask: Mask, bias: ScoreBias | None, q: Tensor, k: Tensor) -> Tensor | None:
    """``bias + mask`` as one additive tensor in q's dtype, broadcastable to (B, H, T, S); None if both
    are empty. Masked entries hold ``finfo(dtype).min``, as in the reference."""
    masked = mask.additive(q.dtype, q.device)
    if bias is None:
        return masked
    memo_key = ("bias+mask", id(bias), q.dtype, q.device)
    if not bias.query_dependent and memo_key in mask._memo:
        return mask._memo[memo_key]
    combined = bias.materialize(q, k)
    if masked is not None:
        # min + a finite bias stays min in floating point: masked entries remain masked
        combined = combined + masked
    if not bias.query_dependent:
        mask._memo[memo_key] = combined
    return combined
