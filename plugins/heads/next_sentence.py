"""Head 'next-sentence': does sentence B follow sentence A? Two logits from the pooled output
(0: B continues A, 1: B is random), cross-entropy on ``labels``."""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from registry.interfaces import BackboneOutput, HeadCapabilities, HeadContext, HeadInputs, HeadModule, HeadPlugin


class NextSentenceHead(HeadModule):
    output_name: ClassVar[str] = "NextSentencePredictorOutput"
    output_fields: ClassVar[tuple[str, ...]] = ("loss", "logits", "hidden_states", "attentions")

    def __init__(self, context: HeadContext):
        super().__init__()
        self.pooled = context.parts["pooler"]()
        self.classifier_name = context.names.get("next-sentence", "seq_relationship")
        self.add_module(self.classifier_name, nn.Linear(context.hidden_size, 2))

    def forward(self, features: BackboneOutput, inputs: HeadInputs) -> dict[str, Tensor | None]:
        logits = getattr(self, self.classifier_name)(self.pooled(features, inputs))  # (B, 2)
        labels = inputs.labels.get("labels")
        loss = F.cross_entropy(logits.view(-1, 2), labels.to(logits.device).view(-1)) if labels is not None else None
        return {
            "loss": loss,
            "logits": logits,
            "hidden_states": features.hidden_states,
            "attentions": features.attentions,
        }


class NextSentencePlugin(HeadPlugin):
    name = "next-sentence"
    capabilities = HeadCapabilities(needs=frozenset({"pooler"}), label_names=("labels",))

    def create(self, context: HeadContext) -> NextSentenceHead:
        return NextSentenceHead(context)


next_sentence = NextSentencePlugin()
