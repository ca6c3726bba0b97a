"""Head 'multiple-choice': inputs are (batch, num_choices, tokens); each choice is run through the
backbone as its own row, scored by one linear unit on its summary, and the scores of a question's
choices form the logits (batch, num_choices); cross-entropy on the index of the right choice."""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from registry.errors import InputError
from registry.interfaces import BackboneOutput, HeadCapabilities, HeadContext, HeadInputs, HeadModule, HeadPlugin

# per-token inputs that carry the choice dimension: (batch, choices, tokens[, hidden])
_PER_CHOICE = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")


class MultipleChoiceHead(HeadModule):
    output_name: ClassVar[str] = "MultipleChoiceModelOutput"
    output_fields: ClassVar[tuple[str, ...]] = ("loss", "logits", "hidden_states", "attentions")

    def __init__(self, context: HeadContext):
        super().__init__()
        self.summarize = context.parts["sequence-summary"]()
        self.dropout = nn.Dropout(context.classifier_dropout)
        self.classifier_name = context.names.get("choice-classifier", "classifier")
        self.add_module(self.classifier_name, nn.Linear(context.hidden_size, 1, bias=context.classifier_bias))

    def prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        first = inputs.get("input_ids", inputs.get("inputs_embeds"))
        if first is None:
            return inputs
        shape = tuple(first.shape[:3])
        if len(shape) != 3:
            name = "input_ids" if "input_ids" in inputs else "inputs_embeds"
            raise InputError(
                f"multiple-choice inputs are (batch, num_choices, tokens); got {name} of shape {tuple(first.shape)}"
            )
        folded = dict(inputs)
        for name in _PER_CHOICE:
            value = inputs.get(name)
            if value is None:
                continue
            if tuple(value.shape[:3]) != shape:
                raise InputError(f"{name} has shape {tuple(value.shape)}; expected {shape} like the input ids")
            folded[name] = value.reshape(-1, *value.shape[2:])  # (batch * choices, tokens[, hidden])
        return folded

    def forward(self, features: BackboneOutput, inputs: HeadInputs) -> dict[str, Tensor | None]:
        num_choices = inputs.input_shape[1]
        summary = self.summarize(features, inputs)  # (batch * choices, hidden)
        logits = getattr(self, self.classifier_name)(self.dropout(summary)).view(-1, num_choices)
        labels = inputs.labels.get("labels")
        loss = F.cross_entropy(logits, labels.to(logits.device)) if labels is not None else None
        return {
            "loss": loss,
            "logits": logits,
            "hidden_states": features.hidden_states,
            "attentions": features.attentions,
        }


class MultipleChoicePlugin(HeadPlugin):
    name = "multiple-choice"
    capabilities = HeadCapabilities(needs=frozenset({"sequence-summary"}), label_names=("labels",))

    def create(self, context: HeadContext) -> MultipleChoiceHead:
        return MultipleChoiceHead(context)


multiple_choice = MultipleChoicePlugin()
