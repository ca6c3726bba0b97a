"""Fused-decode attention: a step's attention (a decode step's, or a prompt's) computed inside one kernel
call with the rest of the step, where the family runs whole steps that way (BLOOM: see
:class:`registry.fused.DecodePlan`), and SDPA elsewhere.

The backend itself is SDPA (:mod:`plugins.attention.sdpa`): any step the fused kernel does not take runs
as there. The step's kernel is the AMX kernel in bfloat16 (below 256 rows, a row per new token) and the
AVX-512 kernel in float32 (up to 16 rows); more run module by module. It declares ``fused_decode``, which
lets a family compute its attention in the step's kernel: the same function (softmax of the scaled
scores plus the bias and mask, times the values), rounded once per step instead of once per operation.
Selecting it is the switch: ``sdpa`` never fuses, so the two can be A/B tested on the same weights. It accepts only
what the fused step can serve (a CPU with the dtype's kernel, a family that fuses its steps);
elsewhere it is refused with the reason, and ``auto`` picks another backend.

In float32 the step sums in another order than MKL's GEMV and PyTorch's SDPA (relative differences of
about 1e-7): a one-row decode step is then no longer the reference's bit for bit, as it is with ``sdpa``
(MKL's GEMV is the reference's own kernel).
"""

from __future__ import annotations

from plugins.attention.sdpa import SdpaAttention
from registry import amx, avx512
from registry.interfaces import AttentionCapabilities, SelectionContext


class FusedDecodeAttention(SdpaAttention):
    name = "fused-decode"
    capabilities = AttentionCapabilities(
        devices=frozenset({"cpu"}),
        dtypes=frozenset({"bfloat16", "float32"}),
        bias_kinds=frozenset({"alibi", "tensor", "query-key"}),
        attention_weights=False,
        backward=True,
        fused_decode=True,
        priority=20,
    )

    def refusals(self, context: SelectionContext) -> list[str]:
        reasons = []
        if not context.family_capabilities.fused_decode:
            reasons.append(f"family '{context.family}' does not run its decode steps as one kernel call")
        head, width = context.head_dim, context.head_dim * context.num_heads
        if head % 16 or not 16 <= head <= 256 or width % 32:
            reasons.append(
                f"its kernel takes heads of 16 to 256 values in multiples of 16 and widths in multiples of 32; "
                f"this model has heads of {head} and width {width}"
            )
        if reasons or context.device != "cpu" or context.dtype not in self.capabilities.dtypes:
            return reasons  # the capabilities refuse the rest; no kernel is built to say more
        name, kernel = ("AMX", amx.status()) if context.dtype == "bfloat16" else ("AVX-512", avx512.status())
        if not kernel.ready:
            reasons.append(f"needs the {name} kernel for {context.dtype}, which is not used here: {kernel.reason}")
        return reasons


fused_decode = FusedDecodeAttention()
