"""Recipes: YAML → typed, validated, versioned configuration.

Every model forbids unknown keys and coercion (compress/schema.py), so a typo is an error with
its path (`recipes/x.yaml: stages[0].group_sise: extra inputs are not permitted`), raised before
any model is loaded. Loading refuses, with the file's name, whatever is not a small UTF-8 YAML
mapping: an oversized file, other encodings, duplicate keys, alias bombs, deep nesting.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from compress.distill.config import DistillConfig
from compress.errors import RecipeError
from compress.prune.config import PruneConfig
from compress.quant.config import QuantizeConfig
from compress.schema import (
    DEVICE_PATTERN,
    MAX_COUNT,
    MAX_FEWSHOT,
    MAX_ITEMS,
    MAX_TOKENS,
    FieldError,
    Seed,
    StrictConfig,
    Text,
    brief,
    error_location,
)
from compress.search.config import SearchConfig

RECIPE_VERSION = 1
ENV_EVAL_DATA_DIR = "COMPRESS_EVAL_DATA_DIR"
MAX_NAME = 100  # the name is a directory (and `<name>.lock`): well under any filesystem's 255

# Limits on the file itself. A recipe is a few KB that nests five levels deep with a few dozen
# values; a document far beyond these is a mistake or an attack, and parsing or validating it
# would take minutes (a 50 MB file) or forever (a billion-laughs alias bomb: a 1 KB file whose
# aliases expand to billions of values when walked).
MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_NODES = 100_000  # values once aliases are expanded
# Values written in the file. PyYAML parses some 30,000 a second, so a 1 MB flow list of
# 500,000 numbers would take 15 s to parse before any limit on the result could refuse it.
MAX_WRITTEN_NODES = 10_000


class ModelConfig(StrictConfig):
    source: Text = Field(
        ...,
        description="Hub id (`org/name`), local directory, `.gguf` file, or a file inside an "
        "installed package as `package:<module>/<file>`",
    )
    revision: Text | None = Field(None, description="Hub revision (branch, tag or commit)")
    trust_remote_code: bool = Field(False, description="run code shipped with the model")


class CalibrationConfig(StrictConfig):
    path: Text = Field(
        ...,
        description="UTF-8 text file, or `hf:<dataset>[:<config>]:<split>[:<column>]`",
    )
    num_samples: int = Field(128, gt=0, le=MAX_TOKENS, description="windows drawn from the text")
    seq_len: int = Field(512, gt=0, le=MAX_TOKENS, description="tokens per window")
    seed: Seed = Field(0, description="which windows are drawn")
    batch_size: int = Field(
        8, gt=0, le=MAX_COUNT, description="windows per forward pass while calibrating"
    )
    device: str = Field(
        "auto",
        pattern=DEVICE_PATTERN,
        description="where each decoder layer runs while it is calibrated; the model stays "
        "where it was loaded (CPU memory) and one layer at a time is moved there, so the model "
        "need not fit on the GPU. auto = cuda if available, else cpu",
    )


class TaskConfig(StrictConfig):
    name: Text = Field(..., description="lm-eval task or group name, e.g. `mmlu`, `gsm8k`")
    limit: int | None = Field(
        None, gt=0, le=MAX_ITEMS, description="items per (sub)task; None = all"
    )
    num_fewshot: int | None = Field(
        None, ge=0, le=MAX_FEWSHOT, description="None = the task's default"
    )
    metric: Text | None = Field(None, description="metric to gate on; None = the task's primary")
    max_gen_toks: int | None = Field(
        None,
        gt=0,
        le=MAX_TOKENS,
        description="cap on generated tokens for generative tasks (keeps runs short)",
    )


class QualityConfig(StrictConfig):
    """Perplexity and KL divergence to the baseline on held-out text: cheap, sensitive signals."""

    path: Text = Field(
        ..., description="held-out UTF-8 text file, or `hf:<dataset>[:<config>]:<split>[:<column>]`"
    )
    seq_len: int = Field(512, gt=0, le=MAX_TOKENS, description="tokens per window")
    max_windows: int = Field(
        8, gt=0, le=MAX_COUNT, description="consecutive windows from the start"
    )


class EvalConfig(StrictConfig):
    tasks: list[TaskConfig] = Field(..., min_length=1)
    quality: QualityConfig | None = Field(
        None, description="perplexity / KL divergence / top-1 agreement vs the baseline"
    )
    batch_size: int = Field(1, gt=0, le=MAX_COUNT)
    seed: Seed = Field(1234, description="few-shot sampling seed")
    data_dir: Text | None = Field(
        None,
        description="local copies of Hub datasets laid out as `<data_dir>/<org>/<name>`; "
        f"also settable with ${ENV_EVAL_DATA_DIR}; None = fetch from the Hub",
    )

    @model_validator(mode="after")
    def _unique_tasks(self) -> EvalConfig:
        names = [t.name for t in self.tasks]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise FieldError(("tasks",), f"tasks listed twice: {duplicated}")
        return self


Rule = Literal["non_inferiority", "point"]
RULE_HELP = (
    "non_inferiority: ship only when the one-sided upper confidence bound of the drop is "
    "within the budget, reject when confident it exceeds it, else inconclusive; point: the "
    "estimate alone decides (ship or reject, never inconclusive). null = gate.rule"
)


class Budget(StrictConfig):
    # A drop is a fraction of the metric's range, so above 1 it can only be a percentage
    # written by mistake (5 for 5 points), a budget that gates nothing.
    max_drop: float = Field(
        ...,
        ge=0,
        le=1,
        description="largest allowed absolute drop of the metric (0.05 = 5 points)",
    )
    rule: Rule | None = Field(None, description=RULE_HELP)


class QualityBudget(StrictConfig):
    """Limits on the held-out-text signals (`eval.quality`); each is optional."""

    max_kl_divergence: float | None = Field(
        None, gt=0, description="largest allowed mean KL(baseline ‖ artifact) per token, nats"
    )
    max_perplexity_increase: float | None = Field(
        None, ge=0, description="largest allowed relative perplexity increase (0.1 = +10 %)"
    )
    min_top1_agreement: float | None = Field(
        None, gt=0, le=1, description="smallest allowed share of positions with the same top-1"
    )
    rule: Rule | None = Field(None, description=RULE_HELP + " (intervals over windows)")

    @model_validator(mode="after")
    def _at_least_one(self) -> QualityBudget:
        limits = ("max_kl_divergence", "max_perplexity_increase", "min_top1_agreement")
        if all(getattr(self, name) is None for name in limits):
            raise ValueError(
                "set at least one of max_kl_divergence, max_perplexity_increase, "
                "min_top1_agreement (or leave gate.quality out)"
            )
        return self


class SequentialConfig(StrictConfig):
    """Score the artifact in batches and stop as soon as the verdict is decided."""

    looks: int = Field(4, ge=2, le=20, description="batches (looks at the data), the last = all")
    first: int = Field(
        200,
        ge=2,
        le=MAX_ITEMS,
        description="paired items of each task at the first look (then even steps)",
    )
    seed: Seed = Field(0, description="which items come first (a seeded shuffle)")


class GateConfig(StrictConfig):
    rule: Rule = Field("non_inferiority", description="default rule of every budget")
    confidence: float = Field(
        0.95, gt=0.5, lt=1, description="one-sided confidence of every decision (1 − alpha)"
    )
    power: float = Field(
        0.8, gt=0.5, lt=1, description="planning: chance that the planned items decide"
    )
    budgets: dict[Text, Budget] = Field(default_factory=dict, description="task name → budget")
    quality: QualityBudget | None = Field(
        None, description="budgets on perplexity / KL / top-1 agreement (needs eval.quality)"
    )
    sequential: SequentialConfig | None = Field(
        None,
        description="score the artifact in batches and stop once decided (non_inferiority "
        "budgets stop early; point-rule and ungated tasks are scored in full)",
    )

    @model_validator(mode="after")
    def _something_gated(self) -> GateConfig:
        if not self.budgets and self.quality is None:
            raise ValueError("no budget: set gate.budgets (per task) and/or gate.quality")
        return self

    @property
    def alpha(self) -> float:
        return 1 - self.confidence

    def rule_of(self, budget: Budget | QualityBudget) -> Rule:
        return budget.rule or self.rule


class OutputConfig(StrictConfig):
    dir: Text = Field("runs", description="root of work/, release/, rejected/ and cache/")


# Every stage config type, each with a `type: Literal[...]` tag that selects it.
STAGE_CONFIG_TYPES: tuple[type[BaseModel], ...] = (PruneConfig, DistillConfig, QuantizeConfig)
STAGE_TAGS = frozenset(t.model_fields["type"].default for t in STAGE_CONFIG_TYPES)
StageConfig = Annotated[PruneConfig | DistillConfig | QuantizeConfig, Field(discriminator="type")]


def _supported_version(value: Any) -> Any:
    # Before the Literal: it would take `true` (True == 1) and only say "Input should be 1".
    if type(value) is not int or value != RECIPE_VERSION:
        shown = brief(value) if type(value) is int else f"{brief(value)} ({type(value).__name__})"
        raise PydanticCustomError(
            "recipe_version",
            "unsupported recipe version {shown}: this compress reads `version: {supported}`",
            {"shown": shown, "supported": RECIPE_VERSION},
        )
    return value


class Recipe(StrictConfig):
    version: Annotated[Literal[1], BeforeValidator(_supported_version)] = Field(
        ..., description="recipe schema version"
    )
    name: str = Field(
        ...,
        min_length=1,
        max_length=MAX_NAME,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="the artifact's name: a directory under output.dir",
    )
    model: ModelConfig
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    calibration: CalibrationConfig | None = None
    stages: list[StageConfig] = Field(..., min_length=1)
    eval: EvalConfig
    gate: GateConfig
    output: OutputConfig = OutputConfig()
    search: SearchConfig | None = Field(
        None,
        description="`compress search`: the smallest per-layer mix of formats that passes the "
        "gate, built with the quantize stage's method (`compress run` ignores it)",
    )

    @model_validator(mode="after")
    def _calibration_when_needed(self) -> Recipe:
        needing = [
            f"stages[{i}] ({stage.type})"
            for i, stage in enumerate(self.stages)
            if stage.needs_calibration
        ]
        if needing and self.calibration is None:
            raise FieldError(
                ("calibration",),
                f"{', '.join(needing)} need a `calibration` section (gptq, data-driven pruning "
                "scores and layer scores run on calibration text)",
            )
        return self

    @model_validator(mode="after")
    def _dense_stages_before_quantize(self) -> Recipe:
        quantized_at = next(
            (i for i, s in enumerate(self.stages) if isinstance(s, QuantizeConfig)), None
        )
        if quantized_at is None:
            return self
        for verb, kind in (("prune", PruneConfig), ("distill", DistillConfig)):
            late = [
                i for i, s in enumerate(self.stages) if isinstance(s, kind) and i > quantized_at
            ]
            if late:
                raise FieldError(
                    ("stages", late[0]),
                    f"stages{late} {verb} after a quantize stage (stages[{quantized_at}]): "
                    f"{verb} works on dense weights, so {verb} first, then quantize (for "
                    "training that sees the quantization, set the distill stage's `qat`)",
                )
        return self

    @model_validator(mode="after")
    def _qat_matches_the_next_quantize_stage(self) -> Recipe:
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, DistillConfig) or stage.qat is None:
                continue
            following = [s for s in self.stages[i + 1 :] if isinstance(s, QuantizeConfig)]
            if not following:
                raise FieldError(("stages", i, "qat"), "no quantize stage follows to match")
            quantize = following[0]
            differing = [
                f"{name} {getattr(stage.qat, name)!r} vs {getattr(quantize, name)!r}"
                for name in ("bits", "group_size", "symmetric", "observer")
                if getattr(stage.qat, name) != getattr(quantize, name)
            ]
            if quantize.include is not None or quantize.exclude:
                differing.append("include/exclude (QAT covers the default layer selection)")
            if quantize.overrides:
                differing.append("overrides (QAT fake-quantizes one scheme)")
            if differing:
                raise FieldError(
                    ("stages", i, "qat"),
                    f"stages[{i}].qat must fake-quantize exactly as the next quantize stage "
                    f"stores; differs in: {'; '.join(differing)}",
                )
        return self

    @model_validator(mode="after")
    def _search_has_what_it_needs(self) -> Recipe:
        if self.search is None:
            return self
        last = self.stages[-1]
        if not isinstance(last, QuantizeConfig) or len(self.stages) != 1:
            raise FieldError(
                ("stages",),
                "search: the recipe needs exactly one stage, a quantize stage, whose method, "
                "observer and gptq options build every candidate",
            )
        written = [name for name in ("include", "overrides") if getattr(last, name)]
        if written or last.exclude:
            raise FieldError(
                ("stages", 0, (written or ["exclude"])[0]),
                "search: the search chooses each layer's format (and which stay 16-bit), so "
                "the quantize stage leaves include / exclude / overrides unset",
            )
        if self.eval.quality is None or self.gate.quality is None:
            raise FieldError(
                ("gate", "quality"),
                "search: candidates are judged on held-out text, so the recipe needs "
                "eval.quality and gate.quality budgets",
            )
        return self

    @model_validator(mode="after")
    def _budgets_name_tasks(self) -> Recipe:
        task_names = {t.name for t in self.eval.tasks}
        unknown = sorted(set(self.gate.budgets) - task_names)
        if unknown:
            raise FieldError(
                ("gate", "budgets"),
                f"gate.budgets names tasks that eval.tasks does not run: {unknown} "
                f"(eval.tasks: {sorted(task_names)})",
            )
        return self

    @model_validator(mode="after")
    def _quality_budget_needs_quality_eval(self) -> Recipe:
        if self.gate.quality is not None and self.eval.quality is None:
            raise FieldError(
                ("gate", "quality"),
                "gate.quality needs eval.quality (the held-out text its signals are measured on)",
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON form: what `--resume` checks against."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def format_location(loc: tuple[int | str, ...], stages_tags: frozenset[str] = STAGE_TAGS) -> str:
    """`('stages', 0, 'quantize', 'group_size')` → `stages[0].group_size`.

    A key that is not a plain name (a task name with a NUL, an empty one) is quoted, as
    `gate.budgets['']`, and pydantic's `[key]` marker (the key itself is wrong) is spelled out.
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in stages_tags and out.endswith("]"):
            continue  # the discriminator tag pydantic inserts into union paths
        elif part == "[key]":
            out += " (key)"
        elif not _PLAIN_KEY.fullmatch(part):
            out += f"[{brief(part)}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<recipe>"


# Pydantic quotes some inputs in its messages (a discriminator tag may be a 1 MB string), and a
# file of thousands of unknown keys has thousands of errors: the report stays readable.
MAX_ERROR_LINES = 20
MAX_MESSAGE = 300


def format_validation_error(exc: ValidationError, source: str, what: str = "recipe") -> str:
    """One line per error, each naming its field path; `source` names where the data came from."""
    errors = exc.errors()
    lines = [f"{source}: invalid {what}"]
    for err in errors[:MAX_ERROR_LINES]:
        message = err["msg"]
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 3] + "..."
        lines.append(f"  {format_location(error_location(err))}: {message}")
    if len(errors) > MAX_ERROR_LINES:
        lines.append(f"  ... and {len(errors) - MAX_ERROR_LINES} more")
    return "\n".join(lines)


def _field_error(source: str, loc: tuple[int | str, ...], message: str) -> RecipeError:
    """The same shape as a validation error: `source: invalid recipe` / `  field: message`."""
    return RecipeError(f"{source}: invalid recipe\n  {format_location(loc)}: {message}")


def _check_document_shape(data: Any, source: str) -> None:
    """Refuse a document too large or too deep to validate, and mapping keys that are not text.

    YAML aliases share one parsed object between several places, so a 1 KB file can describe
    billions of values (the billion-laughs bomb) that take no memory until something walks
    them: pydantic's validation would, for hours. This walk counts every value it would visit,
    repeats included, and stops at MAX_NODES or MAX_DEPTH, whichever comes first; a
    self-referencing alias (`&a [*a]`) stops at the depth limit.
    """
    stack: list[tuple[Any, tuple[int | str, ...]]] = [(data, ())]
    counted = 1
    while stack:
        value, loc = stack.pop()
        if len(loc) >= MAX_DEPTH:
            raise _field_error(source, loc, f"nested deeper than {MAX_DEPTH} levels")
        children: list[tuple[Any, tuple[int | str, ...]]]
        if isinstance(value, dict):
            for key in value:
                if not isinstance(key, str):
                    # YAML 1.1 reads an unquoted `on`, `yes` or `no` key as a bool.
                    raise _field_error(
                        source,
                        loc,
                        f"key {brief(key)} ({type(key).__name__}) is not a string; quote it",
                    )
            children = [(item, (*loc, key)) for key, item in value.items()]
        elif isinstance(value, list | tuple | set | frozenset):
            children = [(item, (*loc, i)) for i, item in enumerate(value)]
        else:
            continue
        counted += len(children)
        if counted > MAX_NODES:
            raise RecipeError(
                f"{source}: more than {MAX_NODES:,} values (YAML aliases expanding?); "
                "a recipe holds a few dozen"
            )
        stack.extend(children)


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    """Validate an already-parsed YAML/JSON document; errors name `source` and the field path."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping, got {type(data).__name__}")
    _check_document_shape(data, source)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, source)) from None
    except RecursionError:  # a bound missed above must still be bad input, not a crash
        raise RecipeError(f"{source}: nested too deeply to validate") from None


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that refuses what PyYAML lets through or crashes on.

    - A duplicate key: YAML says keys are unique, PyYAML lets the last one silently win, so
      `bits: 4` ... `bits: 8` would quantize to 8 bits with no word.
    - Nesting deeper than MAX_DEPTH: PyYAML's composer recurses, so `[[[[...` a few thousand
      deep is a RecursionError.
    - More than MAX_WRITTEN_NODES values: refused as they are read, not after seconds of it.
    - A value whose constructor raises ValueError (an int of 5,000 digits, `2024-13-45` read as
      a date): reported as a YAML error with its line, like any other.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        self._nodes += 1
        try:
            problem = None
            if self._depth > MAX_DEPTH:
                problem = f"nested deeper than {MAX_DEPTH} levels"
            elif self._nodes > MAX_WRITTEN_NODES:
                problem = f"more than {MAX_WRITTEN_NODES:,} values; a recipe holds a few dozen"
            if problem is not None:
                raise yaml.composer.ComposerError(None, None, problem, self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"cannot read {brief(node.value)}: {brief(str(exc), 120)}",
                node.start_mark,
            ) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` merges, and explicit keys may override what it brings
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first_line.get(key)
                except TypeError:
                    continue  # an unhashable key: the base class reports it
                if earlier is not None:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {brief(key)} (first at line {earlier})",
                        key_node.start_mark,
                    )
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _yaml_error(exc: yaml.YAMLError, text: str, source: str) -> RecipeError:
    """`source: not valid YAML at line L, column C: problem` (PyYAML counts from 0)."""
    if isinstance(exc, yaml.reader.ReaderError):  # a control character; it has an offset only
        line = text[: exc.position].count("\n") + 1
        return RecipeError(
            f"{source}: not valid YAML at line {line}: character #x{exc.character:04x} is not "
            "allowed (control characters are not YAML text)"
        )
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        context = f" ({exc.context})" if exc.context else ""
        return RecipeError(
            f"{source}: not valid YAML at line {mark.line + 1}, column {mark.column + 1}: "
            f"{exc.problem}{context}"
        )
    return RecipeError(f"{source}: not valid YAML: {exc}")


def _read_recipe_bytes(path: Path) -> bytes:
    """The file's bytes, refused before reading when it is missing, not a file, or too large."""
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise RecipeError(f"recipe file not found: {path}") from None
    except (OSError, ValueError) as exc:  # too long a name, a NUL in it, no permission
        raise RecipeError(f"{path}: cannot read the recipe: {exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise RecipeError(f"recipe file not found: {path} is a directory")
    if not stat.S_ISREG(info.st_mode):
        raise RecipeError(f"recipe file not found: {path} is not a regular file")
    too_large = f"{path}: larger than {MAX_RECIPE_BYTES:,} bytes; a recipe is a few KB"
    if info.st_size > MAX_RECIPE_BYTES:
        raise RecipeError(too_large)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)  # bounded: the file may grow after stat
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe: {exc.strerror or exc}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(too_large)
    return raw


def _decode(raw: bytes, source: str) -> str:
    """UTF-8 text (a UTF-8 byte-order mark is dropped), else RecipeError `not UTF-8 text`."""
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        utf16 = raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
        hint = " (it is UTF-16: save it as UTF-8)" if utf16 else ""
        line = raw[: exc.start].count(b"\n") + 1
        raise RecipeError(
            f"{source}: not UTF-8 text{hint}: byte 0x{raw[exc.start]:02x} at line {line}"
        ) from None
    # UTF-16 without a byte-order mark decodes as "UTF-8" with a NUL after each ASCII letter.
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise RecipeError(f"{source}: not UTF-8 text: a NUL byte at line {line} (UTF-16?)")
    return text


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    text = _decode(_read_recipe_bytes(path), str(path))
    try:
        data = yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader: builds no objects
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, text, str(path)) from None
    except RecursionError:
        raise RecipeError(f"{path}: not valid YAML: nested too deeply") from None
    return parse_recipe(data, str(path))


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (what `recipe.lock.yaml` holds); round-trips."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
