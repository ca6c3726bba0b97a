"""BERT (Devlin et al., 2018): a post-LN encoder with word + position + token-type embeddings and a pooler;
with ``is_decoder`` a causal decoder with a KV cache, and with ``add_cross_attention`` one that attends
to an encoder's output.

One file, top to bottom: config -> presets -> blocks -> backbone -> head parts -> family object.
Module and parameter names follow the reference (``bert.encoder.layer.N.attention.self.query``, ...);
the few parameters that live elsewhere here (the position encoding's tables, the head modules under
``cls.``) are mapped by :meth:`BertFamily.reference_key`. Attention, position encoding and cache are
the components the spec names; nothing here imports them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from registry.errors import InputError
from registry.fused import has_forward_hooks, linear, mlp
from registry.interfaces import (
    AttentionBackend,
    BackboneOutput,
    BuildContext,
    CachePlugin,
    EncoderDecoderCache,
    Family,
    FamilyCapabilities,
    HeadContext,
    HeadInputs,
    KVCache,
    Mask,
    Parts,
    PositionEncoding,
    Positions,
    ScoreBias,
    new_cache,
)
from registry.spec import FamilyConfig, TaskSpec

# -- config ---------------------------------------------------------------------------------------

Activation = Literal[
    "gelu", "gelu_python", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu", "relu", "silu", "swish", "tanh"
]


class BertConfig(FamilyConfig):
    """BERT hyperparameters, named as in the reference's config.json.

    ``position_embedding_type`` is not a field: it is the ``position`` slot (``absolute``,
    ``relative-key``, ``relative-key-query``), read from and written to config.json under that name.
    ``add_pooling_layer`` is the reference's constructor argument of the base model: heads that need
    the pooled output always have the pooler.
    """

    vocab_size: int = Field(30522, ge=1)
    hidden_size: int = Field(768, ge=1)
    num_hidden_layers: int = Field(12, ge=1)
    num_attention_heads: int = Field(12, ge=1)
    intermediate_size: int = Field(3072, ge=1)
    hidden_act: Activation = "gelu"
    hidden_dropout_prob: float = Field(0.1, ge=0, le=1)
    attention_probs_dropout_prob: float = Field(0.1, ge=0, le=1)
    max_position_embeddings: int = Field(512, ge=1)
    type_vocab_size: int = Field(2, ge=1)
    initializer_range: float = Field(0.02, ge=0)
    layer_norm_eps: float = Field(1e-12, gt=0)
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    use_cache: bool = True
    is_decoder: bool = False
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True
    add_pooling_layer: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> BertConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}); head_dim would be {self.hidden_size / self.num_attention_heads:.3g}"
            )
        if self.add_cross_attention and not self.is_decoder:
            raise ValueError("add_cross_attention needs is_decoder=True (cross-attention layers belong to a decoder)")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id {self.pad_token_id} is outside the vocabulary [0, {self.vocab_size - 1}]")
        return self


_SIZES = {  # name: (vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size)
    "bert-base-uncased": (30522, 768, 12, 12, 3072),
    "bert-large-uncased": (30522, 1024, 24, 16, 4096),
    "bert-base-cased": (28996, 768, 12, 12, 3072),
    "bert-large-cased": (28996, 1024, 24, 16, 4096),
    "bert-base-multilingual-uncased": (105879, 768, 12, 12, 3072),
    "bert-base-multilingual-cased": (119547, 768, 12, 12, 3072),
    "bert-base-chinese": (21128, 768, 12, 12, 3072),
}


# -- blocks ---------------------------------------------------------------------------------------


def _gelu_new(x: Tensor) -> Tensor:
    # the tanh approximation as written in the original BERT / GPT code (not fused; bit-compatible)
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS: Mapping[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_python": lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


# hidden_act -> the activation registry.fused.linear applies in the GEMM's epilogue (the others follow it)
FUSABLE = {
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
    "tanh": "tanh",
}


def dense_act(x: Tensor, dense: nn.Linear, hidden_act: str) -> Tensor:
    """``act(dense(x))`` with the activation fused where it can be."""
    fused = FUSABLE.get(hidden_act)
    if fused is not None:
        return linear(x, dense, activation=fused)
    return ACTIVATIONS[hidden_act](linear(x, dense))


class BertEmbeddings(nn.Module):
    """word + token type (+ whatever the position encoding adds) -> LayerNorm -> dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dropout = config.hidden_dropout_prob
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, inputs_embeds: Tensor, token_type_ids: Tensor | None, position: PositionEncoding, positions: Positions
    ) -> Tensor:
        if token_type_ids is None:  # every token is of type 0: add that row, broadcast
            x = inputs_embeds + self.token_type_embeddings.weight[0]
        else:
            x = inputs_embeds + self.token_type_embeddings(token_type_ids)
        x = position.embed(x, positions)
        return F.dropout(self.LayerNorm(x), self.dropout, self.training)


class BertQKV(nn.Module):
    """The query, key and value projections (the reference's ``attention.self``)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)


class BertResidualOutput(nn.Module):
    """``LayerNorm(dropout(dense(h)) + residual)``: post-LN, after attention and after the MLP."""

    def __init__(self, config: BertConfig, in_features: int):
        super().__init__()
        self.dropout = config.hidden_dropout_prob
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        if self.training and self.dropout > 0:
            return self.LayerNorm(F.dropout(self.dense(h), self.dropout, True) + residual)
        return self.LayerNorm(linear(h, self.dense, residual=residual))  # the residual add fused


class BertAttention(nn.Module):
    """Self- or cross-attention through the spec's backend, then the residual output."""

    def __init__(self, config: BertConfig, backend: AttentionBackend, layer: int, *, cross: bool = False):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.layer = layer
        self.cross = cross
        self.backend = backend
        self.attention_dropout = config.attention_probs_dropout_prob
        self.self = BertQKV(config)
        self.output = BertResidualOutput(config, config.hidden_size)

    def heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def forward(
        self,
        x: Tensor,
        *,
        mask: Mask,
        bias: ScoreBias | None = None,
        positions: Positions | None = None,
        rotate: Callable[[Tensor, Tensor, Positions], tuple[Tensor, Tensor]] | None = None,
        cache: KVCache | None = None,
        source: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        B, T, C = x.shape
        projections = self.self
        if self.cross:
            assert source is not None
            q = self.heads(linear(x, projections.query))

            def project() -> tuple[Tensor, Tensor]:
                # key and value in one GEMM: (B, S_enc, 2, H, D) -> 2 x (B, H, S_enc, D)
                kv = linear(source, (projections.key, projections.value))
                kv = kv.view(B, source.shape[1], 2, self.num_heads, self.head_dim)
                return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)

            # the encoder output does not change between decoding steps: project it once per cache
            k, v = cache.cross(self.layer, project) if isinstance(cache, EncoderDecoderCache) else project()
        else:
            # query, key and value in one GEMM: (B, T, 3, H, D) -> 3 x (B, H, T, D)
            qkv = linear(x, (projections.query, projections.key, projections.value))
            qkv = qkv.view(B, T, 3, self.num_heads, self.head_dim)
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
            if rotate is not None and positions is not None:
                q, k = rotate(q, k, positions)
            if cache is not None:  # own copies: a view would keep the whole qkv buffer alive
                k, v = cache.update(self.layer, k.contiguous(), v.contiguous())  # (B, H, S, D)
        dropout = self.attention_dropout if self.training else 0.0
        out, weights = self.backend(
            q, k, v, mask=mask, bias=bias, scale=self.scale, dropout=dropout, need_weights=need_weights
        )
        out = out.transpose(1, 2).reshape(B, T, C)
        return self.output(out, x), weights


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.hidden_act = config.hidden_act
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return dense_act(x, self.dense, self.hidden_act)


class BertLayer(nn.Module):
    """Post-LN block: x = LN(x + attn(x)); [x = LN(x + cross_attn(x, enc))]; x = LN(x + mlp(x))."""

    def __init__(self, config: BertConfig, backend: AttentionBackend, layer: int):
        super().__init__()
        self.attention = BertAttention(config, backend, layer)
        if config.add_cross_attention:
            self.crossattention = BertAttention(config, backend, layer, cross=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertResidualOutput(config, config.intermediate_size)

    def forward(
        self, x: Tensor, *, cross: dict[str, Any] | None, **attention: Any
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        x, weights = self.attention(x, **attention)
        cross_weights = None
        if cross is not None:
            x, cross_weights = self.crossattention(x, **cross)
        activation = FUSABLE.get(self.intermediate.hidden_act)
        output = self.output
        if (
            activation is None
            or (self.training and output.dropout > 0)
            or has_forward_hooks(self.intermediate)
            or has_forward_hooks(output)
        ):
            return output(self.intermediate(x), x), weights, cross_weights
        # both MLP projections and the residual in one step (one kernel call where a kernel takes it; the
        # same numbers as the two calls), then the post-LN LayerNorm as a module
        up, down = self.intermediate.dense, output.dense
        return output.LayerNorm(mlp(x, up, down, activation=activation, residual=x)), weights, cross_weights


class BertPooler(nn.Module):
    """tanh(dense(hidden state of the first token))."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: Tensor) -> Tensor:
        return linear(hidden[:, 0], self.dense, activation="tanh")


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig, backend: AttentionBackend):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config, backend, i) for i in range(config.num_hidden_layers))


# -- backbone -------------------------------------------------------------------------------------


def _shape_error(name: str, tensor: Tensor, expected: str) -> InputError:
    return InputError(f"{name} has shape {tuple(tensor.shape)}; expected {expected}")


def _key_padding(mask: Tensor, name: str, batch: int, length: int, device: torch.device) -> Tensor | None:
    """(batch, length) 1/0 mask -> bool key padding, or None when nothing is masked."""
    if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] != length:
        raise _shape_error(name, mask, f"(batch={batch}, tokens={length}) with 1 for real tokens and 0 for padding")
    real = mask.to(device) != 0
    return None if bool(real.all()) else real


class BertModel(nn.Module):
    """Embeddings -> post-LN layers -> (pooler). Returns :class:`BackboneOutput`."""

    def __init__(self, config: BertConfig, parts: Parts, context: BuildContext, *, pooler: bool):
        super().__init__()
        self.config = config
        self.context = context
        self.cache_plugin: CachePlugin | None = parts.cache
        self.embeddings = BertEmbeddings(config)
        self.position: PositionEncoding = parts.position.create(context)
        self.rotates = "rotary" in parts.position.capabilities.effects
        self.encoder = BertEncoder(config, parts.attention)
        self.pooler = BertPooler(config) if pooler else None

    def new_cache(self, batch_size: int, max_length: int | None, dtype: torch.dtype, device: torch.device) -> KVCache:
        return new_cache(
            self.cache_plugin, self.context, batch_size=batch_size, max_length=max_length, dtype=dtype, device=device
        )

    def forward(
        self,
        *,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> BackboneOutput:
        config = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise _shape_error("input_ids", input_ids, "(batch, tokens)")
            inputs_embeds = self.embeddings.word_embeddings(input_ids)
        assert inputs_embeds is not None
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise _shape_error("inputs_embeds", inputs_embeds, f"(batch, tokens, hidden_size={config.hidden_size})")
        B, T, _ = inputs_embeds.shape
        device = inputs_embeds.device

        # -- cache: a decoder only (the reference ignores use_cache in an encoder) --
        cache = past_key_values
        if cache is not None and not config.is_decoder:
            raise InputError("past_key_values needs a decoder: build with is_decoder=True")
        cross_attends = encoder_hidden_states is not None
        if cache is None and use_cache and config.is_decoder:
            cache = self.new_cache(B, T, inputs_embeds.dtype, device)  # a fixed-size cache holds these T tokens
            if cross_attends:
                cache = EncoderDecoderCache(cache, config.num_hidden_layers)
        past = cache.get_seq_length() if cache is not None else 0
        S = cache.key_length(T) if cache is not None else T

        # -- positions: (1, T) shared by every row unless position_ids say otherwise --
        if position_ids is not None:
            if position_ids.dim() != 2 or position_ids.shape[0] not in (1, B) or position_ids.shape[1] != T:
                raise _shape_error("position_ids", position_ids, f"(batch={B} or 1, tokens={T})")
            query_pos = position_ids.to(device)
        else:
            query_pos = torch.arange(past, past + T, device=device)[None]
        key_pos = query_pos if S == T else torch.arange(S, device=device)[None]
        positions = Positions(query=query_pos, key=key_pos)

        if token_type_ids is not None:
            if token_type_ids.shape != (B, T):
                raise _shape_error("token_type_ids", token_type_ids, f"(batch={B}, tokens={T})")
            if token_type_ids.numel() and token_type_ids.device.type != "meta":
                low, high = int(token_type_ids.min()), int(token_type_ids.max())
                if low < 0 or high >= config.type_vocab_size:
                    raise InputError(
                        f"token type id {low if low < 0 else high} is out of range: type_vocab_size is "
                        f"{config.type_vocab_size}, so ids must be in [0, {config.type_vocab_size - 1}]"
                    )

        # -- masks: structured, so a backend can take its cheap path --
        key_padding = None
        if attention_mask is not None:
            key_padding = _key_padding(attention_mask, "attention_mask", B, past + T, device)
            if key_padding is not None and past + T < S:  # a fixed-size cache: unwritten slots are padding
                key_padding = F.pad(key_padding, (0, S - past - T), value=False)
        mask = Mask(q_len=T, k_len=S, causal=config.is_decoder, key_padding=key_padding, q_offset=past)

        cross: dict[str, Any] | None = None
        if cross_attends:
            assert encoder_hidden_states is not None
            if not config.add_cross_attention:
                raise InputError(
                    "encoder_hidden_states needs cross-attention layers: build with add_cross_attention=True"
                )
            if (
                encoder_hidden_states.dim() != 3
                or encoder_hidden_states.shape[0] != B
                or encoder_hidden_states.shape[-1] != config.hidden_size
            ):
                raise _shape_error(
                    "encoder_hidden_states", encoder_hidden_states, f"(batch={B}, source tokens, {config.hidden_size})"
                )
            S_enc = encoder_hidden_states.shape[1]
            enc_padding = None
            if encoder_attention_mask is not None:
                enc_padding = _key_padding(encoder_attention_mask, "encoder_attention_mask", B, S_enc, device)
            cross = {
                "mask": Mask(q_len=T, k_len=S_enc, key_padding=enc_padding),
                "source": encoder_hidden_states,
                "cache": cache,
                "need_weights": output_attentions,
            }
        elif encoder_attention_mask is not None:
            raise InputError("encoder_attention_mask was given without encoder_hidden_states")

        x = self.embeddings(inputs_embeds, token_type_ids, self.position, positions)
        layers = self.encoder.layer
        biases = self.position.score_biases(positions, num_layers=len(layers))
        rotate = self.position.rotate if self.rotates else None
        all_hidden: list[Tensor] = []
        all_weights: list[Tensor] = []
        all_cross: list[Tensor] = []
        for i, layer in enumerate(layers):
            if output_hidden_states:
                all_hidden.append(x)
            x, weights, cross_weights = layer(
                x,
                cross=cross,
                mask=mask,
                bias=biases[i],
                positions=positions,
                rotate=rotate,
                cache=cache,
                need_weights=output_attentions,
            )
            if weights is not None:
                all_weights.append(weights)
            if cross_weights is not None:
                all_cross.append(cross_weights)
        if output_hidden_states:
            all_hidden.append(x)
        return BackboneOutput(
            last_hidden_state=x,
            pooler_output=self.pooler(x) if self.pooler is not None else None,
            past_key_values=cache,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_weights) if output_attentions else None,
            cross_attentions=tuple(all_cross) if output_attentions and cross is not None else None,
        )


# -- head parts -----------------------------------------------------------------------------------


class TiedDecoder(nn.Module):
    """The vocabulary projection's weight: the word embedding matrix itself (one copy)."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self._embedding = (embedding,)  # a tuple hides it from nn.Module: not a second parameter

    @property
    def weight(self) -> Tensor:
        return self._embedding[0].weight


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.hidden_act = config.hidden_act
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(dense_act(x, self.dense, self.hidden_act))


class BertLMPrediction(nn.Module):
    """hidden -> vocabulary logits: transform (dense, activation, LayerNorm), then the decoder (the
    reference's ``cls.predictions``). Tied: the decoder's weight is the word embedding matrix and its
    bias is ``predictions.bias``. Untied (``tie_word_embeddings=False``): the decoder is a linear layer
    with its own weight and bias, as in the reference (transformers 5), which then leaves
    ``predictions.bias`` unused."""

    def __init__(self, config: BertConfig, embedding: nn.Embedding):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder: nn.Module
        self.bias: nn.Parameter | None
        if config.tie_word_embeddings:
            self.decoder = TiedDecoder(embedding)
            self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        else:
            self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        hidden = self.transform(hidden)
        if self.bias is None:
            return self.decoder(hidden)
        return F.linear(hidden, self.decoder.weight, self.bias)


class PooledOutput(nn.Module):
    """The backbone's pooled output (the pooler: tanh(dense(first token)))."""

    def forward(self, features: BackboneOutput, inputs: HeadInputs) -> Tensor:
        if features.pooler_output is None:
            raise InputError("this BERT was built without a pooler (add_pooling_layer=False)")
        return features.pooler_output


# -- the family -----------------------------------------------------------------------------------

_POOLED_PARTS = frozenset({"pooler", "sequence-summary"})
_DISTANCE_TABLE = re.compile(r"bert\.position\.distance_embedding\.(\d+)\.weight")


class BertFamily(Family):
    name = "bert"
    capabilities = FamilyCapabilities(
        head_parts=frozenset({"lm-projection", "sequence-summary", "pooler"}),
        causal=False,
    )
    config_class = BertConfig
    base_prefix = "bert"
    architectures = {
        "base": "BertModel",
        "pretraining": "BertForPreTraining",
        "causal-lm": "BertLMHeadModel",
        "masked-lm": "BertForMaskedLM",
        "next-sentence": "BertForNextSentencePrediction",
        "sequence-classification": "BertForSequenceClassification",
        "multiple-choice": "BertForMultipleChoice",
        "token-classification": "BertForTokenClassification",
        "question-answering": "BertForQuestionAnswering",
    }
    defaults = {
        "attention": "sdpa",
        "position": "absolute",
        "cache": "dynamic",
        "tokenizer": "wordpiece",
        "head": "base",
    }
    backbone_inputs = frozenset(
        {
            "input_ids",
            "inputs_embeds",
            "attention_mask",
            "token_type_ids",
            "position_ids",
            "encoder_hidden_states",
            "encoder_attention_mask",
            "past_key_values",
        }
    )

    def presets(self) -> Mapping[str, Mapping[str, Any]]:
        return {
            name: {
                "family": "bert",
                # the published checkpoints are BertForMaskedLM (config.json's architectures)
                "components": {"head": "masked-lm", "position": "absolute"},
                "config": {
                    "vocab_size": vocab,
                    "hidden_size": hidden,
                    "num_hidden_layers": layers,
                    "num_attention_heads": heads,
                    "intermediate_size": intermediate,
                },
            }
            for name, (vocab, hidden, layers, heads, intermediate) in _SIZES.items()
        }

    def capabilities_for(self, config: Any) -> FamilyCapabilities:
        return dataclasses.replace(self.capabilities, causal=bool(config.is_decoder))

    def build_context(self, config: Any) -> BuildContext:
        return BuildContext(
            config=config,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            head_dim=config.hidden_size // config.num_attention_heads,
            hidden_size=config.hidden_size,
        )

    def build_backbone(self, config: Any, parts: Parts, context: BuildContext) -> BertModel:
        # the reference gives the pooler to the heads that read it, and to the base model unless told not to
        head = parts.head.capabilities
        pooler = bool(head.needs & _POOLED_PARTS) or bool(head.wants & _POOLED_PARTS and config.add_pooling_layer)
        return BertModel(config, parts, context, pooler=pooler)

    def head_context(self, config: Any, task: TaskSpec, backbone: nn.Module) -> HeadContext:
        assert isinstance(backbone, BertModel)
        embedding = backbone.embeddings.word_embeddings
        dropout = task.classifier_dropout if task.classifier_dropout is not None else config.hidden_dropout_prob
        return HeadContext(
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            num_labels=task.num_labels,
            problem_type=task.problem_type,
            classifier_dropout=dropout,
            classifier_bias=True,
            pad_token_id=config.pad_token_id,
            parts={
                "lm-projection": lambda: BertLMPrediction(config, embedding),
                "sequence-summary": PooledOutput,
                "pooler": PooledOutput,
            },
            # head modules under these names map to the reference's cls.predictions / cls.seq_relationship
            names={
                "lm-projection": "predictions",
                "next-sentence": "seq_relationship",
                "sequence-classifier": "classifier",
            },
        )

    def init_weights(self, module: nn.Module, config: Any) -> None:
        std = config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # -- checkpoint layout --

    def reference_key(self, key: str) -> str:
        if key.startswith(("predictions.", "seq_relationship.")):
            return "cls." + key
        if key == "bert.position.position_embeddings.weight":
            return "bert.embeddings.position_embeddings.weight"
        match = _DISTANCE_TABLE.fullmatch(key)
        if match:
            return f"bert.encoder.layer.{match.group(1)}.attention.self.distance_embedding.weight"
        return key

    def legacy_renames(self) -> Sequence[tuple[str, str]]:
        # TF-converted checkpoints name LayerNorm parameters gamma / beta
        return (("LayerNorm.gamma", "LayerNorm.weight"), ("LayerNorm.beta", "LayerNorm.bias"))

    def unused_reference_keys(self) -> Sequence[str]:
        return (
            r"^pooler\.",  # token-level heads have none; the reference ignores it too
            r"^embeddings\.position_ids$",  # an index buffer older versions saved
            r"^embeddings\.token_type_ids$",
            r"^embeddings\.position_embeddings\.weight$",  # kept by the reference under relative positions
        )

    def optional_reference_keys(self) -> Sequence[str]:
        return (r"^pooler\.",)  # masked-LM, token and QA checkpoints have no pooler

    # -- config.json --

    def config_from_reference(self, reference: Mapping[str, Any]) -> dict[str, Any]:
        fields = set(BertConfig.model_fields)
        return {k: v for k, v in reference.items() if k in fields}

    def config_to_reference(self, config: Any) -> dict[str, Any]:
        out = {"model_type": "bert", **config.model_dump()}
        if config.add_pooling_layer:
            del out["add_pooling_layer"]  # the reference's default; only a base model without a pooler says so
        return out

    def components_from_reference(self, reference: Mapping[str, Any]) -> dict[str, str]:
        return {"position": str(reference.get("position_embedding_type") or "absolute").replace("_", "-")}

    def components_to_reference(self, components: Any) -> dict[str, Any]:
        if components.position in (None, "auto"):
            return {}
        return {"position_embedding_type": components.position.replace("-", "_")}

    def check_inputs(self, config: Any, input_ids: Tensor | None) -> None:
        if input_ids is None or input_ids.numel() == 0 or input_ids.device.type == "meta":
            return
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= config.vocab_size:
            bad = low if low < 0 else high
            raise InputError(f"token id {bad} is outside the vocabulary: ids must be in [0, {config.vocab_size - 1}]")


bert = BertFamily()
