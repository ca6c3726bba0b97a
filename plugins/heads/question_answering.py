"""Head 'question-answering': start and end logits per token; loss over clamped span positions."""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from registry.interfaces import BackboneOutput, HeadCapabilities, HeadContext, HeadInputs, HeadModule, HeadPlugin


class QuestionAnsweringHead(HeadModule):
    output_name: ClassVar[str] = "QuestionAnsweringModelOutput"
    output_fields: ClassVar[tuple[str, ...]] = ("loss", "start_logits", "end_logits", "hidden_states", "attentions")

    def __init__(self, context: HeadContext):
        super().__init__()
        self.qa_outputs = nn.Linear(context.hidden_size, 2)

    def forward(self, features: BackboneOutput, inputs: HeadInputs) -> dict[str, Tensor | None]:
        logits = self.qa_outputs(features.last_hidden_state)  # (B, T, 2)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        start, end = inputs.labels.get("start_positions"), inputs.labels.get("end_positions")
        loss = None
        if start is not None and end is not None:
            # positions outside the sequence are ignored, as in the reference
            ignored = start_logits.size(1)
            start = start.view(-1).clamp(0, ignored).to(start_logits.device)
            end = end.view(-1).clamp(0, ignored).to(end_logits.device)
            loss = (
                F.cross_entropy(start_logits, start, ignore_index=ignored)
                + F.cross_entropy(end_logits, end, ignore_index=ignored)
            ) / 2
        return {
            "loss": loss,
            "start_logits": start_logits,
            "end_logits": end_logits,
            "hidden_states": features.hidden_states,
            "attentions": features.attentions,
        }


class QuestionAnsweringPlugin(HeadPlugin):
    name = "question-answering"
    capabilities = HeadCapabilities(label_names=("start_positions", "end_positions"))

    def create(self, context: HeadContext) -> QuestionAnsweringHead:
        return QuestionAnsweringHead(context)


question_answering = QuestionAnsweringPlugin()
