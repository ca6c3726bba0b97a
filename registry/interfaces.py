"""The interfaces of the swappable parts of a transformer, and what each declares it can do.

Every component is an object with a ``name`` (equal to its entry-point name), a ``kind`` and a
``capabilities`` record. Selection (``registry.select``) reads only the capabilities, so a plugin
that cannot serve a spec is refused before anything is built, with the reason in ``explain()``.

The data passed to attention backends is structured rather than pre-materialised:

* :class:`Mask` says *what* is masked (causal, key padding, where the queries sit among the keys);
  a backend that can take a cheap path (``is_causal``, sequence lengths) never builds a 4-D tensor.
* A :class:`ScoreBias` is an additive bias on the attention scores. ALiBi arrives as per-head
  slopes and per-key positions, which a fused kernel applies in its inner loop; only a backend that
  needs a tensor calls :meth:`ScoreBias.materialize`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from pydantic import BaseModel

KINDS: tuple[str, ...] = ("family", "attention", "position", "cache", "tokenizer", "head")
"""Component kinds; each has the entry-point group ``registry.<kind>``."""

BIAS_KINDS = frozenset({"alibi", "tensor", "query-key"})
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = frozenset({"cpu", "cuda", "meta"})


# --------------------------------------------------------------------------------------------
# Capabilities
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionCapabilities:
    """What an attention backend can compute.

    Attributes:
        devices: device types it runs on ("cpu", "cuda", "meta").
        dtypes: tensor dtypes it accepts, by name ("float32", "bfloat16", "float16").
        max_head_dim: largest head dimension it supports (None: any).
        bias_kinds: kinds of :class:`ScoreBias` it accepts ("alibi", "tensor", "query-key").
        decode: whether queries may be fewer than keys (cached decoding, q_len != k_len).
        dropout: whether it applies attention dropout in training.
        attention_weights: whether it can return the attention probabilities.
        backward: whether gradients flow through it.
        graph_capture: whether a call can be captured in a CUDA graph (no host syncs, no allocation
            that depends on values).
        fused_decode: whether a family may compute this backend's attention for a step (a decode step or
            a prompt) inside its own kernel, with the rest of the step (see
            ``FamilyCapabilities.fused_decode``): the backend declares that what it computes is plain
            softmax attention (scaled scores plus the additive bias and mask, softmax, times the values),
            so that another kernel computing it is the same function up to rounding.
        priority: higher wins when a slot is ``auto``.
    """

    devices: frozenset[str] = frozenset({"cpu", "cuda", "meta"})
    dtypes: frozenset[str] = frozenset(DTYPES)
    max_head_dim: int | None = None
    bias_kinds: frozenset[str] = frozenset()
    decode: bool = True
    dropout: bool = True
    attention_weights: bool = False
    backward: bool = True
    graph_capture: bool = False
    fused_decode: bool = False
    priority: int = 0


@dataclass(frozen=True)
class PositionCapabilities:
    """How a position encoding acts on the model.

    Attributes:
        effects: any of "embedding" (added to the input embeddings), "bias" (a score bias),
            "rotary" (rotates q and k).
        bias_kind: the :class:`ScoreBias` kind it produces, when ``"bias"`` is an effect.
        requires_config: family config fields it needs (e.g. ``max_position_embeddings``).
        priority: higher wins when a slot is ``auto`` (families name their own default first).
    """

    effects: frozenset[str] = frozenset()
    bias_kind: str | None = None
    requires_config: frozenset[str] = frozenset()
    priority: int = 0


@dataclass(frozen=True)
class CacheCapabilities:
    """What a KV cache offers.

    Attributes:
        fixed_shape: preallocated buffers that never reallocate (a CUDA graph can capture them).
        graph_capture: the cache captures its decode step in a CUDA graph itself, and so needs an
            attention backend with ``graph_capture``.
        devices: device types it runs on.
        priority: higher wins when a slot is ``auto``.
    """

    fixed_shape: bool = False
    graph_capture: bool = False
    devices: frozenset[str] = frozenset({"cpu", "cuda", "meta"})
    priority: int = 0


@dataclass(frozen=True)
class HeadCapabilities:
    """What a task head needs from a family and which label arguments it takes.

    Attributes:
        needs: parts the family must offer (see :attr:`FamilyCapabilities.head_parts`).
        wants: parts it uses where the family offers them, and does without elsewhere (the base
            head returns the pooled output of a family that has a pooler).
        label_names: forward keyword arguments that carry its labels.
        decoder_only: the head predicts the next token, so it needs a causal family.
    """

    needs: frozenset[str] = frozenset()
    wants: frozenset[str] = frozenset()
    label_names: tuple[str, ...] = ()
    decoder_only: bool = False
    priority: int = 0


@dataclass(frozen=True)
class FamilyCapabilities:
    """What a family offers its slots.

    Attributes:
        head_parts: parts heads may ask for: "lm-projection", "last-token-summary", "pooler".
        causal: whether the family is a decoder (causal self-attention, KV cache).
        position_effects: position effects its blocks apply ("embedding", "bias", "rotary").
        fused_decode: whether its decode steps (and prompts) can run as one kernel call, attention
            included, where the attention backend allows it (``AttentionCapabilities.fused_decode``).
    """

    head_parts: frozenset[str] = frozenset()
    causal: bool = False
    position_effects: frozenset[str] = frozenset({"embedding", "bias", "rotary"})
    fused_decode: bool = False


@dataclass(frozen=True)
class TokenizerCapabilities:
    """Which files a tokenizer plugin reads, and for which algorithm.

    Attributes:
        files: file names it can load (e.g. "tokenizer.json", "vocab.txt").
        model_types: tokenizer model types in tokenizer.json it understands ("BPE", "WordPiece").
        priority: higher wins when a slot is ``auto``.
    """

    files: tuple[str, ...] = ()
    model_types: frozenset[str] = frozenset()
    priority: int = 0


# --------------------------------------------------------------------------------------------
# Structured attention inputs
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Mask:
    """Which keys each query may attend to, without materialising a 4-D tensor.

    Query ``i`` sits at key index ``i + q_offset``. With ``causal``, it sees keys ``j <= i +
    q_offset``; ``key_padding`` (batch, k_len), True where a key is real, removes padding keys.

    Materialised forms are memoised on the object, which lives for one forward: every layer shares
    them.
    """

    q_len: int
    k_len: int
    causal: bool = False
    key_padding: Tensor | None = None
    q_offset: int = 0
    _memo: dict[Any, Tensor] = field(default_factory=dict, repr=False)

    @property
    def is_plain_causal(self) -> bool:
        """Causal, square, no padding: the case ``is_causal=True`` kernels serve directly."""
        return self.causal and self.key_padding is None and self.q_offset == 0 and self.q_len == self.k_len

    @property
    def is_empty(self) -> bool:
        """Nothing is masked: every query sees every key."""
        if self.key_padding is not None:
            return False
        return not self.causal or self.q_offset >= self.k_len - 1

    def boolean(self, device: torch.device) -> Tensor | None:
        """(batch or 1, 1, q_len, k_len) bool, True where attention is allowed; None if nothing is masked."""
        if self.is_empty:
            return None
        key = ("bool", device)
        if key not in self._memo:
            allowed = torch.ones(1, 1, self.q_len, self.k_len, dtype=torch.bool, device=device)
            if self.causal:
                q_index = torch.arange(self.q_len, device=device)[:, None] + self.q_offset
                k_index = torch.arange(self.k_len, device=device)[None, :]
                allowed = allowed & (k_index <= q_index)
            if self.key_padding is not None:
                allowed = allowed & self.key_padding.to(device=device, dtype=torch.bool)[:, None, None, :]
            self._memo[key] = allowed
        return self._memo[key]

    def additive(self, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        """The mask as 0 / ``finfo(dtype).min`` (the reference's convention: a row with no allowed key
        becomes uniform instead of NaN)."""
        allowed = self.boolean(device)
        if allowed is None:
            return None
        key = ("add", dtype, device)
        if key not in self._memo:
            zero = torch.zeros((), dtype=dtype, device=device)
            self._memo[key] = torch.where(allowed, zero, torch.finfo(dtype).min)
        return self._memo[key]


class ScoreBias(abc.ABC):
    """An additive bias on attention scores, broadcastable to (batch, heads, q_len, k_len)."""

    kind: ClassVar[str]

    @abc.abstractmethod
    def materialize(self, q: Tensor, k: Tensor) -> Tensor:
        """The bias as a tensor in q's dtype, broadcastable to (batch, heads, q_len, k_len)."""

    @property
    def query_dependent(self) -> bool:
        return self.kind == "query-key"


@dataclass(eq=False)
class AlibiBias(ScoreBias):
    """ALiBi: ``bias[b, h, i, j] = slopes[h] * key_positions[b, j]``.

    Softmax is invariant to a per-row constant, so the ``-slope * i`` term of the paper is dropped.
    A fused kernel reads ``slopes`` (heads,) and ``key_positions`` (batch, k_len) directly.
    """

    slopes: Tensor
    key_positions: Tensor
    kind: ClassVar[str] = "alibi"
    _memo: dict[Any, Tensor] = field(default_factory=dict, repr=False)

    def materialize(self, q: Tensor, k: Tensor) -> Tensor:
        key = (q.dtype, q.device)
        if key not in self._memo:
            # (B, H, 1, S), computed in fp32 and cast once, as the reference does
            bias = self.slopes.to(q.device)[None, :, None, None] * self.key_positions.to(q.device)[:, None, None, :]
            self._memo[key] = bias.to(q.dtype)
        return self._memo[key]


@dataclass(eq=False)
class TensorBias(ScoreBias):
    """A precomputed bias tensor, broadcastable to (batch, heads, q_len, k_len)."""

    tensor: Tensor
    kind: ClassVar[str] = "tensor"

    def materialize(self, q: Tensor, k: Tensor) -> Tensor:
        return self.tensor.to(dtype=q.dtype, device=q.device)


@dataclass(eq=False)
class QueryKeyBias(ScoreBias):
    """A bias computed from the queries and keys themselves (e.g. BERT's relative-key positions).

    ``function(q, k)`` returns (batch, heads, q_len, k_len). Backends must accept the "query-key" kind
    to be selected together with a position encoding that produces it.
    """

    function: Callable[[Tensor, Tensor], Tensor]
    kind: ClassVar[str] = "query-key"

    def materialize(self, q: Tensor, k: Tensor) -> Tensor:
        return self.function(q, k).to(q.dtype)


class AttentionOutput(NamedTuple):
    """output: (batch, heads, q_len, head_dim); weights: (batch, heads, q_len, k_len) or None."""

    output: Tensor
    weights: Tensor | None


@dataclass(frozen=True, eq=False)
class Positions:
    """Token positions for one forward.

    Attributes:
        query: (batch, q_len) positions of the new tokens; the batch dimension may be 1 when every
            row has the same positions (an encoding then need not repeat its work per row).
        key: (batch, k_len) positions of every key the new tokens attend to (cache + new); batch
            may be 1 likewise.
    """

    query: Tensor
    key: Tensor


# --------------------------------------------------------------------------------------------
# Component interfaces
# --------------------------------------------------------------------------------------------


class Component(abc.ABC):
    """Base of every plugin object: a name, a kind and declared capabilities."""

    kind: ClassVar[str]
    name: str
    capabilities: Any

    def refusals(self, context: SelectionContext) -> list[str]:
        """Reasons beyond the declared capabilities why this component cannot serve ``context``.

        The default is none; override for checks that capabilities cannot express.
        """
        return []

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name!r}>"


class AttentionBackend(Component):
    """Scaled dot-product attention over (batch, heads, tokens, head_dim) tensors.

    Close to a pure function: it receives everything it needs as arguments and never reaches into
    the module that calls it.
    """

    kind: ClassVar[str] = "attention"
    capabilities: AttentionCapabilities

    @abc.abstractmethod
    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        mask: Mask,
        bias: ScoreBias | None,
        scale: float,
        dropout: float = 0.0,
        need_weights: bool = False,
    ) -> AttentionOutput:
        """Attend q (B, H, T, D) over k, v (B, H, S, D).

        Args:
            mask: which keys each query may see.
            bias: additive score bias of a kind listed in ``capabilities.bias_kinds``.
            scale: multiplier of q·k (usually head_dim ** -0.5).
            dropout: probability applied to the attention probabilities (0 in eval).
            need_weights: return the attention probabilities as well.
        """


class PositionEncoding(nn.Module):
    """A position encoding instance inside one model: may own parameters (learned tables).

    The family calls all three methods at fixed points, so every shape of encoding works in every
    family without special cases: :meth:`embed` on the input embeddings, :meth:`score_biases` once
    per forward, :meth:`rotate` on q and k in every layer.
    """

    def embed(self, hidden: Tensor, positions: Positions) -> Tensor:
        """Add position information to the input embeddings (batch, q_len, hidden)."""
        return hidden

    def score_biases(self, positions: Positions, *, num_layers: int) -> Sequence[ScoreBias | None]:
        """One score bias per layer (None where a layer gets none). Called once per forward."""
        return [None] * num_layers

    def rotate(self, q: Tensor, k: Tensor, positions: Positions) -> tuple[Tensor, Tensor]:
        """Rotate q (B, H, T, D) and k (B, H, T, D) of the new tokens."""
        return q, k


class PositionPlugin(Component):
    """Makes the :class:`PositionEncoding` module for one model."""

    kind: ClassVar[str] = "position"
    capabilities: PositionCapabilities

    @abc.abstractmethod
    def create(self, context: BuildContext) -> PositionEncoding:
        """Make the module for a model described by ``context``."""


class KVCache(abc.ABC):
    """Keys and values of the tokens seen so far, per layer. The cache owns its memory."""

    @abc.abstractmethod
    def update(self, layer: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Store (B, H, T, D) key/value of the new tokens of ``layer``; return every key and value the
        new tokens attend to, (B, H, S, D)."""

    @abc.abstractmethod
    def get_seq_length(self, layer: int = 0) -> int:
        """Tokens already stored for ``layer``."""

    def key_length(self, new_tokens: int) -> int:
        """The key length S that attention will see after storing ``new_tokens`` more."""
        return self.get_seq_length() + new_tokens

    @property
    def max_length(self) -> int | None:
        """Capacity in tokens, or None if the cache grows."""
        return None

    def reorder(self, index: Tensor) -> None:
        """Keep only the batch rows in ``index`` (beam search, finished rows)."""
        raise NotImplementedError(f"{type(self).__name__} cannot reorder its batch")

    def reserve(self, new_tokens: int) -> list[tuple[Tensor, Tensor]] | None:
        """Room for a kernel to write ``new_tokens`` more tokens itself (a fused step): each layer's
        (keys, values) buffers, (B, H, capacity, D) with capacity >= get_seq_length() + new_tokens, the
        tokens so far in their first positions, every layer holding as many. The kernel writes positions
        get_seq_length() onwards, then the caller calls :meth:`commit`; until then the cache's tokens are
        unchanged. None: this cache does not hand out its buffers (the default; callers use :meth:`update`)."""
        return None

    def commit(self, new_tokens: int) -> None:
        """Count the ``new_tokens`` a kernel wrote into the buffers :meth:`reserve` gave, in every layer."""
        raise NotImplementedError(f"{type(self).__name__} does not hand out its buffers (reserve() is None)")


class EncoderDecoderCache(KVCache):
    """A decoder's self-attention cache plus the cross-attention keys and values of each layer.

    Cross-attention keys and values depend only on the encoder output, so they are computed on the
    first forward and reused by every later step. Self-attention calls go to the wrapped cache (from
    the cache plugin the spec names); the cross-attention entries are this object's own.
    """

    def __init__(self, self_attention: KVCache, num_layers: int):
        self.self_attention = self_attention
        self.cross_attention: list[tuple[Tensor, Tensor] | None] = [None] * num_layers

    def update(self, layer: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        return self.self_attention.update(layer, key, value)

    def get_seq_length(self, layer: int = 0) -> int:
        return self.self_attention.get_seq_length(layer)

    def key_length(self, new_tokens: int) -> int:
        return self.self_attention.key_length(new_tokens)

    @property
    def max_length(self) -> int | None:
        return self.self_attention.max_length

    def cross(self, layer: int, compute: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """The cross-attention (key, value) of ``layer``, each (B, H, S_enc, D): ``compute()`` on the
        first call, the stored pair afterwards."""
        entry = self.cross_attention[layer]
        if entry is None:
            entry = self.cross_attention[layer] = compute()
        return entry

    def reorder(self, index: Tensor) -> None:
        self.self_attention.reorder(index)
        self.cross_attention = [
            None if e is None else (e[0].index_select(0, index), e[1].index_select(0, index))
            for e in self.cross_attention
        ]

    def __repr__(self) -> str:
        cached = sum(e is not None for e in self.cross_attention)
        return f"EncoderDecoderCache({self.self_attention!r}, cross-attention layers cached={cached})"


def new_cache(
    plugin: CachePlugin | None,
    context: BuildContext,
    *,
    batch_size: int,
    max_length: int | None,
    dtype: torch.dtype,
    device: torch.device,
) -> KVCache:
    """A cache from the plugin a model was built with, sized by the model's build context."""
    if plugin is None:
        from registry.errors import InputError

        raise InputError("this model was built without a cache component; use_cache needs one")
    return plugin.create(
        batch_size=batch_size,
        num_layers=context.num_layers,
        num_heads=context.num_heads,
        head_dim=context.head_dim,
        max_length=max_length,
        dtype=dtype,
        device=device,
    )


class CachePlugin(Component):
    """Makes a :class:`KVCache` for one generation."""

    kind: ClassVar[str] = "cache"
    capabilities: CacheCapabilities

    @abc.abstractmethod
    def create(
        self,
        *,
        batch_size: int,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        max_length: int | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVCache:
        """A new, empty cache."""


@runtime_checkable
class TokenizerLike(Protocol):
    """What every loaded tokenizer offers at least; plugins add the reference's full calling conventions
    (``tok(texts, padding=..., return_tensors="pt")``, ``batch_decode``, special tokens, ...)."""

    def encode(self, text: Any) -> list[int]: ...

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str: ...


class TokenizerPlugin(Component):
    """Loads a tokenizer from a checkpoint folder or file."""

    kind: ClassVar[str] = "tokenizer"
    capabilities: TokenizerCapabilities

    @abc.abstractmethod
    def load(self, path: str) -> TokenizerLike:
        """Load from a folder, a tokenizer.json or a vocab file."""

    def can_load(self, path: str) -> list[str]:
        """Reasons this plugin cannot read ``path`` (empty: it can)."""
        return []


@dataclass(frozen=True)
class HeadContext:
    """What a family gives a head: sizes, task options and the family-specific parts it offers.

    Attributes:
        parts: factories for family-specific modules, by part name ("lm-projection", ...).
        summarize: for "last-token-summary": picks one hidden vector per sequence.
        names: attribute names the reference uses for head modules (e.g. "sequence-classifier":
            "score"), so checkpoints keep their keys.
    """

    hidden_size: int
    vocab_size: int
    num_labels: int
    problem_type: str | None
    classifier_dropout: float
    classifier_bias: bool
    pad_token_id: int | None
    parts: Mapping[str, Callable[[], nn.Module]] = field(default_factory=dict)
    names: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HeadInputs:
    """Per-forward inputs a head may need besides the backbone's output."""

    input_ids: Tensor | None
    attention_mask: Tensor | None
    labels: Mapping[str, Tensor]
    logits_to_keep: int = 0
    input_shape: tuple[int, ...] = ()
    """Leading shape of the caller's input_ids / inputs_embeds, before :meth:`HeadModule.prepare_inputs`
    (``input_ids`` and ``attention_mask`` above are what the backbone saw)."""


@dataclass
class BackboneOutput:
    """What a family's backbone returns to its head."""

    last_hidden_state: Tensor
    pooler_output: Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    cross_attentions: tuple[Tensor, ...] | None = None


class HeadModule(nn.Module):
    """A task head: maps the backbone's output to the reference's output fields."""

    output_fields: ClassVar[tuple[str, ...]]
    """Names of the fields it returns, in the reference's order (loss first)."""
    output_name: ClassVar[str] = "ModelOutput"
    """The reference's name of its output record (CausalLMOutput, ...)."""

    def prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The backbone's keyword inputs (those given) as this head needs them fed; identity by default.
        A head whose inputs carry an extra dimension (multiple choice: (batch, choices, tokens))
        folds it into the batch here."""
        return inputs

    def forward(self, features: BackboneOutput, inputs: HeadInputs) -> dict[str, Tensor | None]:
        raise NotImplementedError


class HeadPlugin(Component):
    """Makes the task head of a model."""

    kind: ClassVar[str] = "head"
    capabilities: HeadCapabilities

    @abc.abstractmethod
    def create(self, context: HeadContext) -> HeadModule:
        """Make the head for a family described by ``context``."""


@dataclass(frozen=True)
class Parts:
    """The components a family assembles, as resolved by selection."""

    attention: AttentionBackend
    position: PositionPlugin
    head: HeadPlugin
    cache: CachePlugin | None = None


@dataclass(frozen=True)
class BuildContext:
    """What a family or position plugin knows when it builds modules."""

    config: BaseModel
    num_layers: int
    num_heads: int
    head_dim: int
    hidden_size: int


class Family(Component):
    """A model family: its config, its presets, its blocks, and its checkpoint layout."""

    kind: ClassVar[str] = "family"
    capabilities: FamilyCapabilities

    config_class: type[BaseModel]
    base_prefix: str
    """Attribute name of the backbone in the reference's task models (``transformer``, ``bert``)."""
    architectures: Mapping[str, str]
    """Head name -> the reference's class name in config.json's ``architectures``."""
    defaults: Mapping[str, str]
    """Slot -> component the family prefers when the slot is ``auto``."""

    @abc.abstractmethod
    def presets(self) -> Mapping[str, Mapping[str, Any]]:
        """Preset name -> partial spec (``config``, ``components``, ``task``) as plain data."""

    @abc.abstractmethod
    def build_context(self, config: BaseModel) -> BuildContext:
        """Sizes the other components need."""

    @abc.abstractmethod
    def build_backbone(self, config: BaseModel, parts: Parts, context: BuildContext) -> nn.Module:
        """The backbone module. Its ``forward`` takes keyword inputs and returns BackboneOutput."""

    @abc.abstractmethod
    def head_context(self, config: BaseModel, task: Any, backbone: nn.Module) -> HeadContext:
        """What heads of this family get."""

    @abc.abstractmethod
    def init_weights(self, module: nn.Module, config: BaseModel) -> None:
        """Initialise one module's own parameters in place, as the reference does."""

    @abc.abstractmethod
    def config_from_reference(self, reference: Mapping[str, Any]) -> dict[str, Any]:
        """A reference config.json -> this family's config fields (unknown keys dropped)."""

    @abc.abstractmethod
    def config_to_reference(self, config: BaseModel) -> dict[str, Any]:
        """This family's config -> the reference's config.json fields."""

    def reference_key(self, key: str) -> str:
        """Our state-dict key (head keys without ``head.``) -> the reference's key. Identity by default:
        families name their modules as the reference does; override where a plugin's parameters
        live elsewhere in the reference (e.g. per-layer relative position tables)."""
        return key

    def legacy_renames(self) -> Sequence[tuple[str, str]]:
        """(old suffix, new suffix) pairs for checkpoint keys of older layouts."""
        return ()

    def unused_reference_keys(self) -> Sequence[str]:
        """Regular expressions (``re.search`` on reference keys without the base prefix) of checkpoint
        tensors the reference keeps even where a model does not use them (a pooler under a token-level
        head, a position table the chosen encoding does not read, saved index buffers). They are
        reported as unused, never an error."""
        return ()

    def optional_reference_keys(self) -> Sequence[str]:
        """Regular expressions, as above, of backbone tensors a checkpoint may lack because the
        reference builds them only for some heads (a pooler). A missing one is initialised and
        reported, as missing head weights are."""
        return ()

    def capabilities_for(self, config: BaseModel) -> FamilyCapabilities:
        """The capabilities of a model with this config; ``capabilities`` by default. Override where
        the config changes them (an encoder family whose config can make it a causal decoder)."""
        return self.capabilities

    def components_from_reference(self, reference: Mapping[str, Any]) -> dict[str, str]:
        """Slot -> component implied by a reference config.json (e.g. its position encoding type);
        none by default. The head comes from ``architectures`` and is not returned here."""
        return {}

    def components_to_reference(self, components: Any) -> dict[str, Any]:
        """config.json fields that record the spec's components (the inverse of
        :meth:`components_from_reference`); none by default."""
        return {}

    def check_inputs(self, config: BaseModel, input_ids: Tensor | None) -> None:
        """Raise InputError for inputs outside what the config allows."""


@dataclass(frozen=True)
class SelectionContext:
    """What selection knows when it asks a component whether it fits."""

    family: str
    config: Any
    device: str
    dtype: str
    num_heads: int
    head_dim: int
    family_capabilities: FamilyCapabilities
    chosen: Mapping[str, Component] = field(default_factory=dict)
