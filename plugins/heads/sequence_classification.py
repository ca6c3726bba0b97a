"""Head 'sequence-classification': one summary vector per sequence -> num_labels logits.

The family decides the summary (BLOOM: the rightmost non-pad token; BERT: the pooler). The loss
follows ``problem_type``; when unset it is inferred per call as the reference does: one label is
regression, integer labels single-label, anything else multi-label.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from registry.interfaces import BackboneOutput, HeadCapabilities, HeadContext, HeadInputs, HeadModule, HeadPlugin


def infer_problem_type(num_labels: int, labels: Tensor) -> str:
    if num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


def classification_loss(logits: Tensor, labels: Tensor, num_labels: int, problem_type: str | None) -> Tensor:
    """The reference's loss for each problem_type."""
    problem_type = problem_type or infer_problem_type(num_labels, labels)
    labels = labels.to(logits.device)
    if problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze())
        return F.mse_loss(logits, labels)
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels)


class SequenceClassificationHead(HeadModule):
    output_name: ClassVar[str] = "SequenceClassifierOutput"
    output_fields: ClassVar[tuple[str, ...]] = ("loss", "logits", "past_key_values", "hidden_states", "attentions")

    def __init__(self, context: HeadContext):
        super().__init__()
        self.num_labels = context.num_labels
        self.problem_type = context.problem_type
        self.summarize = context.parts["sequence-summary"]()
        self.classifier_name = context.names.get("sequence-classifier", "classifier")
        self.dropout = nn.Dropout(context.classifier_dropout)
        linear = nn.Linear(context.hidden_size, context.num_labels, bias=context.classifier_bias)
        self.add_module(self.classifier_name, linear)

    def forward(self, features: BackboneOutput, inputs: HeadInputs) -> dict[str, Tensor | None]:
        summary = self.summarize(features, inputs)  # (B, hidden)
        logits = getattr(self, self.classifier_name)(self.dropout(summary))
        labels = inputs.labels.get("labels")
        loss = classification_loss(logits, labels, self.num_labels, self.problem_type) if labels is not None else None
        return {
            "loss": loss,
            "logits": logits,
            "past_key_values": features.past_key_values,
            "hidden_states": features.hidden_states,
            "attentions": features.attentions,
        }


class SequenceClassificationPlugin(HeadPlugin):
    name = "sequence-classification"
    capabilities = HeadCapabilities(needs=frozenset({"sequence-summary"}), label_names=("labels",))

    def create(self, context: HeadContext) -> SequenceClassificationHead:
        return SequenceClassificationHead(context)


sequence_classification = SequenceClassificationPlugin()
