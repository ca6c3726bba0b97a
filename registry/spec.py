"""ModelSpec: the declarative description of a model, and the keyword overrides that change it.

A spec names a family, one component per slot (or ``auto``), the family's hyperparameters, the
task options of classification heads, and the dtype. It is frozen, rejects unknown fields, and
round-trips through JSON, TOML and YAML.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from registry.errors import InvalidSpecError, UnknownOverrideError

SLOTS: tuple[str, ...] = ("attention", "position", "cache", "tokenizer", "head")
BUILD_OPTIONS: tuple[str, ...] = ("dtype", "device")
AUTO = "auto"


class Components(BaseModel):
    """One component name per slot; ``auto`` lets selection choose (and record why)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    attention: str = AUTO
    position: str = AUTO
    cache: str = AUTO
    tokenizer: str = AUTO
    head: str = AUTO


class TaskSpec(BaseModel):
    """Options of the classification heads, named as in the reference's config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_labels: int = Field(default=2, ge=1)
    problem_type: Literal["regression", "single_label_classification", "multi_label_classification"] | None = None
    classifier_dropout: float | None = Field(default=None, ge=0.0, le=1.0)
    id2label: dict[int, str] | None = None

    @model_validator(mode="after")
    def _labels_agree(self) -> TaskSpec:
        if self.id2label is not None and len(self.id2label) != self.num_labels:
            raise ValueError(f"id2label has {len(self.id2label)} entries but num_labels is {self.num_labels}")
        return self


class FamilyConfig(BaseModel):
    """Base of every family's hyperparameters (frozen, unknown fields rejected)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSpec(BaseModel):
    """A validated, serialisable description of a model.

    Example:
        >>> spec = registry.spec("bloom-560m", attention="sdpa", n_layer=2)
        >>> spec.components.attention, spec.config.n_layer
        ('sdpa', 2)
        >>> registry.ModelSpec.from_file("my.toml")
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: str
    name: str | None = None
    components: Components = Components()
    config: SerializeAsAny[FamilyConfig]
    task: TaskSpec = TaskSpec()
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @model_validator(mode="before")
    @classmethod
    def _family_config(cls, data: Any) -> Any:
        # the family plugin owns its config schema; look it up by name (raises UnknownComponentError)
        if isinstance(data, Mapping) and "family" in data and not isinstance(data.get("config"), FamilyConfig):
            from registry.discovery import default_catalog

            family = default_catalog().get("family", data["family"])
            data = dict(data)
            data["config"] = family.config_class.model_validate(data.get("config") or {})  # type: ignore[attr-defined]
        return data

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_name(cls, value: Any) -> Any:
        return str(value).removeprefix("torch.") if value is not None else value

    # -- serialisation ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(_stringify_keys(self.to_dict()))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        writers = {".json": self.to_json, ".toml": self.to_toml, ".yaml": self.to_yaml, ".yml": self.to_yaml}
        if path.suffix not in writers:
            raise InvalidSpecError(f"cannot write a spec to '{path}': use .json, .toml, .yaml or .yml")
        path.write_text(writers[path.suffix]())

    @classmethod
    def from_file(cls, path: str | Path) -> ModelSpec:
        """Read a spec from a .json, .toml, .yaml or .yml file.

        Raises:
            InvalidSpecError: unreadable file, unknown suffix, or invalid contents.
        """
        return validate_spec(read_spec_file(path), source=str(path))


def _stringify_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _stringify_keys(v) for k, v in value.items()}
    return value


def read_spec_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise InvalidSpecError(f"cannot read spec file '{path}': {error}") from error
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise InvalidSpecError(f"spec file '{path}' must end in .json, .toml, .yaml or .yml")
    except InvalidSpecError:
        raise
    except Exception as error:
        raise InvalidSpecError(f"spec file '{path}' is not valid {path.suffix[1:]}: {error}") from error
    if not isinstance(data, dict):
        raise InvalidSpecError(f"spec file '{path}' must hold a table/object at the top level")
    return data


def validate_spec(data: Mapping[str, Any], *, source: str = "spec") -> ModelSpec:
    """Validate plain data as a ModelSpec, turning pydantic's errors into one InvalidSpecError."""
    data = dict(data)
    if isinstance(data.get("family"), str) and not isinstance(data.get("config"), FamilyConfig):
        from registry.discovery import default_catalog

        family = default_catalog().get("family", data["family"])
        try:
            data["config"] = family.config_class.model_validate(data.get("config") or {})  # type: ignore[attr-defined]
        except ValidationError as error:
            raise InvalidSpecError(_describe(error, source, prefix="config.")) from None
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as error:
        raise InvalidSpecError(_describe(error, source)) from None


def _describe(error: ValidationError, source: str, prefix: str = "") -> str:
    lines = []
    for item in error.errors():
        where = (prefix + ".".join(str(p) for p in item["loc"])).rstrip(".") or "spec"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"{where}: {message}")
    return f"invalid {source}: " + "; ".join(lines)


def apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any], config_fields: set[str]) -> dict[str, Any]:
    """Route keyword overrides into spec data: slots, spec fields, task options, family config fields.

    Raises:
        UnknownOverrideError: a key that is none of those (device belongs to build(), not spec()).
    """
    data = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    task_fields = set(TaskSpec.model_fields)
    for key, value in overrides.items():
        if key in SLOTS:
            data.setdefault("components", {})[key] = value
        elif key == "dtype":
            data["dtype"] = value
        elif key in task_fields:
            data.setdefault("task", {})[key] = value
        elif key in config_fields:
            data.setdefault("config", {})[key] = value
        else:
            allowed = [*SLOTS, "dtype", *sorted(task_fields), *sorted(config_fields)]
            raise UnknownOverrideError(key, allowed)
    return data
