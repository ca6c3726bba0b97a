"""BLOOM (BigScience): a decoder with ALiBi positions, embedding LayerNorm and a fused QKV projection.

One file, top to bottom: config -> presets -> blocks -> backbone -> head parts -> family object.
Module and parameter names follow the reference, so checkpoints load without a key map.
Attention, position encoding and cache are the components the spec names; nothing here imports them.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from registry.errors import InputError
from registry.fused import (
    DecodePlan,
    PreNormBlock,
    attention_output_and_mlp,
    decode_plan,
    has_forward_hooks,
    linear,
    mlp,
    project,
)
from registry.interfaces import (
    AlibiBias,
    AttentionBackend,
    BackboneOutput,
    BuildContext,
    CachePlugin,
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

log = logging.getLogger(__name__)


# -- config ---------------------------------------------------------------------------------------


class BloomConfig(FamilyConfig):
    """BLOOM hyperparameters, named as in the reference's config.json."""

    vocab_size: int = Field(250880, ge=1)
    hidden_size: int = Field(64, ge=1)
    n_layer: int = Field(2, ge=1)
    n_head: int = Field(8, ge=1)
    layer_norm_epsilon: float = Field(1e-5, gt=0)
    initializer_range: float = Field(0.02, ge=0)
    use_cache: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 3
    apply_residual_connection_post_layernorm: bool = False
    hidden_dropout: float = Field(0.0, ge=0, le=1)
    attention_dropout: float = Field(0.0, ge=0, le=1)
    pretraining_tp: int = Field(1, ge=1)
    slow_but_exact: bool = False
    tie_word_embeddings: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> BloomConfig:
        if self.hidden_size % self.n_head:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by n_head ({self.n_head}); "
                f"head_dim would be {self.hidden_size / self.n_head:.3g}"
            )
        if self.slow_but_exact and self.hidden_size % self.pretraining_tp:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by pretraining_tp ({self.pretraining_tp})"
            )
        return self


_SIZES = {  # name: (hidden_size, n_layer, n_head), from the published checkpoints
    "bloom-560m": (1024, 24, 16),
    "bloom-1b1": (1536, 24, 16),
    "bloom-1b7": (2048, 24, 16),
    "bloom-3b": (2560, 30, 32),
    "bloom-7b1": (4096, 30, 32),
    "bloom": (14336, 70, 112),
}


# -- blocks ---------------------------------------------------------------------------------------


def bloom_gelu(x: Tensor) -> Tensor:
    """The tanh approximation of GELU with BLOOM's constant (0.79788456: sqrt(2/pi) to 8 digits)."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def tp_linear(x: Tensor, linear: nn.Linear, slices: int) -> Tensor:
    """``x @ W^T`` summed over ``slices`` column blocks, as Megatron's tensor-parallel ranks did
    (``slow_but_exact``). The reference adds no bias on this path, and neither do we: parity first."""
    width = linear.weight.shape[-1] / slices
    out = torch.zeros(*x.shape[:-1], linear.weight.shape[0], dtype=x.dtype, device=x.device)
    for i in range(slices):
        lo, hi = int(i * width), int((i + 1) * width)
        out = out + F.linear(x[..., lo:hi], linear.weight[:, lo:hi])
    return out


class BloomAttention(nn.Module):
    def __init__(self, config: BloomConfig, backend: AttentionBackend, layer: int):
        super().__init__()
        self.num_heads = config.n_head
        self.head_dim = config.hidden_size // config.n_head
        self.layer = layer
        self.backend = backend
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.attention_dropout = config.attention_dropout
        self.hidden_dropout = config.hidden_dropout
        self.tp_slices = config.pretraining_tp if config.slow_but_exact and config.pretraining_tp > 1 else 0
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        x: Tensor,
        residual: Tensor,
        *,
        norm: nn.LayerNorm | None = None,
        **attention: Any,
    ) -> tuple[Tensor, Tensor | None]:
        """Self-attention of ``norm(x)`` (see :meth:`core`), projected, plus ``residual``."""
        out, weights = self.core(x, norm=norm, **attention)
        if self.tp_slices:
            out = tp_linear(out, self.dense, self.tp_slices)
        elif not self.dropping:
            return linear(out, self.dense, residual=residual), weights  # the residual add fused
        else:
            out = self.dense(out)
        return residual + F.dropout(out, self.hidden_dropout, self.training), weights

    @property
    def dropping(self) -> bool:
        """Whether the output dropout is active (training with a rate above 0)."""
        return self.training and self.hidden_dropout > 0

    def core(
        self,
        x: Tensor,
        *,
        mask: Mask,
        bias: ScoreBias | None,
        positions: Positions,
        rotate: Callable[[Tensor, Tensor, Positions], tuple[Tensor, Tensor]] | None,
        cache: KVCache | None,
        need_weights: bool,
        norm: nn.LayerNorm | None = None,
        projected: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """The attention of ``norm(x)`` with its heads merged, before the output projection (``norm``, the
        block's input LayerNorm, runs with the query-key-value projection where a kernel takes both).
        ``projected``: that projection, where the block before computed it (then x is not read again)."""
        B, T, C = x.shape
        if projected is None:
            projected = linear(x, self.query_key_value, norm=norm)
        # the fused projection interleaves q, k, v per head: (B, T, H, 3, D) -> 3 x (B, H, T, D) views
        q, k, v = projected.view(B, T, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4).unbind(0)
        if rotate is not None:
            q, k = rotate(q, k, positions)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, H, S, D)
        dropout = self.attention_dropout if self.training else 0.0
        out, weights = self.backend(
            q, k, v, mask=mask, bias=bias, scale=self.scale, dropout=dropout, need_weights=need_weights
        )
        return out.transpose(1, 2).reshape(B, T, C), weights


class BloomMLP(nn.Module):
    def __init__(self, config: BloomConfig):
        super().__init__()
        self.hidden_dropout = config.hidden_dropout
        self.tp_slices = config.pretraining_tp if config.slow_but_exact and config.pretraining_tp > 1 else 0
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 4 * config.hidden_size)
        self.dense_4h_to_h = nn.Linear(4 * config.hidden_size, config.hidden_size)

    @property
    def dropping(self) -> bool:
        """Whether the output dropout is active (training with a rate above 0)."""
        return self.training and self.hidden_dropout > 0

    @staticmethod
    def reference_activation(dtype: torch.dtype) -> Callable[[Tensor], Tensor] | None:
        """BLOOM's own GELU arithmetic, where it is to run (see :func:`registry.fused.linear`).

        bfloat16: None, the tanh-GELU in one pass (the GEMM's epilogue on the CPU): same function,
        bfloat16 rounding. Other dtypes: BLOOM's arithmetic wherever the product is the reference's to the
        bit (so float32 logits stay the reference's), one in-place pass where a kernel rounds anyway (a
        few float32 rows)."""
        return None if dtype == torch.bfloat16 else bloom_gelu

    def forward(self, x: Tensor, residual: Tensor, norm: nn.LayerNorm | None = None) -> Tensor:
        """The MLP of ``norm(x)`` (the block's post-attention LayerNorm), plus ``residual``."""
        exact = self.reference_activation(x.dtype)
        if not self.tp_slices and not self.dropping:  # the whole feed-forward block, fused
            up, down = self.dense_h_to_4h, self.dense_4h_to_h
            return mlp(x, up, down, activation="gelu_tanh", residual=residual, norm=norm, reference_activation=exact)
        if norm is not None:
            x = norm(x)
        h = linear(x, self.dense_h_to_4h, activation="gelu_tanh", reference_activation=exact)
        out = tp_linear(h, self.dense_4h_to_h, self.tp_slices) if self.tp_slices else self.dense_4h_to_h(h)
        return residual + F.dropout(out, self.hidden_dropout, self.training)


class BloomBlock(nn.Module):
    def __init__(self, config: BloomConfig, backend: AttentionBackend, layer: int):
        super().__init__()
        self.post_ln_residual = config.apply_residual_connection_post_layernorm
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.self_attention = BloomAttention(config, backend, layer)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = BloomMLP(config)

    def forward(
        self, x: Tensor, *, handoff: Handoff | None = None, then: BloomBlock | None = None, **attention: Any
    ) -> tuple[Tensor, Tensor | None]:
        """(output, attention weights or None), as the reference's block.

        ``handoff``: where the block before left this block's query-key-value projection of
        ``input_layernorm(x)`` (taken and cleared here; none: computed here), and where this block
        leaves ``then``'s, the next block's, when one kernel call computes it with this block's last
        steps (see :func:`registry.fused.attention_output_and_mlp`). Only where nothing can change the
        output between the two blocks: no forward hooks on this block or on the next (see
        :meth:`takes_projection`)."""
        projected = handoff.take() if handoff is not None else None
        if self.post_ln_residual:  # the LayerNorms' outputs are the residuals: they run on their own
            h = self.input_layernorm(x)
            x, weights = self.self_attention(h, h, **attention)
            h = self.post_attention_layernorm(x)
            return self.mlp(h, h), weights
        attn, mlp_ = self.self_attention, self.mlp
        if not self._fusable():
            # module by module; each LayerNorm still goes with the projection after it
            x, weights = attn(x, x, norm=self.input_layernorm, **attention)
            return mlp_(x, x, norm=self.post_attention_layernorm), weights
        # the attention's core, then everything up to the next block's attention in one step (one kernel
        # call where the kernel takes it: the output projection, both residuals, the LayerNorm, the MLP,
        # and the next block's LayerNorm and query-key-value projection)
        out, weights = attn.core(x, norm=self.input_layernorm, projected=projected, **attention)
        following = None
        if handoff is not None and then is not None and then.takes_projection() and not has_forward_hooks(self):
            following = (then.input_layernorm, then.self_attention.query_key_value)
        y, projection = attention_output_and_mlp(
            out,
            x,
            dense=attn.dense,
            norm=self.post_attention_layernorm,
            up=mlp_.dense_h_to_4h,
            down=mlp_.dense_4h_to_h,
            activation="gelu_tanh",
            reference_activation=mlp_.reference_activation(x.dtype),
            then=following,
        )
        if handoff is not None and projection is not None:
            handoff.leave(projection)
        return y, weights

    def _fusable(self) -> bool:
        """Whether the steps after the attention's core run as one (see :meth:`forward`): one projection
        each, no active dropout, no forward hooks on the attention or the MLP (they would not run)."""
        attn, mlp_ = self.self_attention, self.mlp
        split = attn.tp_slices or mlp_.tp_slices or attn.dropping or mlp_.dropping
        return not (split or has_forward_hooks(attn) or has_forward_hooks(mlp_))

    def fused_parts(self) -> tuple[Any, ...] | None:
        """The objects a fused step of this block is made of (its submodules and its attention
        backend), or None where they are not this family's (a replaced attention or MLP): a kept plan
        holds while these stay the same objects (see :class:`registry.fused.DecodePlan`)."""
        modules = self._modules
        attn, mlp_ = modules.get("self_attention"), modules.get("mlp")
        if not isinstance(attn, BloomAttention) or not isinstance(mlp_, BloomMLP):
            return None
        inner, feed = attn._modules, mlp_._modules
        return (
            modules.get("input_layernorm"), attn, inner.get("query_key_value"), inner.get("dense"), attn.backend,
            modules.get("post_attention_layernorm"), mlp_, feed.get("dense_h_to_4h"), feed.get("dense_4h_to_h"),
        )  # fmt: skip

    def takes_projection(self) -> bool:
        """Whether this block takes its query-key-value projection from the block before: it uses it as
        computed (pre-LayerNorm, fusable) and nothing may change its input first or watch the projection
        being computed (no forward hooks on the block, its input LayerNorm or its projection; the block
        before checks its own)."""
        own = (self, self.input_layernorm, self.self_attention.query_key_value)  # what computes the projection
        return not self.post_ln_residual and self._fusable() and not any(has_forward_hooks(m) for m in own)


class Handoff:
    """The next block's query-key-value projection, computed by the block before it (see
    :meth:`BloomBlock.forward`): left by one block, taken by the next."""

    __slots__ = ("projection",)

    def __init__(self) -> None:
        self.projection: Tensor | None = None

    def leave(self, projection: Tensor) -> None:
        self.projection = projection

    def take(self) -> Tensor | None:
        projection, self.projection = self.projection, None
        return projection


# -- backbone -------------------------------------------------------------------------------------


# each backbone's fused decode plan, kept between steps, outside the module's state (a plan holds the kernel's
# table of raw addresses: a copy or a pickle of the model must not carry it)
_DECODE_PLANS: weakref.WeakKeyDictionary[nn.Module, DecodePlan] = weakref.WeakKeyDictionary()


class BloomModel(nn.Module):
    """Embeddings -> blocks -> final LayerNorm. Returns :class:`BackboneOutput`."""

    def __init__(self, config: BloomConfig, parts: Parts, context: BuildContext):
        super().__init__()
        self.config = config
        self.context = context
        self.cache_plugin: CachePlugin | None = parts.cache
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.word_embeddings_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.position: PositionEncoding = parts.position.create(context)
        self.rotates = "rotary" in parts.position.capabilities.effects
        self.h = nn.ModuleList(BloomBlock(config, parts.attention, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

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
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> BackboneOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        B, T, _ = inputs_embeds.shape
        device = inputs_embeds.device
        cache = past_key_values
        if cache is None and use_cache:
            cache = self.new_cache(B, T, inputs_embeds.dtype, device)  # a fixed-size cache holds these T tokens
        past = cache.get_seq_length() if cache is not None else 0
        S = cache.key_length(T) if cache is not None else T

        key_padding = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] != past + T:
                raise InputError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch={B}, "
                    f"past + new tokens = {past} + {T} = {past + T})"
                )
            mask_long = attention_mask.to(device=device, dtype=torch.long)
            if past + T < S:  # a fixed-size cache: slots not yet written are padding
                mask_long = F.pad(mask_long, (0, S - past - T))
            # ALiBi positions count real tokens only, so left padding does not shift them
            key_pos = (mask_long.cumsum(-1) - 1) * mask_long
            if not bool(mask_long[:, : past + T].all()):
                key_padding = mask_long.bool()
        else:
            key_pos = torch.arange(S, device=device).expand(B, S)
        positions = Positions(query=key_pos[:, past : past + T], key=key_pos)
        mask = Mask(q_len=T, k_len=S, causal=True, key_padding=key_padding, q_offset=past)

        x = self.word_embeddings_layernorm(self.position.embed(inputs_embeds, positions))
        biases = self.position.score_biases(positions, num_layers=len(self.h))
        rotate = self.position.rotate if self.rotates else None
        all_hidden: list[Tensor] = []
        all_weights: list[Tensor] = []
        handoff = Handoff()  # a block's query-key-value projection, where the block before computed it
        blocks = list(self.h)
        if cache is not None and not (output_hidden_states or output_attentions):
            fused = self._fused_step(x, cache, biases, rotate, key_padding, past)
            if fused is not None:
                x, blocks = fused, []  # every block ran in the kernel
        for i, block in enumerate(blocks):
            if output_hidden_states:
                all_hidden.append(x)
            following = blocks[i + 1] if i + 1 < len(blocks) else None
            # blocks of this family take part; a block replaced by something else (a wrapper) does not
            chained = isinstance(block, BloomBlock)
            extra = {"handoff": handoff, "then": following if isinstance(following, BloomBlock) else None}
            x, weights = block(
                x,
                **(extra if chained else {}),
                mask=mask,
                bias=biases[i],
                positions=positions,
                rotate=rotate,
                cache=cache,
                need_weights=output_attentions,
            )
            if output_attentions and weights is not None:
                all_weights.append(weights)
        x = self.ln_f(x)
        if output_hidden_states:
            all_hidden.append(x)
        return BackboneOutput(
            last_hidden_state=x,
            past_key_values=cache,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_weights) if output_attentions else None,
        )

    # -- head parts -----------------------------------------------------------------------------------

    def _fused_step(
        self,
        x: Tensor,
        cache: KVCache,
        biases: Sequence[ScoreBias | None],
        rotate: Callable[..., Any] | None,
        key_padding: Tensor | None,
        past: int,
    ) -> Tensor | None:
        """A step's blocks (a decode step, or a prompt's tokens) in one kernel call
        (:class:`registry.fused.DecodePlan`), where the chosen attention backend allows it (``fused_decode``:
        the ``fused-decode`` plugin) and nothing needs them to run one by one: blocks of this family,
        pre-LayerNorm, in eval mode, with no tensor-parallel slices and no forward hooks on a block or
        anything in it; no rotation; an ALiBi bias or none; a cache that hands out its buffers
        (``KVCache.reserve``); as many rows as the kernel takes. Returns the last block's output, or None
        (then the blocks run as modules). The plan is kept between steps while it holds."""
        bias = biases[0] if biases else None
        if rotate is not None or any(b is not bias for b in biases):
            return None
        if bias is not None and not isinstance(bias, AlibiBias):
            return None
        blocks = list(self.h)
        structure = [b.fused_parts() if isinstance(b, BloomBlock) else None for b in blocks]
        if not structure or any(parts is None for parts in structure):
            return None
        plan = _DECODE_PLANS.get(self)
        if plan is None or not plan.current(structure):
            plan = self._plan_decode(blocks, structure)
            if plan is None:
                _DECODE_PLANS.pop(self, None)
                return None
            _DECODE_PLANS[self] = plan
        B, T, C = x.shape
        slots = cache.reserve(T)
        if slots is None:
            return None
        y = plan.run(
            x.reshape(B * T, C),
            slots,
            position=past,
            tokens=T,
            slopes=None if bias is None else bias.slopes,
            key_positions=None if bias is None else bias.key_positions,
            key_padding=key_padding,
        )
        if y is None:
            return None
        cache.commit(T)
        return y.view(B, T, C)

    def _plan_decode(self, blocks: list[BloomBlock], structure: list[tuple[Any, ...]]) -> DecodePlan | None:
        """The blocks' fused step (:func:`registry.fused.decode_plan`), or None where it cannot be
        planned: blocks that compute their projection otherwise (see :meth:`BloomBlock.takes_projection`),
        or an attention backend that does not fuse."""
        if not all(b.takes_projection() and b.self_attention.backend.capabilities.fused_decode for b in blocks):
            return None
        first = blocks[0].self_attention
        modules = [
            PreNormBlock(
                b.input_layernorm,
                b.self_attention.query_key_value,
                b.self_attention.dense,
                b.post_attention_layernorm,
                b.mlp.dense_h_to_4h,
                b.mlp.dense_4h_to_h,
            )  # fmt: skip
            for b in blocks
        ]
        return decode_plan(
            modules,
            structure=structure,
            owners=blocks,
            heads=first.num_heads,
            layout=(3 * first.head_dim, 0, first.head_dim, 2 * first.head_dim),  # the projection's (H, 3, D)
            activation="gelu_tanh",
            scale=first.scale,
        )


class TiedProjection(nn.Module):
    """hidden -> vocab logits through the input embedding matrix (one copy of the weights)."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self._embedding = (embedding,)  # a tuple hides it from nn.Module: not a second parameter

    def forward(self, hidden: Tensor) -> Tensor:
        return project(hidden, self._embedding[0].weight)


class LastTokenSummary(nn.Module):
    """The hidden state of the rightmost non-pad token of each row (left or right padding)."""

    def __init__(self, pad_token_id: int | None):
        super().__init__()
        self.pad_token_id = pad_token_id

    def forward(self, features: BackboneOutput, inputs: HeadInputs) -> Tensor:
        hidden = features.last_hidden_state
        B = hidden.shape[0]
        if self.pad_token_id is None and B != 1:
            raise InputError("sequence classification of a batch > 1 needs pad_token_id to find each row's last token")
        if self.pad_token_id is None or inputs.input_ids is None:
            if inputs.input_ids is None and self.pad_token_id is not None:
                log.warning("inputs_embeds given: padding cannot be detected, the last position is used")
            return hidden[:, -1]
        non_pad = (inputs.input_ids != self.pad_token_id).to(hidden.device, torch.int32)
        index = torch.arange(inputs.input_ids.shape[-1], device=hidden.device, dtype=torch.int32)
        last = (index * non_pad).argmax(-1)
        return hidden[torch.arange(B, device=hidden.device), last]


# -- the family -----------------------------------------------------------------------------------


class BloomFamily(Family):
    name = "bloom"
    capabilities = FamilyCapabilities(
        head_parts=frozenset({"lm-projection", "sequence-summary"}),
        causal=True,
        fused_decode=True,
    )
    config_class = BloomConfig
    base_prefix = "transformer"
    architectures = {
        "base": "BloomModel",
        "causal-lm": "BloomForCausalLM",
        "sequence-classification": "BloomForSequenceClassification",
        "token-classification": "BloomForTokenClassification",
        "question-answering": "BloomForQuestionAnswering",
    }
    # no default attention: the accepted backend of highest priority ('fused-decode' where it can serve:
    # a CPU with the dtype's kernel, heads it takes; else 'sdpa')
    defaults = {
        "position": "alibi",
        "cache": "dynamic",
        "tokenizer": "byte-level-bpe",
        "head": "causal-lm",
    }
    backbone_inputs = frozenset({"input_ids", "inputs_embeds", "attention_mask", "past_key_values"})

    def presets(self) -> Mapping[str, Mapping[str, Any]]:
        return {
            name: {
                "family": "bloom",
                "components": {"head": "causal-lm"},
                "config": {"hidden_size": h, "n_layer": n, "n_head": a, "vocab_size": 250880},
            }
            for name, (h, n, a) in _SIZES.items()
        }

    def build_context(self, config: Any) -> BuildContext:
        return BuildContext(
            config=config,
            num_layers=config.n_layer,
            num_heads=config.n_head,
            head_dim=config.hidden_size // config.n_head,
            hidden_size=config.hidden_size,
        )

    def build_backbone(self, config: Any, parts: Parts, context: BuildContext) -> BloomModel:
        return BloomModel(config, parts, context)

    def head_context(self, config: Any, task: TaskSpec, backbone: nn.Module) -> HeadContext:
        assert isinstance(backbone, BloomModel)
        embedding = backbone.word_embeddings

        def projection() -> nn.Module:
            if config.tie_word_embeddings:
                return TiedProjection(embedding)
            return nn.Linear(config.hidden_size, config.vocab_size, bias=False)

        dropout = task.classifier_dropout if task.classifier_dropout is not None else config.hidden_dropout
        return HeadContext(
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            num_labels=task.num_labels,
            problem_type=task.problem_type,
            classifier_dropout=dropout,
            classifier_bias=False,
            pad_token_id=config.pad_token_id,
            parts={"lm-projection": projection, "sequence-summary": lambda: LastTokenSummary(config.pad_token_id)},
            names={"lm-projection": "lm_head", "sequence-classifier": "score"},
        )

    def init_weights(self, module: nn.Module, config: Any) -> None:
        std = config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def config_from_reference(self, reference: Mapping[str, Any]) -> dict[str, Any]:
        aliases = {"n_embed": "hidden_size", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head"}
        fields = set(BloomConfig.model_fields)
        out: dict[str, Any] = {}
        for key, value in reference.items():
            key = aliases.get(key, key)
            if key in fields:
                out[key] = value
        return out

    def config_to_reference(self, config: Any) -> dict[str, Any]:
        return {"model_type": "bloom", **config.model_dump()}

    def check_inputs(self, config: Any, input_ids: Tensor | None) -> None:
        if input_ids is None or input_ids.numel() == 0 or input_ids.device.type == "meta":
            return
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= config.vocab_size:
            bad = low if low < 0 else high
            raise InputError(f"token id {bad} is outside the vocabulary: ids must be in [0, {config.vocab_size - 1}]")


bloom = BloomFamily()
