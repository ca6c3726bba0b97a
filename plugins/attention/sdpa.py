"""SDPA attention: torch.nn.functional.scaled_dot_product_attention (fused kernels where torch has them)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from registry.interfaces import AttentionBackend, AttentionCapabilities, AttentionOutput, Mask, ScoreBias
from registry.masking import additive_mask_and_bias


class SdpaAttention(AttentionBackend):
    name = "sdpa"
    capabilities = AttentionCapabilities(
        bias_kinds=frozenset({"alibi", "tensor", "query-key"}),
        attention_weights=False,
        graph_capture=True,
        priority=10,
    )

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        mask: Mask,
        bias: ScoreBias | None,
        scale: float,
        dropout: float = 0.0,
        need_weights: bool = False,
    ) -> AttentionOutput:
        if need_weights:
            from registry.errors import CapabilityError

            raise CapabilityError(
                "attention 'sdpa' cannot return attention weights; build with attention='eager' to get them"
            )
        # SDPA takes either is_causal or attn_mask: with a bias, causality is folded into the additive mask
        if bias is None and mask.is_plain_causal:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scale)
        else:
            attn_mask = additive_mask_and_bias(mask, bias, q, k)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, scale=scale)
        return AttentionOutput(out, None)


sdpa = SdpaAttention()
