"""Head 'masked-lm': vocabulary logits at every position through the family's LM projection;
cross-entropy on the positions whose label is not -100 (no shift: the label is the token itself)."""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from registry.interfaces import BackboneOutput, HeadCapabilities, HeadContext, HeadInputs, HeadModule, HeadPlugin


def masked_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy over the labelled positions (in the logits' dtype, as the reference)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.to(logits.device).reshape(-1), ignore_index=ignore_index
    )


class MaskedLMHead(HeadModule):
    output_name: ClassVar[str] = "MaskedLMOutput"
    output_fields: ClassVar[tuple[str, ...]] = ("loss", "logits", "hidden_states", "attentions")

    def __init__(self, context: HeadContext):
        super().__init__()
        # attribute name as the family says (BERT: predictions, i.e. cls.predictions), so keys line up
        self.projection_name = context.names.get("lm-projection", "lm_head")
        self.add_module(self.projection_name, context.parts["lm-projection"]())

    def forward(self, features: BackboneOutput, inputs: HeadInputs) -> dict[str, Tensor | None]:
        logits = getattr(self, self.projection_name)(features.last_hidden_state)  # (B, T, vocab)
        labels = inputs.labels.get("labels")
        return {
            "loss": masked_lm_loss(logits, labels) if labels is not None else None,
            "logits": logits,
            "hidden_states": features.hidden_states,
            "attentions": features.attentions,
        }


class MaskedLMPlugin(HeadPlugin):
    name = "masked-lm"
    capabilities = HeadCapabilities(needs=frozenset({"lm-projection"}), label_names=("labels",))

    def create(self, context: HeadContext) -> MaskedLMHead:
        return MaskedLMHead(context)


masked_lm = MaskedLMPlugin()
