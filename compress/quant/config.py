"""Typed configuration of the weight-quantization stage."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from compress.schema import MAX_COUNT, MAX_WIDTH, ExactInt, FieldError, StrictConfig, Text

PER_CHANNEL = -1  # the one `group_size` vocabulary: -1 = one scale per output channel
Bits = Annotated[Literal[4, 8], ExactInt]


def check_group_size(group_size: int, bits: int | None) -> int:
    """-1, or a positive group that fills whole int32 words at `bits` (None: bits invalid)."""
    if group_size != PER_CHANNEL and group_size <= 0:
        raise ValueError(f"must be -1 (per channel) or positive, got {group_size}")
    if bits is not None and group_size > 0 and (group_size * bits) % 32:
        raise ValueError(
            f"{group_size} does not fill whole int32 words at {bits} bits "
            f"(needs a multiple of {32 // bits})"
        )
    return group_size


class GPTQOptions(StrictConfig):
    damp_percent: float = Field(
        0.01, gt=0, le=1, description="dampening added to the Hessian, × its mean diagonal"
    )
    block_size: int = Field(128, gt=0, le=MAX_COUNT, description="columns per lazy batch update")
    act_order: bool = Field(
        False,
        description="quantize columns by decreasing Hessian diagonal; groups stay static, so "
        "the stored layout needs no permutation",
    )
    expert_min_tokens_per_feature: float = Field(
        2.0,
        ge=0,
        le=MAX_COUNT,
        description="MoE experts: a matrix is GPTQ-calibrated only where its expert was routed "
        "at least this many calibration tokens per input feature (2 → 2·hidden tokens for "
        "gate/up); below, its Hessian is singular or too noisy and it is rounded to nearest",
    )


def scheme_name(bits: int, group_size: int, symmetric: bool) -> str:
    """Short human name, e.g. `int4-g64-asym` or `int8-channel-sym`."""
    granularity = "channel" if group_size == PER_CHANNEL else f"g{group_size}"
    return f"int{bits}-{granularity}-{'sym' if symmetric else 'asym'}"


class Scheme(StrictConfig):
    """How weights are stored: bits, group size and symmetry (a stage's own, or an override's).

    `group_size` uses one vocabulary for every bit width: -1 means one scale (and zero point)
    per output channel, a positive value means one per `group_size` consecutive input features.
    """

    bits: Bits = Field(..., description="bits per stored weight")
    group_size: int = Field(
        PER_CHANNEL, le=MAX_WIDTH, description="-1 = per output channel, else a positive group"
    )
    symmetric: bool = Field(True, description="False stores a zero point per group")

    @field_validator("group_size")
    @classmethod
    def _check_group_size(cls, group_size: int, info: ValidationInfo) -> int:
        # A field validator (not a model validator) so errors point at `...group_size`.
        return check_group_size(group_size, info.data.get("bits"))

    @property
    def scheme(self) -> str:
        """Short human name, e.g. `int4-g64-asym`."""
        return scheme_name(self.bits, self.group_size, self.symmetric)


class LayerScheme(Scheme):
    """Another scheme for the layers `match` names: a mixed-precision artifact (what
    `compress search` writes) holds several, each stored as its own compressed-tensors group."""

    match: list[Text] = Field(
        ...,
        min_length=1,
        description="glob patterns over the names of layers the stage selects (an experts "
        "module as a whole); a layer two entries match is refused",
    )


class QuantizeConfig(Scheme):
    """Weight-only integer quantization of Linear layers and MoE experts.

    `group_size` uses one vocabulary for every bit width: -1 means one scale (and zero point)
    per output channel, a positive value means one per `group_size` consecutive input features.
    """

    type: Literal["quantize"] = "quantize"
    method: Literal["rtn", "gptq"] = Field(
        "rtn", description="rtn = round to nearest; gptq = error-compensating, needs calibration"
    )
    observer: Literal["minmax", "mse"] = Field(
        "minmax",
        description="how each group's range is chosen: minmax = the weights' extremes; mse = "
        "shrunk (down to 0.8×) to the least quantization error, weighted by the Hessian "
        "diagonal under gptq",
    )
    gguf_exact: bool = Field(
        False,
        description="round each scale up to 7 significant bits (and at least 2^-18) so that s "
        "and s·z are exact in fp16: the GGUF export (Q4_0 / Q4_1 / Q8_0 keep d and m in fp16) "
        "then carries every weight bit-exact instead of within fp16 rounding",
    )
    include: list[Text] | None = Field(
        None,
        min_length=1,
        description="glob patterns over module names to quantize; default: every Linear and "
        "every MoE experts module inside the decoder layers (embeddings, lm_head and MoE "
        "routers stay in the source dtype)",
    )
    exclude: list[Text] = Field(default_factory=list, description="glob patterns to leave alone")
    overrides: list[LayerScheme] = Field(
        default_factory=list,
        max_length=MAX_COUNT,
        description="per-layer schemes in place of the stage's bits / group_size / symmetric "
        "(mixed precision); layers no entry matches take the stage's own",
    )
    gptq: GPTQOptions | None = Field(None, description="GPTQ settings (method gptq only)")

    @model_validator(mode="after")
    def _gptq_options_only_for_gptq(self) -> QuantizeConfig:
        if self.gptq is not None and self.method != "gptq":
            raise FieldError(("gptq",), "`gptq` options are set but method is not gptq")
        return self

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq"

    @property
    def gptq_options(self) -> GPTQOptions:
        return self.gptq or GPTQOptions()
