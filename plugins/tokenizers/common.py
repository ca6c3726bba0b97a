"""What the tokenizer plugins share: finding and reading the files, and the loaded tokenizer.

The text work (normalisation, pre-tokenisation, the BPE or WordPiece model, special-token templates,
truncation, padding, offsets, decoding) is done by the ``tokenizers`` library. :class:`Tokenizer` wraps
a ``tokenizers.Tokenizer`` and offers the reference's calling conventions, so that code written against
a Hugging Face fast tokenizer keeps working::

    tok = registry.tokenizer("path/to/checkpoint")
    batch = tok(["a text", "another"], padding=True, return_tensors="pt")   # input_ids, attention_mask, ...
    tok.decode(batch["input_ids"][0], skip_special_tokens=True)

The plugins differ only in how they build the backend from the files and in their defaults; they hand
the result to :class:`Tokenizer` through :class:`Settings`.

Settings are read as the reference reads them: ``tokenizer_config.json`` first, then the tokens of
``special_tokens_map.json`` over it (unless the config lists ``added_tokens_decoder``), then the options
passed to ``load``. Truncation and padding stored in a tokenizer.json are not applied to calls (each call
says what it wants, as in the reference); they only supply the default sides and are written back on save.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken

from registry.errors import TokenizerError

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.txt"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"

NO_LENGTH_LIMIT = int(1e30)
"""``model_max_length`` when no file names one (the reference's value, so saved configs agree)."""
_LARGE = int(1e20)  # above this, a model_max_length means "no limit"

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
"""Named special tokens, in the reference's order (which is the order of ``all_special_ids``)."""

PADDING_STRATEGIES = ("longest", "max_length", "do_not_pad")
TRUNCATION_STRATEGIES = ("longest_first", "only_first", "only_second", "do_not_truncate")
SIDES = ("left", "right")
TENSOR_TYPES = ("pt", "np")

# The reference's clean-up of decoded WordPiece text: spaces before punctuation and English
# contractions that the tokenisation introduced.
_CLEAN_UP = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)

# "model": {"type": "BPE" ...: how every tokenizer.json written by the tokenizers library starts its model
_MODEL_TYPE = re.compile(rb'"model"\s*:\s*\{\s*"type"\s*:\s*"([A-Za-z]+)"')


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """The file a tokenizer is built from, and the folder whose configuration files go with it.

    Attributes:
        file: a tokenizer.json (any ``*.json``) or a WordPiece vocabulary (any ``*.txt``).
        kind: ``"tokenizer.json"`` or ``"vocab.txt"``.
        folder: where tokenizer_config.json and special_tokens_map.json are looked for.
    """

    file: Path
    kind: str
    folder: Path


def locate(path: str | Path, *, vocab_files: bool) -> Source:
    """The tokenizer file at ``path``: a folder (its tokenizer.json, else its vocab.txt when
    ``vocab_files``), a tokenizer.json, or a vocab.txt.

    Raises:
        TokenizerError: nothing there, or nothing this kind of plugin reads.
    """
    where = Path(path)
    if where.is_dir():
        if (where / TOKENIZER_FILE).is_file():
            return Source(where / TOKENIZER_FILE, "tokenizer.json", where)
        if vocab_files and (where / VOCAB_FILE).is_file():
            return Source(where / VOCAB_FILE, "vocab.txt", where)
        wanted = f"{TOKENIZER_FILE} or {VOCAB_FILE}" if vocab_files else TOKENIZER_FILE
        raise TokenizerError(f"folder '{where}' has no {wanted}")
    if where.is_file():
        if where.suffix == ".json":
            return Source(where, "tokenizer.json", where.parent)
        if where.suffix == ".txt":
            return Source(where, "vocab.txt", where.parent)
        raise TokenizerError(f"'{where}' is neither a tokenizer.json nor a vocab.txt")
    raise TokenizerError(f"tokenizer path '{where}' does not exist")


def model_type(file: Path) -> str | None:
    """The ``"model"."type"`` of a tokenizer.json ("BPE", "WordPiece", ...), None for an untyped model.

    Cheap for the usual layout (a scan of the bytes, no JSON parse of a large vocabulary); other
    layouts are parsed. A file that the scan accepts is still fully validated by :func:`read_backend`.

    Raises:
        TokenizerError: the file cannot be read, is not JSON, or has no model.
    """
    raw = _read_bytes(file)
    found = _MODEL_TYPE.search(raw)
    if found:
        return found.group(1).decode()
    data = _parse_json(file, raw)
    model = data.get("model")
    if not isinstance(model, dict):
        raise TokenizerError(f"tokenizer file '{file}' has no \"model\" section: it is not a tokenizer.json")
    kind = model.get("type")
    if kind is None:  # files older than the "type" field: the fields say which model it is
        if "merges" in model:
            return "BPE"
        if "max_input_chars_per_word" in model:
            return "WordPiece"
    return kind


def mentions(file: Path, component: str) -> bool:
    """Whether a tokenizer.json names a component type (``"type": "ByteLevel"``) anywhere; a cheap scan."""
    return re.search(rb'"type"\s*:\s*"' + re.escape(component.encode()) + rb'"', _read_bytes(file)) is not None


def refuse_model_type(source: Source, expected: str) -> list[str]:
    """Reasons ``source`` is not a tokenizer.json of model type ``expected`` (empty: it is)."""
    try:
        found = model_type(source.file)
    except TokenizerError as error:
        return [str(error)]
    if found != expected:
        return [f"'{source.file}' holds a {found or 'untyped'} model, not {expected}"]
    return []


def read_backend(file: Path, expected: str) -> tokenizers.Tokenizer:
    """Load a tokenizer.json with the tokenizers library and check its model type.

    Raises:
        TokenizerError: the file is unreadable, malformed, or holds another model type.
    """
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as error:  # the Rust side raises plain Exception with serde's message
        raise TokenizerError(f"cannot read tokenizer file '{file}': {error}") from error
    found = type(backend.model).__name__
    if found != expected:
        raise TokenizerError(f"'{file}' holds a {found} model, not {expected}")
    return backend


def read_config(folder: Path) -> dict[str, Any]:
    """tokenizer_config.json with special_tokens_map.json's entries over it, as the reference merges them.

    Missing files give an empty configuration.

    Raises:
        TokenizerError: a file exists but is not a JSON object.
    """
    config: dict[str, Any] = {}
    config_file = folder / CONFIG_FILE
    if config_file.is_file():
        config.update(_read_json_object(config_file))
    specials_file = folder / SPECIAL_TOKENS_FILE
    # the reference reads special_tokens_map.json only for configs without added_tokens_decoder
    if specials_file.is_file() and "added_tokens_decoder" not in config:
        config.update(_read_json_object(specials_file))
    return config


def has_config(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() or (folder / SPECIAL_TOKENS_FILE).is_file()


def token_text(value: Any, *, key: str, folder: Path) -> str | None:
    """A special token as configured: a string, a serialised AddedToken (``{"content": ...}``), or None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    raise TokenizerError(f"'{key}' in the configuration of '{folder}' is {value!r}, not a token")


def special_tokens(
    config: Mapping[str, Any], *, folder: Path, defaults: Mapping[str, str]
) -> tuple[dict[str, str | None], list[str]]:
    """Named special tokens (``SPECIAL_TOKEN_NAMES`` -> token or None) and the extra special tokens."""
    named = {
        name: token_text(config[name], key=name, folder=folder) if name in config else defaults.get(name)
        for name in SPECIAL_TOKEN_NAMES
    }
    extra_value = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extra_value, Mapping):  # named model-specific tokens
        extra_value = list(extra_value.values())
    if not isinstance(extra_value, Sequence) or isinstance(extra_value, str):
        raise TokenizerError(f"extra special tokens in the configuration of '{folder}' are not a list")
    extra = [token_text(value, key="extra_special_tokens", folder=folder) for value in extra_value]
    return named, [token for token in extra if token is not None]


def walk(component: Any, kind: type) -> Iterator[Any]:
    """Every part of type ``kind`` in a pre-tokenizer, normaliser or decoder, looking inside Sequences.

    The parts are live: setting an attribute on one changes the tokenizer that holds it.
    """
    if isinstance(component, kind):
        yield component
    if type(component).__name__ == "Sequence":
        index = 0
        while True:
            try:
                part = component[index]
            except IndexError:
                return
            yield from walk(part, kind)
            index += 1


def added_tokens(backend: tokenizers.Tokenizer) -> set[str]:
    return {token.content for token in backend.get_added_tokens_decoder().values()}


def add_special_tokens(backend: tokenizers.Tokenizer, tokens: Sequence[str]) -> None:
    """Make ``tokens`` special added tokens of ``backend`` (a token already in the vocabulary keeps its
    id), as the reference does with every named special token on loading."""
    known = added_tokens(backend)
    missing = [
        AddedToken(token, special=True, normalized=False) for token in dict.fromkeys(tokens) if token not in known
    ]
    if missing:
        backend.add_special_tokens(missing)


def _read_bytes(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as error:
        raise TokenizerError(f"cannot read tokenizer file '{file}': {error.strerror or error}") from error


def _parse_json(file: Path, raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise TokenizerError(f"'{file}' is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise TokenizerError(f"'{file}' holds a JSON {type(data).__name__}, not an object")
    return data


def _read_json_object(file: Path) -> dict[str, Any]:
    return _parse_json(file, _read_bytes(file))


# --------------------------------------------------------------------------------------------
# The loaded tokenizer
# --------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """What a plugin decided while loading; the rest comes from the backend.

    Attributes:
        name_or_path: the path it was loaded from.
        special_tokens: ``SPECIAL_TOKEN_NAMES`` -> token (None where the tokenizer has none).
        extra_special_tokens: further special tokens (``additional_special_tokens``).
        model_max_length: longest input the model takes; longer calls warn unless they truncate.
        padding_side, truncation_side: "left" or "right".
        model_input_names: which optional outputs a call returns by default
            ("token_type_ids", "attention_mask").
        clean_up_tokenization_spaces: the default of ``decode``'s clean-up.
        clean_up_applies: False for byte-level BPE, whose decoded spaces are real text.
        config: what ``save_pretrained`` writes to tokenizer_config.json besides the values above
            (the loaded config, and the reference's class name).
        options: the family's options in effect (``add_prefix_space``, ``do_lower_case``, ...), read
            as attributes of the tokenizer as in the reference, and saved in tokenizer_config.json.
        file_truncation, file_padding: the settings stored in the tokenizer.json, written back on save.
    """

    name_or_path: str
    special_tokens: dict[str, str | None]
    extra_special_tokens: list[str] = field(default_factory=list)
    model_max_length: int = NO_LENGTH_LIMIT
    padding_side: str = "right"
    truncation_side: str = "right"
    model_input_names: tuple[str, ...] = ("input_ids", "attention_mask")
    clean_up_tokenization_spaces: bool = False
    clean_up_applies: bool = True
    config: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    file_truncation: dict[str, Any] | None = None
    file_padding: dict[str, Any] | None = None


def sides_and_limits(
    config: Mapping[str, Any],
    backend: tokenizers.Tokenizer,
    *,
    padding_side: str | None,
    default_padding_side: str,
    model_max_length: int | None,
) -> dict[str, Any]:
    """padding_side, truncation_side and model_max_length: the option, else the config, else the
    tokenizer.json's stored padding/truncation, else the plugin's default (the reference's order)."""
    stored_padding = backend.padding or {}
    stored_truncation = backend.truncation or {}
    limit = model_max_length if model_max_length is not None else config.get("model_max_length", config.get("max_len"))
    return {
        "padding_side": padding_side
        or config.get("padding_side")
        or stored_padding.get("direction")
        or default_padding_side,
        "truncation_side": config.get("truncation_side") or stored_truncation.get("direction") or "right",
        "model_max_length": NO_LENGTH_LIMIT if limit is None else _length(limit),
    }


def _length(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise TokenizerError(f"model_max_length must be a non-negative number, not {value!r}")
    return int(value)


class _SpecialToken:
    """``tok.pad_token``: a named special token, settable as in the reference."""

    def __set_name__(self, owner: type, attribute: str) -> None:
        self.name = attribute

    def __get__(self, tokenizer: Tokenizer | None, owner: type | None = None) -> Any:
        if tokenizer is None:
            return self
        return tokenizer._special[self.name]

    def __set__(self, tokenizer: Tokenizer, token: str | None) -> None:
        tokenizer.set_special_token(self.name, token)


class _SpecialTokenId:
    """``tok.pad_token_id``: the id of a named special token (None when unset)."""

    def __init__(self, token_name: str):
        self.token_name = token_name

    def __get__(self, tokenizer: Tokenizer | None, owner: type | None = None) -> Any:
        if tokenizer is None:
            return self
        token = tokenizer._special[self.token_name]
        return None if token is None else tokenizer.convert_tokens_to_ids(token)

    def __set__(self, tokenizer: Tokenizer, token_id: int | None) -> None:
        token = None if token_id is None else tokenizer.backend_tokenizer.id_to_token(int(token_id))
        if token_id is not None and token is None:
            raise TokenizerError(f"{self.token_name}_id {token_id} is not in the vocabulary (size {len(tokenizer)})")
        tokenizer.set_special_token(self.token_name, token)


class BatchEncoding(dict):  # type: ignore[type-arg]
    """What a tokenizer call returns: model inputs by name, also readable as attributes (``enc.input_ids``).

    ``encodings`` holds the library's ``Encoding`` of every row (tokens, word ids, offsets).
    """

    def __init__(
        self,
        data: Mapping[str, Any],
        encodings: list[tokenizers.Encoding] | None = None,
        tensor_type: str | None = None,
    ):
        super().__init__(data)
        self.encodings = encodings
        if tensor_type is not None:
            self.convert_to_tensors(tensor_type)

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def convert_to_tensors(self, tensor_type: Any) -> BatchEncoding:
        """Turn every list into a torch tensor (``"pt"``) or a numpy array (``"np"``), in place.

        Raises:
            TokenizerError: an unknown tensor type, or rows of different lengths (ask for padding).
        """
        kind = str(getattr(tensor_type, "value", tensor_type))
        if kind not in TENSOR_TYPES:
            raise TokenizerError(
                f"return_tensors={tensor_type!r} is not supported; use one of: {', '.join(TENSOR_TYPES)}"
            )
        for key, value in self.items():
            try:
                self[key] = _tensor(value, kind)
            except ValueError as error:  # numpy's and torch's error for ragged rows
                raise TokenizerError(
                    f"cannot make a tensor of '{key}': its rows have different lengths; "
                    "pass padding=True (and truncation=True) to get equal lengths"
                ) from error
        return self

    def to(self, device: Any) -> BatchEncoding:
        """Move every tensor to ``device`` (returns self, like the reference)."""
        for key, value in self.items():
            if hasattr(value, "to"):
                self[key] = value.to(device)
        return self

    def _encoding(self, batch_index: int) -> tokenizers.Encoding:
        if not self.encodings:
            raise TokenizerError("this batch has no encodings (it was not made by a tokenizer call)")
        return self.encodings[batch_index]

    def tokens(self, batch_index: int = 0) -> list[str]:
        return self._encoding(batch_index).tokens

    def word_ids(self, batch_index: int = 0) -> list[int | None]:
        return self._encoding(batch_index).word_ids

    def sequence_ids(self, batch_index: int = 0) -> list[int | None]:
        return self._encoding(batch_index).sequence_ids


class Tokenizer:
    """A loaded tokenizer with the reference's calling conventions.

    Build one with a tokenizer plugin (``registry.tokenizer(path)``); the backend is a
    ``tokenizers.Tokenizer`` (``backend_tokenizer``). Calls set the backend's truncation and padding
    for their own arguments, as the reference does, so one object must not be called from several
    threads at once with different arguments.

    Example:
        >>> tok = registry.tokenizer("bloom-checkpoint/")
        >>> batch = tok(["Hello", "Hello world"], padding=True, return_tensors="pt")
        >>> tok.batch_decode(batch["input_ids"], skip_special_tokens=True)
        ['Hello', 'Hello world']
    """

    is_fast = True

    bos_token = _SpecialToken()
    eos_token = _SpecialToken()
    unk_token = _SpecialToken()
    sep_token = _SpecialToken()
    pad_token = _SpecialToken()
    cls_token = _SpecialToken()
    mask_token = _SpecialToken()
    bos_token_id = _SpecialTokenId("bos_token")
    eos_token_id = _SpecialTokenId("eos_token")
    unk_token_id = _SpecialTokenId("unk_token")
    sep_token_id = _SpecialTokenId("sep_token")
    pad_token_id = _SpecialTokenId("pad_token")
    cls_token_id = _SpecialTokenId("cls_token")
    mask_token_id = _SpecialTokenId("mask_token")
    pad_token_type_id = 0

    def __init__(self, backend: tokenizers.Tokenizer, settings: Settings):
        self._backend = backend
        self.name_or_path = settings.name_or_path
        self._special: dict[str, str | None] = {name: settings.special_tokens.get(name) for name in SPECIAL_TOKEN_NAMES}
        self._extra_special = list(settings.extra_special_tokens)
        self.model_max_length = settings.model_max_length
        self.padding_side = _side("padding_side", settings.padding_side)
        self.truncation_side = _side("truncation_side", settings.truncation_side)
        self.model_input_names = list(settings.model_input_names)
        self.clean_up_tokenization_spaces = settings.clean_up_tokenization_spaces
        self._clean_up_applies = settings.clean_up_applies
        self._config = dict(settings.config)
        self._options = dict(settings.options)
        self._file_truncation = settings.file_truncation
        self._file_padding = settings.file_padding
        self._warned: set[str] = set()
        # calls configure truncation and padding themselves
        backend.no_truncation()
        backend.no_padding()
        add_special_tokens(backend, [t for t in self._special.values() if t is not None] + self._extra_special)

    def __getattr__(self, name: str) -> Any:
        # the family's options (add_prefix_space, do_lower_case, ...) read as attributes
        options = self.__dict__.get("_options", {})
        if name in options:
            return options[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    # -- special tokens and vocabulary ------------------------------------------------------

    @property
    def backend_tokenizer(self) -> tokenizers.Tokenizer:
        """The ``tokenizers.Tokenizer`` doing the work."""
        return self._backend

    def set_special_token(self, name: str, token: str | None) -> None:
        """Set a named special token (``pad_token``, ...); a token new to the vocabulary is added."""
        if name not in SPECIAL_TOKEN_NAMES:
            raise TokenizerError(f"'{name}' is not a special token name; use one of: {', '.join(SPECIAL_TOKEN_NAMES)}")
        if token is not None:
            token = str(token)
            add_special_tokens(self._backend, [token])
        self._special[name] = token

    def add_special_tokens(self, tokens: Mapping[str, str | Sequence[str]]) -> int:
        """Set named special tokens (``{"pad_token": "<pad>"}``) and extra ones
        (``{"additional_special_tokens": [...]}``); returns how many tokens were new to the vocabulary."""
        before = len(self)
        for name, value in tokens.items():
            if name in ("additional_special_tokens", "extra_special_tokens"):
                values = [value] if isinstance(value, str) else list(value)
                add_special_tokens(self._backend, values)
                self._extra_special.extend(v for v in values if v not in self._extra_special)
            elif isinstance(value, str) or value is None:
                self.set_special_token(name, value)
            else:
                raise TokenizerError(f"special token '{name}' must be a string, not {value!r}")
        return len(self) - before

    def add_tokens(self, tokens: str | Sequence[str], special_tokens: bool = False) -> int:
        """Add tokens to the vocabulary; returns how many were new."""
        new = [tokens] if isinstance(tokens, str) else list(tokens)
        if special_tokens:
            return self._backend.add_special_tokens(new)
        return self._backend.add_tokens(new)

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        """Named special tokens that are set, and the extra ones under ``additional_special_tokens``."""
        named: dict[str, Any] = {name: token for name, token in self._special.items() if token is not None}
        if self._extra_special:
            named["additional_special_tokens"] = list(self._extra_special)
        return named

    @property
    def all_special_tokens(self) -> list[str]:
        tokens = [token for token in self._special.values() if token is not None] + self._extra_special
        return list(dict.fromkeys(tokens))

    @property
    def all_special_ids(self) -> list[int]:
        return [self.convert_tokens_to_ids(token) for token in self.all_special_tokens]

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens."""
        return self._backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """Size of the whole vocabulary, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    def get_added_vocab(self) -> dict[str, int]:
        return {token.content: index for index, token in sorted(self._backend.get_added_tokens_decoder().items())}

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return self._backend.num_special_tokens_to_add(pair)

    @property
    def max_len_single_sentence(self) -> int:
        return self.model_max_length - self.num_special_tokens_to_add(pair=False)

    @property
    def max_len_sentences_pair(self) -> int:
        return self.model_max_length - self.num_special_tokens_to_add(pair=True)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> Any:
        """Token(s) -> id(s); a token outside the vocabulary gives the unknown token's id."""
        if tokens is None:
            return None
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(token) for token in tokens]

    def _token_to_id(self, token: str) -> int | None:
        index = self._backend.token_to_id(token)
        if index is None:
            unk = self._special["unk_token"]
            return None if unk is None else self._backend.token_to_id(unk)
        return index

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> Any:
        """Id(s) -> token(s); ``skip_special_tokens`` drops the special ones from a list."""
        if hasattr(ids, "tolist"):  # tensor, array, numpy scalar
            ids = ids.tolist()
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._backend.id_to_token(int(index)) for index in _id_list(ids) if int(index) not in skip]

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        decoder = self._backend.decoder
        return decoder.decode(list(tokens)) if decoder is not None else " ".join(tokens)

    # -- encoding ---------------------------------------------------------------------------

    def __call__(
        self,
        text: str | Sequence[Any],
        text_pair: str | Sequence[Any] | None = None,
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        stride: int = 0,
        is_split_into_words: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
        verbose: bool = True,
    ) -> BatchEncoding:
        """Tokenise a text, a pair, or a batch of either, as the reference's ``tokenizer(...)`` does.

        Args:
            text: a string, a list of strings (a batch), a list of (text, pair) tuples, or with
                ``is_split_into_words`` a list of words (or a batch of such lists).
            text_pair: the second sequence(s) (BERT's segment B); a batch needs a list as long as ``text``.
            padding: False / "do_not_pad", True / "longest" (to the longest row), or "max_length".
            truncation: False / "do_not_truncate", True / "longest_first", "only_first", "only_second".
                Only ``max_length`` given turns on "longest_first", as in the reference. Without
                truncation, rows longer than ``model_max_length`` stay whole and a warning names the limit.
            max_length: the length to truncate or pad to (default: ``model_max_length``).
            return_tensors: None (lists), "pt" (torch) or "np" (numpy).

        Returns:
            A :class:`BatchEncoding` with ``input_ids``, ``token_type_ids`` and ``attention_mask`` (as the
            family uses them), and ``offset_mapping``, ``special_tokens_mask``, ``length``,
            ``overflow_to_sample_mapping`` when asked. A single text without ``return_tensors`` gives
            flat lists.

        Raises:
            TokenizerError: invalid inputs or options (a ValueError, as the reference raises).
        """
        batched, inputs = _batch_inputs(text, text_pair, is_split_into_words)
        pad, truncate, max_length = self._plan(padding, truncation, max_length, pad_to_multiple_of, verbose)
        self._configure(pad, truncate, max_length, stride, pad_to_multiple_of, padding_side)
        try:
            encodings = self._backend.encode_batch(
                inputs, is_pretokenized=is_split_into_words, add_special_tokens=add_special_tokens
            )
        except Exception as error:  # the Rust side raises plain Exception (e.g. truncation impossible)
            raise TokenizerError(f"cannot encode: {error}") from error

        if return_overflowing_tokens:
            rows = [
                (index, row) for index, encoding in enumerate(encodings) for row in (encoding, *encoding.overflowing)
            ]
        else:
            rows = list(enumerate(encodings))
        flat = [row for _, row in rows]
        if return_token_type_ids is None:
            return_token_type_ids = "token_type_ids" in self.model_input_names
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names

        data: dict[str, Any] = {"input_ids": [row.ids for row in flat]}
        if return_token_type_ids:
            data["token_type_ids"] = [row.type_ids for row in flat]
        if return_attention_mask:
            data["attention_mask"] = [row.attention_mask for row in flat]
        if return_special_tokens_mask:
            data["special_tokens_mask"] = [row.special_tokens_mask for row in flat]
        if return_offsets_mapping:
            data["offset_mapping"] = [row.offsets for row in flat]
        if return_length:
            data["length"] = [len(row.ids) for row in flat]
        if return_overflowing_tokens:
            data["overflow_to_sample_mapping"] = [index for index, _ in rows]

        if max_length is None and verbose and self.model_max_length:
            self._warn_if_too_long(data["input_ids"])

        if not batched and return_tensors is None and not return_overflowing_tokens:
            # one text: rows become flat lists ("length" stays a list of one, as in the reference)
            return BatchEncoding({k: v[0] if v and isinstance(v[0], list) else v for k, v in data.items()}, flat)
        return BatchEncoding(data, flat, tensor_type=return_tensors)

    def encode(
        self,
        text: str | Sequence[str],
        text_pair: str | Sequence[str] | None = None,
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        stride: int = 0,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        verbose: bool = True,
    ) -> Any:
        """The token ids of one text (or pair): ``tok(...)["input_ids"]``."""
        return self(
            text,
            text_pair,
            add_special_tokens=add_special_tokens,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            stride=stride,
            padding_side=padding_side,
            return_tensors=return_tensors,
            return_token_type_ids=False,
            return_attention_mask=False,
            verbose=verbose,
        )["input_ids"]

    def tokenize(self, text: str, pair: str | None = None, add_special_tokens: bool = False) -> list[str]:
        """The tokens of a text (or pair), without special tokens unless asked."""
        return self(text, pair, add_special_tokens=add_special_tokens, verbose=False).tokens(0)

    def _plan(
        self,
        padding: Any,
        truncation: Any,
        max_length: int | None,
        pad_to_multiple_of: int | None,
        verbose: bool,
    ) -> tuple[str | None, str | None, int | None]:
        """(padding strategy or None, truncation strategy or None, max_length), the reference's rules."""
        if max_length is not None and padding is False and truncation is None:
            truncation = "longest_first"  # max_length alone truncates, as in the reference
        pad = _strategy("padding", padding, PADDING_STRATEGIES, true="longest", off="do_not_pad")
        truncate = _strategy(
            "truncation", truncation, TRUNCATION_STRATEGIES, true="longest_first", off="do_not_truncate"
        )
        if padding is True and max_length is not None and truncate is None and verbose:
            warnings.warn(
                "max_length is ignored when padding=True and there is no truncation; "
                "to pad to max_length, use padding='max_length'",
                stacklevel=3,
            )
        if max_length is None:
            limited = self.model_max_length <= _LARGE
            if pad == "max_length":
                if limited:
                    max_length = self.model_max_length
                else:
                    pad = None  # nothing to pad to
            if truncate is not None:
                if limited:
                    max_length = self.model_max_length
                else:
                    truncate = None
        if pad is not None and self._special["pad_token"] is None:
            raise TokenizerError(
                "asked to pad but the tokenizer has no pad token; set one, e.g. tok.pad_token = tok.eos_token"
            )
        if truncate and pad and pad_to_multiple_of and max_length is not None and max_length % pad_to_multiple_of:
            raise TokenizerError(
                f"truncation length ({max_length}) is not a multiple of pad_to_multiple_of ({pad_to_multiple_of})"
            )
        return pad, truncate, max_length

    def _configure(
        self,
        pad: str | None,
        truncate: str | None,
        max_length: int | None,
        stride: int,
        pad_to_multiple_of: int | None,
        padding_side: str | None,
    ) -> None:
        """Set the backend's truncation and padding for one call (only what changed)."""
        backend = self._backend
        if truncate is None:
            if backend.truncation is not None:
                backend.no_truncation()
        else:
            truncation = {
                "max_length": max_length,
                "stride": stride,
                "strategy": truncate,
                "direction": self.truncation_side,
            }
            current = backend.truncation
            if current is None or {key: current.get(key) for key in truncation} != truncation:
                try:
                    backend.enable_truncation(
                        int(max_length or 0), stride=stride, strategy=truncate, direction=self.truncation_side
                    )
                except Exception as error:
                    raise TokenizerError(f"cannot truncate with {truncation}: {error}") from error
        if pad is None:
            if backend.padding is not None:
                backend.no_padding()
        else:
            padding = {
                "length": max_length if pad == "max_length" else None,
                "pad_to_multiple_of": pad_to_multiple_of,
                "pad_id": self.pad_token_id,
                "pad_token": self._special["pad_token"],
                "pad_type_id": self.pad_token_type_id,
                "direction": _side("padding_side", padding_side or self.padding_side),
            }
            if backend.padding != padding:
                backend.enable_padding(**padding)

    def _warn_if_too_long(self, rows: list[list[int]]) -> None:
        longest = max((len(row) for row in rows), default=0)
        if longest > self.model_max_length and "length" not in self._warned:
            self._warned.add("length")  # once per tokenizer, as the reference does
            logger.warning(
                "Token indices sequence length is longer than the specified maximum sequence length for this "
                "model (%d > %d). Running this sequence through the model will result in indexing errors; "
                "pass truncation=True to cut it to model_max_length",
                longest,
                self.model_max_length,
            )

    # -- decoding ---------------------------------------------------------------------------

    def decode(
        self,
        token_ids: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> Any:
        """Ids -> text. A batch (list of lists, 2-D tensor) gives a list of texts, as in the reference.

        Args:
            skip_special_tokens: leave out special tokens ([CLS], <pad>, ...).
            clean_up_tokenization_spaces: remove the spaces tokenisation put before punctuation
                (default: the tokenizer's setting; never applied to byte-level BPE, whose spaces are text).
        """
        ids = _id_list(token_ids)
        if ids and isinstance(ids[0], list):
            return self.batch_decode(ids, skip_special_tokens, clean_up_tokenization_spaces)
        text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._clean_up(text, clean_up_tokenization_spaces)

    def batch_decode(
        self,
        sequences: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> list[str]:
        """A list of texts from a batch of id sequences."""
        rows = _id_list(sequences)
        if rows and not isinstance(rows[0], list):
            rows = [rows]
        texts = self._backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)
        return [self._clean_up(text, clean_up_tokenization_spaces) for text in texts]

    def _clean_up(self, text: str, clean_up: bool | None) -> str:
        if not (self.clean_up_tokenization_spaces if clean_up is None else clean_up):
            return text
        if not self._clean_up_applies:
            if "clean-up" not in self._warned:
                self._warned.add("clean-up")
                logger.warning(
                    "ignoring clean_up_tokenization_spaces for byte-level BPE: its decoded spaces are part of "
                    "the text, and removing them before punctuation would corrupt it"
                )
            return text
        for before, after in _CLEAN_UP:
            text = text.replace(before, after)
        return text

    # -- saving -----------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | Path) -> tuple[str, ...]:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (and vocab.txt for
        WordPiece) to a folder that this library and the reference both load.

        Returns:
            The paths written.

        Raises:
            TokenizerError: ``save_directory`` is a file.
        """
        folder = Path(save_directory)
        if folder.is_file():
            raise TokenizerError(f"cannot save the tokenizer to '{folder}': it is a file, not a folder")
        folder.mkdir(parents=True, exist_ok=True)

        state = json.loads(self._backend.to_str())
        state["truncation"], state["padding"] = self._file_truncation, self._file_padding
        written = [folder / TOKENIZER_FILE]
        written[0].write_text(json.dumps(state, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

        config = {k: v for k, v in self._config.items() if k not in _UNSAVED_CONFIG_KEYS}
        config.update(self._options)
        config.update(
            model_max_length=self.model_max_length,
            padding_side=self.padding_side,
            truncation_side=self.truncation_side,
            clean_up_tokenization_spaces=self.clean_up_tokenization_spaces,
        )
        config.update(self.special_tokens_map)
        written.append(folder / CONFIG_FILE)
        written[-1].write_text(
            json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        written.append(folder / SPECIAL_TOKENS_FILE)
        written[-1].write_text(
            json.dumps(self.special_tokens_map, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        if isinstance(self._backend.model, tokenizers.models.WordPiece):
            written.append(folder / VOCAB_FILE)  # what the Python BertTokenizer reads
            write_vocab(written[-1], self._backend.get_vocab(with_added_tokens=False))
        return tuple(str(path) for path in written)

    def __repr__(self) -> str:
        model = type(self._backend.model).__name__
        return (
            f"Tokenizer(model={model}, name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"model_max_length={self.model_max_length}, padding_side={self.padding_side!r}, "
            f"special_tokens={self.special_tokens_map})"
        )


# the reference drops these on save: private paths, and added tokens that tokenizer.json already holds
_UNSAVED_CONFIG_KEYS = frozenset({"name_or_path", "special_tokens_map_file", "tokenizer_file", "added_tokens_decoder"})


def write_vocab(file: Path, vocab: Mapping[str, int]) -> None:
    """A vocab.txt: one token per line, line number = id."""
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[token] for token in tokens] != list(range(len(tokens))):
        logger.warning("the vocabulary ids of '%s' are not consecutive: line numbers will not match ids", file)
    file.write_text("".join(token + "\n" for token in tokens), encoding="utf-8")


def _side(option: str, side: str) -> str:
    if side not in SIDES:
        raise TokenizerError(f"{option}={side!r} is not allowed; use 'left' or 'right'")
    return side


def _strategy(option: str, value: Any, allowed: Sequence[str], *, true: str, off: str) -> str | None:
    """A padding or truncation argument -> strategy name, or None for off."""
    if value is None or value is False:
        return None
    if value is True:
        return true
    name = str(getattr(value, "value", value))  # the reference's enums carry their name in .value
    if name not in allowed:
        raise TokenizerError(f"{option}={value!r} is not allowed; use True, False or one of: {', '.join(allowed)}")
    return None if name == off else name


def _is_words(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(word, str) for word in value)


def _batch_inputs(text: Any, text_pair: Any, pretokenized: bool) -> tuple[bool, list[Any]]:
    """(whether the call is batched, the inputs for ``encode_batch``), with the reference's checks."""

    def is_sequence(value: Any) -> bool:
        return _is_words(value) if pretokenized else isinstance(value, str)

    def is_item(value: Any) -> bool:  # one row of a batch: a sequence or a (sequence, pair)
        return is_sequence(value) or (
            isinstance(value, (list, tuple)) and len(value) == 2 and all(is_sequence(part) for part in value)
        )

    if pretokenized:
        batched = isinstance(text, (list, tuple)) and len(text) > 0 and isinstance(text[0], (list, tuple))
    else:
        batched = isinstance(text, (list, tuple))
    if not batched:
        if not is_sequence(text) or (text_pair is not None and not is_sequence(text_pair)):
            raise TokenizerError(_INPUT_HELP)
        # an empty pair counts as no pair, as in the reference
        return False, [(text, text_pair)] if text_pair else [text]
    if text_pair is None:
        if not all(is_item(item) for item in text):
            raise TokenizerError(_INPUT_HELP)
        return True, [tuple(item) if isinstance(item, list) and not pretokenized else item for item in text]
    if isinstance(text_pair, str) or not isinstance(text_pair, (list, tuple)):
        raise TokenizerError("when tokenizing a batch, text_pair must be a list as long as text")
    if len(text_pair) != len(text):
        raise TokenizerError(f"batch length of text ({len(text)}) does not match that of text_pair ({len(text_pair)})")
    if not all(is_sequence(item) for item in [*text, *text_pair]):
        raise TokenizerError(_INPUT_HELP)
    return True, list(zip(text, text_pair, strict=True))


_INPUT_HELP = (
    "text must be a string (one example), a list of strings (a batch), a list of (text, pair) tuples, "
    "or with is_split_into_words=True a list of words or a batch of such lists"
)


def _id_list(ids: Any) -> Any:
    """Token ids as Python ints, from an int, a list, a tensor or an array; a batch as a list of lists."""
    if hasattr(ids, "tolist"):  # tensor, array, numpy scalar
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    rows: list[Any] = []
    for item in ids:
        if hasattr(item, "tolist"):
            item = item.tolist()
        rows.append([int(index) for index in item] if isinstance(item, (list, tuple)) else int(item))
    return rows


def _tensor(value: Any, kind: str) -> Any:
    """Lists of ints -> an int64 torch tensor or numpy array (via numpy when it is installed: faster)."""
    import torch

    try:
        import numpy
    except ImportError:  # torch does not need numpy
        if kind == "np":
            raise TokenizerError("return_tensors='np' needs numpy, which is not installed") from None
        return torch.tensor(value, dtype=torch.long)
    array = numpy.asarray(value, dtype=numpy.int64)
    return array if kind == "np" else torch.from_numpy(array)
