"""Head 'base': the backbone's own outputs (last_hidden_state, pooler_output, ...), no task layer."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from registry.interfaces import BackboneOutput, HeadCapabilities, HeadContext, HeadInputs, HeadModule, HeadPlugin


class BaseHead(HeadModule):
    output_name: ClassVar[str] = "BaseModelOutput"
    output_fields: ClassVar[tuple[str, ...]] = (
        "last_hidden_state",
        "pooler_output",
        "past_key_values",
        "hidden_states",
        "attentions",
        "cross_attentions",
    )

    def forward(self, features: BackboneOutput, inputs: HeadInputs) -> dict[str, Tensor | None]:
        return {name: getattr(features, name) for name in self.output_fields}


class BasePlugin(HeadPlugin):
    name = "base"
    # the reference's base model has the pooler where the family has one (BERT)
    capabilities = HeadCapabilities(wants=frozenset({"pooler"}))

    def create(self, context: HeadContext) -> BaseHead:
        return BaseHead()


base = BasePlugin()
