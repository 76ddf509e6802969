"""Typed configuration of the weight-quantization stage."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

PER_CHANNEL = -1  # the one `group_size` vocabulary: -1 = one scale per output channel


class GPTQOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    damp_percent: float = Field(
        0.01, gt=0, le=1, description="dampening added to the Hessian, × its mean diagonal"
    )
    block_size: int = Field(128, gt=0, description="columns per lazy batch update")
    act_order: bool = Field(
        False,
        description="quantize columns by decreasing Hessian diagonal; groups stay static, so "
        "the stored layout needs no permutation",
    )


class QuantizeConfig(BaseModel):
    """Weight-only integer quantization of Linear layers.

    `group_size` uses one vocabulary for every bit width: -1 means one scale (and zero point)
    per output channel, a positive value means one per `group_size` consecutive input features.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["quantize"] = "quantize"
    method: Literal["rtn", "gptq"] = Field(
        "rtn", description="rtn = round to nearest; gptq = error-compensating, needs calibration"
    )
    bits: Literal[4, 8] = Field(..., description="bits per stored weight")
    group_size: int = Field(
        PER_CHANNEL, description="-1 = per output channel, else a positive group"
    )
    symmetric: bool = Field(True, description="False stores a zero point per group")
    observer: Literal["minmax", "mse"] = Field(
        "minmax",
        description="how each group's range is chosen: minmax = the weights' extremes; mse = "
        "shrunk (down to 0.8×) to the least quantization error, weighted by the Hessian "
        "diagonal under gptq",
    )
    include: list[str] | None = Field(
        None,
        description="glob patterns over module names to quantize; default: every Linear "
        "inside the decoder layers (embeddings and lm_head stay in the source dtype)",
    )
    exclude: list[str] = Field(default_factory=list, description="glob patterns to leave alone")
    gptq: GPTQOptions | None = Field(None, description="GPTQ settings (method gptq only)")

    @model_validator(mode="after")
    def _gptq_options_only_for_gptq(self) -> QuantizeConfig:
        if self.gptq is not None and self.method != "gptq":
            raise ValueError("`gptq` options are set but method is not gptq")
        return self

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq"

    @property
    def gptq_options(self) -> GPTQOptions:
        return self.gptq or GPTQOptions()

    @field_validator("group_size")
    @classmethod
    def _check_group_size(cls, group_size: int, info: ValidationInfo) -> int:
        # A field validator (not a model validator) so errors point at `...group_size`.
        if group_size != PER_CHANNEL and group_size <= 0:
            raise ValueError(f"must be -1 (per channel) or positive, got {group_size}")
        bits = info.data.get("bits")
        if bits is not None and group_size > 0 and (group_size * bits) % 32:
            raise ValueError(
                f"{group_size} does not fill whole int32 words at {bits} bits "
                f"(needs a multiple of {32 // bits})"
            )
        return group_size

    @property
    def scheme(self) -> str:
        """Short human name, e.g. `int4-g64-asym` or `int8-channel-sym`."""
        granularity = "channel" if self.group_size == PER_CHANNEL else f"g{self.group_size}"
        return f"int{self.bits}-{granularity}-{'sym' if self.symmetric else 'asym'}"
