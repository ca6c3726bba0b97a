"""Head 'token-classification': dropout and a linear layer on every token; cross-entropy loss."""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from registry.interfaces import BackboneOutput, HeadCapabilities, HeadContext, HeadInputs, HeadModule, HeadPlugin


class TokenClassificationHead(HeadModule):
    output_name: ClassVar[str] = "TokenClassifierOutput"
    output_fields: ClassVar[tuple[str, ...]] = ("loss", "logits", "hidden_states", "attentions")

    def __init__(self, context: HeadContext):
        super().__init__()
        self.num_labels = context.num_labels
        self.dropout = nn.Dropout(context.classifier_dropout)
        self.classifier = nn.Linear(context.hidden_size, context.num_labels)

    def forward(self, features: BackboneOutput, inputs: HeadInputs) -> dict[str, Tensor | None]:
        logits = self.classifier(self.dropout(features.last_hidden_state))  # (B, T, num_labels)
        labels = inputs.labels.get("labels")
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.to(logits.device).view(-1))
        return {
            "loss": loss,
            "logits": logits,
            "hidden_states": features.hidden_states,
            "attentions": features.attentions,
        }


class TokenClassificationPlugin(HeadPlugin):
    name = "token-classification"
    capabilities = HeadCapabilities(label_names=("labels",))

    def create(self, context: HeadContext) -> TokenClassificationHead:
        return TokenClassificationHead(context)


token_classification = TokenClassificationPlugin()
