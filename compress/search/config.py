"""Typed configuration of `compress search` (the recipe's `search` section)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from compress.schema import MAX_COUNT, MAX_TOKENS, StrictConfig, Text
from compress.search.candidates import DEFAULT_FORMATS, Format


class RayOptions(StrictConfig):
    address: Text | None = Field(
        None,
        description="an existing Ray cluster (`ray://host:10001`, `auto`); None starts a local "
        "Ray on this machine",
    )
    num_cpus: int | None = Field(
        None, gt=0, le=MAX_COUNT, description="CPUs of the local Ray (None: all of them)"
    )
    cpus_per_task: float = Field(
        1.0, gt=0, le=MAX_COUNT, description="CPUs each task reserves (its torch threads)"
    )


class SearchConfig(StrictConfig):
    """The smallest artifact that passes the gate: per-layer formats chosen from measured
    sensitivity, each candidate built with the recipe's quantize stage and judged by the gate's
    quality budgets on held-out windows the final gate never sees."""

    formats: list[Text] = Field(
        default_factory=lambda: [f.name for f in DEFAULT_FORMATS],
        min_length=2,
        description="what each layer may take: `int<4|8>-g<group>-<sym|asym>`, "
        "`int<4|8>-channel-<sym|asym>` or `keep` (16-bit); a layer whose shape a format does "
        "not fit is offered the others",
    )
    head: bool = Field(
        True,
        description="the output layer is a candidate too (with tied embeddings, the one table "
        "both ends use; rounded to nearest by a stage of its own, as GPTQ calibrates decoder "
        "layers only); its size counts once, as a runtime that stores the table once holds it",
    )
    sensitivity: Literal["anchored", "measured"] = Field(
        "anchored",
        description="anchored: one measured format per layer group, the others scaled by the "
        "Hessian proxy within the group (one forward pass per group); measured: every format "
        "measured (one pass per group and format)",
    )
    sensitivity_dtype: Literal["float32", "model"] = Field(
        "float32",
        description="dtype sensitivity is measured in: float32 (per-group KLs add up; bf16 "
        "rounding noise does not), or the recipe's dtype (no float32 copy of the model)",
    )
    sensitivity_samples: int = Field(
        4, gt=0, le=MAX_COUNT, description="calibration windows sensitivity is measured on"
    )
    sensitivity_seq_len: int = Field(
        256, gt=1, le=MAX_TOKENS, description="tokens per sensitivity window"
    )
    windows: int = Field(
        8,
        ge=2,
        le=MAX_COUNT,
        description="held-out windows (eval.quality's text and seq_len) that judge candidates: "
        "the ones after the gate's own, so the final gate judges on windows the search never "
        "looked at",
    )
    max_candidates: int = Field(
        6, gt=0, le=MAX_COUNT, description="candidates built and judged, at most"
    )
    resolution: int = Field(
        4096,
        gt=0,
        le=1 << 30,
        description="bytes per bucket of the Pareto front (exact at 1; coarser is faster)",
    )
    executor: Literal["local", "ray"] = Field(
        "local",
        description="where sensitivity chunks and candidates run: local = one after another in "
        "this process; ray = as Ray tasks, each reloading the model from its source (every path "
        "in the recipe must be readable where the tasks run)",
    )
    ray: RayOptions = Field(default_factory=RayOptions, description="executor: ray settings")

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, names: list[str]) -> list[str]:
        parsed = [Format.parse(name) for name in names]  # ValueError names the bad one
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"formats listed twice: {duplicated}")
        if all(f.bits == 16 for f in parsed):
            raise ValueError("at least one integer format is needed")
        return names

    @property
    def parsed_formats(self) -> tuple[Format, ...]:
        return tuple(Format.parse(name) for name in self.formats)
