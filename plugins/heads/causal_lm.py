"""Head 'causal-lm': next-token logits through the family's LM projection; loss on shifted labels."""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from registry.interfaces import BackboneOutput, HeadCapabilities, HeadContext, HeadInputs, HeadModule, HeadPlugin


def shifted_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of position t predicting label t+1 (computed in fp32)."""
    targets = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device), ignore_index=ignore_index
    )


class CausalLMHead(HeadModule):
    output_name: ClassVar[str] = "CausalLMOutput"
    output_fields: ClassVar[tuple[str, ...]] = (
        "loss",
        "logits",
        "past_key_values",
        "hidden_states",
        "attentions",
        "cross_attentions",
    )

    def __init__(self, context: HeadContext):
        super().__init__()
        # attribute name as in the reference (lm_head, cls, ...), so checkpoint keys line up
        self.projection_name = context.names.get("lm-projection", "lm_head")
        self.add_module(self.projection_name, context.parts["lm-projection"]())

    def forward(self, features: BackboneOutput, inputs: HeadInputs) -> dict[str, Tensor | None]:
        hidden = features.last_hidden_state
        if inputs.logits_to_keep:
            hidden = hidden[:, -inputs.logits_to_keep :]  # only the positions whose logits are needed
        logits = getattr(self, self.projection_name)(hidden)
        labels = inputs.labels.get("labels")
        loss = shifted_lm_loss(logits, labels) if labels is not None else None
        return {
            "loss": loss,
            "logits": logits,
            "past_key_values": features.past_key_values,
            "hidden_states": features.hidden_states,
            "attentions": features.attentions,
            "cross_attentions": features.cross_attentions,
        }


class CausalLMPlugin(HeadPlugin):
    name = "causal-lm"
    capabilities = HeadCapabilities(
        needs=frozenset({"lm-projection"}), label_names=("labels",), decoder_only=True, priority=10
    )

    def create(self, context: HeadContext) -> CausalLMHead:
        return CausalLMHead(context)


causal_lm = CausalLMPlugin()
