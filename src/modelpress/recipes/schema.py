"""Versioned YAML recipes: a list of compression stages, validated with key paths.

.. code-block:: yaml

    version: 1
    name: lenet5-prune90
    model: lenet5            # default model (zoo name, file.py:factory, HF dir or artifact)
    data: mnist5k            # default dataset
    seed: 0
    baseline:                # how to train the model first when it is an untrained zoo model
      train: {epochs: 4, lr: 0.002}
    stages:
      - name: prune
        method: prune.magnitude
        config: {sparsity: 0.9, schedule: {kind: polynomial}}
        finetune: {epochs: 3, lr: 0.0005}
    export: {runtime: onnxruntime}   # optional: end with RUN/model.onnx, measured in the last report row

Unknown keys and bad values are rejected with their path (``stages.1.config.sparsity: ...``).
``apply_overrides(raw, ["stage.1.sparsity=0.8"])`` edits a raw recipe before validation:
``stage.N`` is the N-th stage counting from 1 (or a stage name), and a key that is not a
stage key (``name``, ``method``, ``config``, ``finetune``) goes into the stage's config.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from ..core.config import MethodConfig, StrictModel
from ..core.errors import ConfigError
from ..core.limits import MAX_YAML_BYTES, load_yaml, read_text_capped, short
from ..core.training import TrainConfig
from ..distillation.kd import KD
from ..engine.registry import build_config
from ..export.tflite import TfliteOptions

BUILTIN_DIR = Path(__file__).parent / "builtin"
STAGE_KEYS = ("name", "method", "config", "finetune", "distill")


class Stage(StrictModel):
    """One step of a recipe: a registered method, its config, and an optional fine-tune.

    ``distill`` (a :class:`~modelpress.distillation.kd.KD` config) makes the stage's training
    (the method's own, e.g. QAT or a pruning schedule, or the fine-tune after it) learn from a
    frozen teacher's outputs instead of the labels alone: ``teacher`` unset means the recipe's
    uncompressed baseline, which is how distillation recovers accuracy after pruning or
    quantization. Example: ``distill: {T: 4, alpha: 0.7}``.
    """

    name: str = ""
    method: str
    config: dict[str, Any] = Field(default_factory=dict)
    finetune: TrainConfig | None = None
    distill: KD | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if v and not re.fullmatch(r"[A-Za-z0-9_\-]+", v):
            raise ValueError("stage names use letters, digits, '-' and '_' only")
        return v


class BaselineSpec(StrictModel):
    """Training of the uncompressed model when the recipe starts from an untrained zoo model."""

    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=10, lr=3e-3, batch_size=32))


class EvalSpec(StrictModel):
    """What is measured after every stage."""

    latency: bool = True
    onnx: bool = True
    batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 64])
    threads: int = Field(1, ge=1)
    repeats: int = Field(20, ge=1)
    # timed besides eager PyTorch (modelpress.runtime: onnxruntime, openvino, litert); onnx=false drops
    # those reading ONNX
    runtimes: list[str] = Field(default_factory=lambda: ["onnxruntime"])

    @field_validator("runtimes")
    @classmethod
    def _known_runtimes(cls, names: list[str]) -> list[str]:
        from ..runtime import runtime_names

        unknown = [n for n in names if n not in runtime_names()]
        if unknown:
            raise ValueError(f"unknown runtime(s) {unknown}; known: {', '.join(runtime_names())}")
        return names


class ExportSpec(StrictModel):
    """The file a run ends with, for its runtime (``RUN/model.onnx``, ``.xml`` + ``.bin``, ``.tflite``),
    written by :func:`~modelpress.export.deploy.export_deployable` and measured in the report's last
    row: its quality as the runtime computes it, its bytes, and its latency against the
    uncompressed model's file in the same runtime (interleaved)."""

    runtime: str = "onnxruntime"
    embedding_bits: Literal[4, 8] | None = Field(8, description="dynamic int8 models: bits of the embedding "
                                                                "tables (null: float)")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(4, description="MatMulNBits layers: 0 fp32 compute, 4 int8")
    tflite: TfliteOptions = Field(default_factory=TfliteOptions,
                                  description="runtime litert: precision, weight granularity ... (int8 calibrates "
                                              "on the training split)")

    @field_validator("runtime")
    @classmethod
    def _known_runtime(cls, name: str) -> str:
        from ..runtime import runtime_names

        if name not in runtime_names():
            raise ValueError(f"unknown runtime {name!r}; known: {', '.join(runtime_names())}")
        return name


class Recipe(StrictModel):
    """A validated recipe. Build with :meth:`load`, :meth:`from_dict` or :meth:`builtin`."""

    version: Literal[1] = 1
    name: str = "recipe"
    description: str = ""
    model: str | None = None
    data: str | None = None
    seed: int = Field(0, ge=0, lt=2**53)  # stage i is seeded with seed * 1000 + i: keep it in range
    baseline: BaselineSpec = Field(default_factory=BaselineSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    stages: list[Stage] = Field(min_length=1)
    export: ExportSpec | None = None

    @model_validator(mode="after")
    def _unique_names(self):
        seen = set()
        for i, st in enumerate(self.stages):
            if not st.name:
                st.name = st.method.split(".")[-1]
            if st.name in seen:
                st.name = f"{st.name}{i + 1}"
            seen.add(st.name)
        return self

    # -- construction ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Any, where: str | None = None) -> "Recipe":
        where = where or "recipe"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: a recipe is a mapping with 'version' and 'stages', got {type(raw).__name__}",
                              hint="see `modelpress recipes --show lenet5-prune` for an example")
        recipe = super().from_dict(raw, where=where)
        recipe.method_configs(where)  # validate every stage's method config now
        return recipe

    @classmethod
    def load(cls, path_or_name: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> "Recipe":
        """Load a recipe file, or a built-in recipe by name, applying ``--set`` overrides."""
        path = Path(path_or_name)
        if not path.is_file():
            candidate = BUILTIN_DIR / f"{path_or_name}.yaml"
            if candidate.is_file():
                path = candidate
            else:
                raise ConfigError(f"recipe {str(path_or_name)!r} is neither a file nor a built-in recipe",
                                  hint=f"built-in recipes: {', '.join(builtin_names())}")
        try:
            raw = load_yaml(read_text_capped(path, MAX_YAML_BYTES, "recipe"), path.name)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}:{at} is not valid YAML ({getattr(exc, 'problem', exc)})",
                              hint="check the indentation, brackets and quotes around that line") from None
        except (UnicodeDecodeError, OSError) as exc:
            raise ConfigError(f"cannot read recipe {path}: {exc}") from None
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            # PyYAML's constructors raise plain errors for values such as the date 2001-02-30
            # or nesting deeper than Python's recursion limit
            raise ConfigError(f"{path}: a value in the YAML cannot be read ({type(exc).__name__}: {short(str(exc))})",
                              hint="quote the value to keep it as a string") from None
        raw = apply_overrides(raw, overrides)
        return cls.from_dict(raw, where=path.name)

    # -- use -------------------------------------------------------------------------
    def method_configs(self, where: str = "recipe") -> list[MethodConfig]:
        return [build_config(st.method, st.config, where=f"{where}.stages.{i}.config")
                for i, st in enumerate(self.stages)]

    def to_dict(self) -> dict:
        """A resolved plain dict: every stage config with all its defaults filled in."""
        d = self.model_dump(mode="json")
        for st, cfg in zip(d["stages"], self.method_configs()):
            st["config"] = cfg.to_dict()
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def _parse_value(text: str, where: str = "--set") -> Any:
    try:
        return load_yaml(text, where)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """Apply ``key.path=value`` overrides to a raw recipe dict (see module docstring)."""
    if not overrides:
        return raw
    if not isinstance(raw, dict):
        raise ConfigError("cannot apply --set overrides: the recipe is not a mapping")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE", hint="e.g. --set stage.1.sparsity=0.8")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if parts[0] == "stage":
            if len(parts) < 3:
                raise ConfigError(f"override {key!r}: use stage.N.FIELD (N counts from 1) or stage.NAME.FIELD")
            stages = raw.get("stages") or []
            sel = parts[1]
            idx = next((i for i, s in enumerate(stages) if isinstance(s, dict)
                        and (s.get("name") or str(s.get("method", "")).split(".")[-1]) == sel), None)
            if idx is None and sel.isdigit() and 1 <= int(sel) <= len(stages):
                idx = int(sel) - 1
            if idx is None:
                raise ConfigError(f"override {key!r}: no stage {sel!r} (the recipe has {len(stages)} stages)",
                                  hint="stages count from 1, or use the stage's name")
            target, rest = stages[idx], parts[2:]
            if rest[0] not in STAGE_KEYS:
                rest = ["config", *rest]
        else:
            target, rest = raw, parts
        for p in rest[:-1]:
            if isinstance(target, list) and p.isdigit() and int(p) < len(target):
                target = target[int(p)]
                continue
            if not isinstance(target, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a mapping in the recipe")
            if target.get(p) is None:
                target[p] = {}
            target = target[p]
        if isinstance(target, list) and rest[-1].isdigit():
            target[int(rest[-1])] = _parse_value(value, f"--set {key}")
        elif isinstance(target, dict):
            target[rest[-1]] = _parse_value(value, f"--set {key}")
        else:
            raise ConfigError(f"override {key!r}: cannot set a field inside a {type(target).__name__}")
    return raw
