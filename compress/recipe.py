"""Recipes: YAML → typed, validated, versioned configuration.

Every model forbids unknown keys, so a typo is an error with its path
(`recipes/x.yaml: stages[0].group_sise: extra inputs are not permitted`), raised before
any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from compress.distill.config import DistillConfig
from compress.errors import RecipeError
from compress.prune.config import PruneConfig
from compress.quant.config import QuantizeConfig

RECIPE_VERSION = 1
ENV_EVAL_DATA_DIR = "COMPRESS_EVAL_DATA_DIR"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    source: str = Field(
        ...,
        description="Hub id (`org/name`), local directory, `.gguf` file, or a file inside an "
        "installed package as `package:<module>/<file>`",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit)")
    trust_remote_code: bool = Field(False, description="run code shipped with the model")


class CalibrationConfig(_Strict):
    path: str = Field(
        ...,
        description="UTF-8 text file, or `hf:<dataset>[:<config>]:<split>[:<column>]`",
    )
    num_samples: int = Field(128, gt=0, description="windows drawn from the text")
    seq_len: int = Field(512, gt=0, description="tokens per window")
    seed: int = Field(0, description="which windows are drawn")
    batch_size: int = Field(8, gt=0, description="windows per forward pass while calibrating")
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
        description="where each decoder layer runs while it is calibrated; the model stays "
        "where it was loaded (CPU memory) and one layer at a time is moved there, so the model "
        "need not fit on the GPU. auto = cuda if available, else cpu",
    )


class TaskConfig(_Strict):
    name: str = Field(..., description="lm-eval task or group name, e.g. `mmlu`, `gsm8k`")
    limit: int | None = Field(None, gt=0, description="items per (sub)task; None = all")
    num_fewshot: int | None = Field(None, ge=0, description="None = the task's default")
    metric: str | None = Field(None, description="metric to gate on; None = the task's primary")
    max_gen_toks: int | None = Field(
        None, gt=0, description="cap on generated tokens for generative tasks (keeps runs short)"
    )


class QualityConfig(_Strict):
    """Perplexity and KL divergence to the baseline on held-out text: cheap, sensitive signals."""

    path: str = Field(
        ..., description="held-out UTF-8 text file, or `hf:<dataset>[:<config>]:<split>[:<column>]`"
    )
    seq_len: int = Field(512, gt=0, description="tokens per window")
    max_windows: int = Field(8, gt=0, description="consecutive windows from the start")


class EvalConfig(_Strict):
    tasks: list[TaskConfig] = Field(..., min_length=1)
    quality: QualityConfig | None = Field(
        None, description="perplexity / KL divergence / top-1 agreement vs the baseline"
    )
    batch_size: int = Field(1, gt=0)
    seed: int = Field(1234, description="few-shot sampling seed")
    data_dir: str | None = Field(
        None,
        description="local copies of Hub datasets laid out as `<data_dir>/<org>/<name>`; "
        f"also settable with ${ENV_EVAL_DATA_DIR}; None = fetch from the Hub",
    )

    @model_validator(mode="after")
    def _unique_tasks(self) -> EvalConfig:
        names = [t.name for t in self.tasks]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"tasks listed twice: {duplicated}")
        return self


Rule = Literal["non_inferiority", "point"]
RULE_HELP = (
    "non_inferiority: ship only when the one-sided upper confidence bound of the drop is "
    "within the budget, reject when confident it exceeds it, else inconclusive; point: the "
    "estimate alone decides (ship or reject, never inconclusive). null = gate.rule"
)


class Budget(_Strict):
    max_drop: float = Field(
        ..., ge=0, description="largest allowed absolute drop of the metric (0.05 = 5 points)"
    )
    rule: Rule | None = Field(None, description=RULE_HELP)


class QualityBudget(_Strict):
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


class SequentialConfig(_Strict):
    """Score the artifact in batches and stop as soon as the verdict is decided."""

    looks: int = Field(4, ge=2, le=20, description="batches (looks at the data), the last = all")
    first: int = Field(
        200, ge=2, description="paired items of each task at the first look (then even steps)"
    )
    seed: int = Field(0, description="which items come first (a seeded shuffle)")


class GateConfig(_Strict):
    rule: Rule = Field("non_inferiority", description="default rule of every budget")
    confidence: float = Field(
        0.95, gt=0.5, lt=1, description="one-sided confidence of every decision (1 − alpha)"
    )
    power: float = Field(
        0.8, gt=0.5, lt=1, description="planning: chance that the planned items decide"
    )
    budgets: dict[str, Budget] = Field(default_factory=dict, description="task name → budget")
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


class OutputConfig(_Strict):
    dir: str = Field("runs", description="root of work/, release/, rejected/ and cache/")


# Every stage config type, each with a `type: Literal[...]` tag that selects it.
STAGE_CONFIG_TYPES: tuple[type[BaseModel], ...] = (PruneConfig, DistillConfig, QuantizeConfig)
STAGE_TAGS = frozenset(t.model_fields["type"].default for t in STAGE_CONFIG_TYPES)
StageConfig = Annotated[PruneConfig | DistillConfig | QuantizeConfig, Field(discriminator="type")]


class Recipe(_Strict):
    version: Literal[1] = Field(..., description="recipe schema version")
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: ModelConfig
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    calibration: CalibrationConfig | None = None
    stages: list[StageConfig] = Field(..., min_length=1)
    eval: EvalConfig
    gate: GateConfig
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _calibration_when_needed(self) -> Recipe:
        needing = [
            f"stages[{i}] ({stage.type})"
            for i, stage in enumerate(self.stages)
            if stage.needs_calibration
        ]
        if needing and self.calibration is None:
            raise ValueError(
                f"{', '.join(needing)} need a `calibration` section (gptq, data-driven pruning "
                "scores and layer scores run on calibration text)"
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
                raise ValueError(
                    f"stages{late} {verb} after a quantize stage (stages[{quantized_at}]): "
                    f"{verb} works on dense weights, so {verb} first, then quantize (for "
                    "training that sees the quantization, set the distill stage's `qat`)"
                )
        return self

    @model_validator(mode="after")
    def _qat_matches_the_next_quantize_stage(self) -> Recipe:
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, DistillConfig) or stage.qat is None:
                continue
            following = [s for s in self.stages[i + 1 :] if isinstance(s, QuantizeConfig)]
            if not following:
                raise ValueError(f"stages[{i}].qat: no quantize stage follows to match")
            quantize = following[0]
            differing = [
                f"{name} {getattr(stage.qat, name)!r} vs {getattr(quantize, name)!r}"
                for name in ("bits", "group_size", "symmetric", "observer")
                if getattr(stage.qat, name) != getattr(quantize, name)
            ]
            if quantize.include is not None or quantize.exclude:
                differing.append("include/exclude (QAT covers the default layer selection)")
            if differing:
                raise ValueError(
                    f"stages[{i}].qat must fake-quantize exactly as the next quantize stage "
                    f"stores; differs in: {'; '.join(differing)}"
                )
        return self

    @model_validator(mode="after")
    def _budgets_name_tasks(self) -> Recipe:
        task_names = {t.name for t in self.eval.tasks}
        unknown = sorted(set(self.gate.budgets) - task_names)
        if unknown:
            raise ValueError(
                f"gate.budgets names tasks that eval.tasks does not run: {unknown} "
                f"(eval.tasks: {sorted(task_names)})"
            )
        return self

    @model_validator(mode="after")
    def _quality_budget_needs_quality_eval(self) -> Recipe:
        if self.gate.quality is not None and self.eval.quality is None:
            raise ValueError(
                "gate.quality needs eval.quality (the held-out text its signals are measured on)"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON form: what `--resume` checks against."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def format_location(loc: tuple[int | str, ...], stages_tags: frozenset[str]) -> str:
    """`('stages', 0, 'quantize', 'group_size')` → `stages[0].group_size`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in stages_tags and out.endswith("]"):
            continue  # the discriminator tag pydantic inserts into union paths
        else:
            out += f".{part}" if out else str(part)
    return out or "<recipe>"


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid recipe"]
    for err in exc.errors():
        lines.append(f"  {format_location(tuple(err['loc']), STAGE_TAGS)}: {err['msg']}")
    return "\n".join(lines)


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    """Validate an already-parsed YAML/JSON document; errors name `source` and the field path."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_format_validation_error(exc, source)) from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    return parse_recipe(data, str(path))


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (what `recipe.lock.yaml` holds); round-trips."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
