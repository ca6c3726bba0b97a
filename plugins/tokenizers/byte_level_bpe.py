"""Byte-level BPE tokenizers (BLOOM, and GPT-2-style tokenizer.json files), read with ``tokenizers``.

BLOOM ships one tokenizer.json (a BPE model behind a regex split and a ByteLevel pre-tokenizer) with
tokenizer_config.json and special_tokens_map.json naming ``<unk> <s> </s> <pad>`` (ids 0..3) and
``padding_side: left``: a decoder pads on the left so that generation continues from the last real
token. This plugin reads those files as the reference does; a bare tokenizer.json gets BLOOM's special
tokens where its vocabulary has them, and left padding.

``add_prefix_space`` (an option of ``load`` or a tokenizer_config.json key) sets the ByteLevel
pre-tokenizer's flag, as the reference's BLOOM tokenizer did (transformers 4): a space is put before
every piece the regex split makes that does not start with one, so a first word is tokenised like any
later word. Without the option, the file's flag stands.
"""

from __future__ import annotations

import tokenizers
from tokenizers import decoders, pre_tokenizers

from plugins.tokenizers import common
from registry.errors import TokenizerError
from registry.interfaces import TokenizerCapabilities, TokenizerPlugin

BLOOM_SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
"""BLOOM's special tokens (ids 0..3 in its vocabulary); defaults for a tokenizer.json without config files."""


class ByteLevelBPEPlugin(TokenizerPlugin):
    name = "byte-level-bpe"
    capabilities = TokenizerCapabilities(files=(common.TOKENIZER_FILE,), model_types=frozenset({"BPE"}), priority=10)

    def can_load(self, path: str) -> list[str]:
        try:
            source = common.locate(path, vocab_files=False)
        except TokenizerError as error:
            return [str(error)]
        if source.kind != "tokenizer.json":
            return [f"'{source.file}' is a WordPiece vocabulary, not a byte-level BPE tokenizer.json"]
        reasons = common.refuse_model_type(source, "BPE")
        if not reasons and not common.mentions(source.file, "ByteLevel"):
            reasons.append(f"'{source.file}' is a BPE without ByteLevel pre-tokenization, not a byte-level BPE")
        return reasons

    def load(
        self,
        path: str,
        *,
        add_prefix_space: bool | None = None,
        padding_side: str | None = None,
        model_max_length: int | None = None,
    ) -> common.Tokenizer:
        """Load a byte-level BPE tokenizer from a folder or a tokenizer.json.

        Args:
            path: a checkpoint folder holding tokenizer.json, or the tokenizer.json itself
                (tokenizer_config.json and special_tokens_map.json are read from the same folder).
            add_prefix_space: set the ByteLevel pre-tokenizer's flag (default: the config's, else the file's).
            padding_side: "left" or "right" (default: the config's, else "left" as BLOOM pads).
            model_max_length: the longest input of the model (default: the config's, else no limit).

        Raises:
            TokenizerError: the path holds no tokenizer.json, the file is unreadable or malformed,
                or it is not a byte-level BPE.

        Example:
            >>> tok = byte_level_bpe.load("bloom-560m/")
            >>> tok(["Hello", "Hello world"], padding=True)["attention_mask"]
            [[0, 1], [1, 1]]
        """
        source = common.locate(path, vocab_files=False)
        if source.kind != "tokenizer.json":
            raise TokenizerError(f"'{source.file}' is a WordPiece vocabulary, not a byte-level BPE tokenizer.json")
        backend = common.read_backend(source.file, "BPE")
        byte_levels = list(common.walk(backend.pre_tokenizer, pre_tokenizers.ByteLevel))
        if not byte_levels:
            raise TokenizerError(f"'{source.file}' has no ByteLevel pre-tokenizer: it is a BPE, but not byte-level")
        config = common.read_config(source.folder)

        if add_prefix_space is None and "add_prefix_space" in config:
            add_prefix_space = bool(config["add_prefix_space"])
        if add_prefix_space is not None:
            parts = byte_levels + list(common.walk(backend.decoder, decoders.ByteLevel))
            for part in parts:
                part.add_prefix_space = add_prefix_space
        prefix_space = bool(byte_levels[0].add_prefix_space)

        defaults = {} if common.has_config(source.folder) else _present(backend, BLOOM_SPECIAL_TOKENS)
        named, extra = common.special_tokens(config, folder=source.folder, defaults=defaults)
        sides = common.sides_and_limits(
            config, backend, padding_side=padding_side, default_padding_side="left", model_max_length=model_max_length
        )
        settings = common.Settings(
            name_or_path=str(path),
            special_tokens=named,
            extra_special_tokens=extra,
            model_input_names=tuple(config.get("model_input_names") or ("input_ids", "attention_mask")),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            clean_up_applies=False,
            config={"tokenizer_class": "BloomTokenizerFast", **config},
            options={"add_prefix_space": prefix_space},
            file_truncation=backend.truncation,
            file_padding=backend.padding,
            **sides,
        )
        return common.Tokenizer(backend, settings)


def _present(backend: tokenizers.Tokenizer, tokens: dict[str, str]) -> dict[str, str]:
    """The entries of ``tokens`` whose token is in the backend's vocabulary."""
    return {name: token for name, token in tokens.items() if backend.token_to_id(token) is not None}


byte_level_bpe = ByteLevelBPEPlugin()

__all__ = ["BLOOM_SPECIAL_TOKENS", "ByteLevelBPEPlugin", "byte_level_bpe"]
