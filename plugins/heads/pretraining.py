"""Head 'pretraining': masked-LM logits at every position and next-sentence logits from the pooled
output; the loss is their sum, computed when both ``labels`` and ``next_sentence_label`` are given
(as the reference)."""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from plugins.heads.masked_lm import masked_lm_loss
from registry.interfaces import BackboneOutput, HeadCapabilities, HeadContext, HeadInputs, HeadModule, HeadPlugin


class PretrainingHead(HeadModule):
    output_name: ClassVar[str] = "BertForPreTrainingOutput"
    output_fields: ClassVar[tuple[str, ...]] = (
        "loss",
        "prediction_logits",
        "seq_relationship_logits",
        "hidden_states",
        "attentions",
    )

    def __init__(self, context: HeadContext):
        super().__init__()
        self.projection_name = context.names.get("lm-projection", "lm_head")
        self.add_module(self.projection_name, context.parts["lm-projection"]())
        self.pooled = context.parts["pooler"]()
        self.classifier_name = context.names.get("next-sentence", "seq_relationship")
        self.add_module(self.classifier_name, nn.Linear(context.hidden_size, 2))

    def forward(self, features: BackboneOutput, inputs: HeadInputs) -> dict[str, Tensor | None]:
        prediction_logits = getattr(self, self.projection_name)(features.last_hidden_state)  # (B, T, vocab)
        relationship_logits = getattr(self, self.classifier_name)(self.pooled(features, inputs))  # (B, 2)
        labels, next_sentence = inputs.labels.get("labels"), inputs.labels.get("next_sentence_label")
        loss = None
        if labels is not None and next_sentence is not None:
            next_sentence = next_sentence.to(relationship_logits.device).view(-1)
            loss = masked_lm_loss(prediction_logits, labels) + F.cross_entropy(
                relationship_logits.view(-1, 2), next_sentence
            )
        return {
            "loss": loss,
            "prediction_logits": prediction_logits,
            "seq_relationship_logits": relationship_logits,
            "hidden_states": features.hidden_states,
            "attentions": features.attentions,
        }


class PretrainingPlugin(HeadPlugin):
    name = "pretraining"
    capabilities = HeadCapabilities(
        needs=frozenset({"lm-projection", "pooler"}), label_names=("labels", "next_sentence_label")
    )

    def create(self, context: HeadContext) -> PretrainingHead:
        return PretrainingHead(context)


pretraining = PretrainingPlugin()
