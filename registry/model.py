"""The assembled model: a family's backbone plus a task head, with the reference's forward conventions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from registry.errors import CapabilityError, InputError
from registry.interfaces import AttentionBackend, Family, HeadInputs, HeadModule
from registry.outputs import ModelOutput
from registry.spec import ModelSpec

_LABEL_ARGUMENTS = ("labels", "start_positions", "end_positions", "next_sentence_label")


class AssembledModel(nn.Module):
    """A model built from a spec: ``model.spec`` says what it is, ``model.manifest`` what was chosen
    and why. Call it as the reference model of its family and head.

    Example:
        >>> model = registry.build("bloom-560m", n_layer=2, device="meta")
        >>> model.manifest["components"]["attention"]["chosen"]
        'sdpa'
    """

    def __init__(
        self,
        *,
        spec: ModelSpec,
        family: Family,
        backbone: nn.Module,
        head: HeadModule,
        attention: AttentionBackend,
        label_names: tuple[str, ...],
        manifest: dict[str, Any],
    ):
        super().__init__()
        self.spec = spec
        self.family = family
        self.manifest = manifest
        self.label_names = label_names
        self.attention_backend = attention
        self.base_prefix = family.base_prefix
        self.add_module(family.base_prefix, backbone)
        self.head = head
        self.tokenizer: Any = None

    @property
    def backbone(self) -> nn.Module:
        return getattr(self, self.base_prefix)

    @property
    def config(self) -> Any:
        """The family's hyperparameters (``model.config.hidden_size``, ...)."""
        return self.spec.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        """Distinct parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        past_key_values: Any = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        use_cache: bool | None = None,
        labels: Tensor | None = None,
        start_positions: Tensor | None = None,
        end_positions: Tensor | None = None,
        next_sentence_label: Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        logits_to_keep: int = 0,
    ) -> ModelOutput | tuple[Any, ...]:
        """Run the model. Arguments and output fields are the reference's for this family and head.

        Raises:
            InputError: token ids outside the vocabulary, shapes that disagree, or an argument this
                family or head does not take.
            CapabilityError: attention weights asked of a backend that cannot return them.
        """
        given = {
            "input_ids": input_ids,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
            "token_type_ids": token_type_ids,
            "position_ids": position_ids,
            "encoder_hidden_states": encoder_hidden_states,
            "encoder_attention_mask": encoder_attention_mask,
        }
        accepted = self.family.backbone_inputs  # type: ignore[attr-defined]
        extra = [k for k, v in given.items() if v is not None and k not in accepted]
        if extra:
            raise InputError(
                f"family '{self.family.name}' does not take {', '.join(extra)}; it takes {', '.join(sorted(accepted))}"
            )
        label_values = {
            "labels": labels,
            "start_positions": start_positions,
            "end_positions": end_positions,
            "next_sentence_label": next_sentence_label,
        }
        wrong = [k for k, v in label_values.items() if v is not None and k not in self.label_names]
        if wrong:
            head = self.manifest["components"]["head"]["chosen"]
            takes = ", ".join(self.label_names) or "no labels"
            raise InputError(f"head '{head}' does not take {', '.join(wrong)}; it takes {takes}")
        if output_attentions and not self.attention_backend.capabilities.attention_weights:
            raise CapabilityError(
                f"attention '{self.attention_backend.name}' cannot return attention weights; "
                "build with attention='eager' to get them"
            )
        input_shape: tuple[int, ...] = ()
        if input_ids is not None:
            input_shape = tuple(input_ids.shape)
        elif inputs_embeds is not None:
            input_shape = tuple(inputs_embeds.shape[:-1])
        # a head may fold extra input dimensions into the batch (multiple choice)
        fed = self.head.prepare_inputs({k: v for k, v in given.items() if v is not None})
        input_ids, attention_mask = fed.get("input_ids"), fed.get("attention_mask")
        self.family.check_inputs(self.config, input_ids)
        if use_cache is None:
            causal = self.family.capabilities_for(self.config).causal
            use_cache = bool(getattr(self.config, "use_cache", False)) and causal
        features = self.backbone(
            **fed,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        inputs = HeadInputs(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels={k: v for k, v in label_values.items() if v is not None},
            logits_to_keep=logits_to_keep,
            input_shape=input_shape,
        )
        fields = self.head(features, inputs)
        if not use_cache and "past_key_values" in fields and past_key_values is None:
            fields["past_key_values"] = None
        out = ModelOutput(self.head.output_name, fields)
        return out if return_dict else out.to_tuple()

    def new_cache(
        self,
        batch_size: int,
        max_length: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Any:
        """A KV cache from this model's cache plugin, to pass as ``past_key_values``.

        Args:
            batch_size: rows the cache holds.
            max_length: tokens it must hold (prompt + new tokens); a fixed-size cache ('static')
                needs it, a growing one ('dynamic') makes room for that many at once when that is at
                most twice its first allocation anyway, and grows past it.
            dtype, device: of the stored keys and values; the model's by default.

        Raises:
            InputError: a model without a cache component or that cannot decode, or a fixed-size
                cache without ``max_length``.

        Example:
            >>> cache = model.new_cache(batch_size=2, max_length=64)
            >>> out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        """
        make = getattr(self.backbone, "new_cache", None)
        if make is None or not self.family.capabilities_for(self.config).causal:
            raise InputError(f"this {self.family.name} model does not decode with a KV cache")
        return make(
            batch_size,
            max_length,
            dtype or self.dtype,
            torch.device(device) if device is not None else self.device,
        )

    def save_pretrained(self, path: str | Path) -> None:
        """Write config.json and model.safetensors in the reference's layout."""
        from registry.checkpoints import save_pretrained

        save_pretrained(self, path)

    def _require_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise InputError(
                f"{what} needs a tokenizer: load the model with registry.from_pretrained from a folder with "
                "tokenizer files, or set model.tokenizer = registry.tokenizer(path)"
            )
        return self.tokenizer

    def generate(
        self,
        input_ids: Tensor | str | list[str],
        attention_mask: Tensor | None = None,
        *,
        max_new_tokens: int = 20,
        min_new_tokens: int = 0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = 50,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        stop_strings: str | list[str] | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        streamer: Any = None,
    ) -> Tensor | str | list[str]:
        """Continue a prompt. Token ids in, prompt + new ids out (LongTensor), as the reference; text in
        (a string or a list of strings), the new text out, through ``model.tokenizer`` with left padding.
        The options are those of :func:`registry.generate.generate`; stop strings use the attached
        tokenizer.

        Example:
            >>> model = registry.from_pretrained("bloom-checkpoint/")
            >>> model.generate("The capital of France is", max_new_tokens=8, stop_strings=".")
        """
        from registry.generate import generate

        text = isinstance(input_ids, str | list)
        if text:
            tokenizer = self._require_tokenizer("generate() with text")
            batch = tokenizer(
                [input_ids] if isinstance(input_ids, str) else input_ids,
                padding=True,
                padding_side="left",  # new tokens must follow every prompt directly
                return_tensors="pt",
            )
            ids, attention_mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            if pad_token_id is None:
                pad_token_id = tokenizer.pad_token_id
        else:
            ids = input_ids  # type: ignore[assignment]
        if stop_strings:
            self._require_tokenizer("generate() with stop_strings")
        out = generate(
            self,
            ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            stop_strings=stop_strings,
            tokenizer=self.tokenizer,
            seed=seed,
            generator=generator,
            streamer=streamer,
        )
        if not text:
            return out
        decoded = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        return decoded[0] if isinstance(input_ids, str) else decoded

    @torch.no_grad()
    def encode(self, sentences: str | list[str], *, batch_size: int = 32, normalize: bool = False) -> Tensor:
        """Sentence embeddings: the mean of the last hidden states over real tokens (as
        sentence-transformers pools MiniLM), one row per sentence, in float32.

        Args:
            normalize: scale each embedding to unit length (cosine similarity becomes a dot product).

        Example:
            >>> model = registry.from_pretrained(minilm_folder)
            >>> emb = model.encode(["A man is eating food.", "A man is eating pasta."], normalize=True)
            >>> float(emb[0] @ emb[1])
        """
        tokenizer = self._require_tokenizer("encode()")
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        rows = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
            accepted = self.family.backbone_inputs  # type: ignore[attr-defined]
            inputs = {k: v.to(self.device) for k, v in batch.items() if k in accepted}
            features = self.backbone(**inputs, use_cache=False, output_attentions=False, output_hidden_states=False)
            mask = inputs["attention_mask"].unsqueeze(-1).to(features.last_hidden_state.dtype)
            summed = (features.last_hidden_state * mask).sum(1)
            rows.append((summed / mask.sum(1).clamp(min=1e-9)).float())
        embeddings = torch.cat(rows)
        if normalize:
            embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
        return embeddings[0] if single else embeddings

    def extra_repr(self) -> str:
        chosen = {slot: c["chosen"] for slot, c in self.manifest["components"].items()}
        return f"family={self.family.name}, " + ", ".join(f"{k}={v}" for k, v in chosen.items())
