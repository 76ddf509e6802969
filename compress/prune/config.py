"""Typed configuration of the structured-pruning stage.

Targets are uniform: every kept decoder layer ends with the same number of query heads, KV
heads and FFN channels, so the pruned model is described by a standard `config.json` and stock
transformers loads it. Each target is given either as what to `keep` or as the `ratio` (share)
to remove; exactly one of the two.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, model_validator

from compress.schema import MAX_COUNT, MAX_WIDTH, ExactInt, FieldError, StrictConfig

# A decoder layer index (0-based); the model's own layer count is checked at preflight.
LayerIndex = Annotated[int, Field(ge=0, lt=MAX_COUNT)]


def _exactly_one(model: BaseModel, *fields: str) -> None:
    given = [f for f in fields if getattr(model, f) is not None]
    if len(given) != 1:
        raise ValueError(f"set exactly one of {', '.join(fields)} (got {given or 'none'})")


class HeadTarget(StrictConfig):
    """Attention heads to keep, GQA-aware."""

    unit: Literal["query", "kv_group"] = Field(
        "query",
        description="query = remove query heads, the same number from every KV group, so the "
        "model stays a valid GQA model; kv_group = remove whole KV groups (a KV head with all "
        "its query heads). For MHA models (one query head per KV head) use kv_group: it "
        "prunes a head's q, k, v and o together",
    )
    keep: int | None = Field(
        None,
        gt=0,
        le=MAX_COUNT,
        description="unit query: query heads kept per layer (a multiple of "
        "num_key_value_heads); unit kv_group: KV groups kept per layer",
    )
    ratio: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="share removed: of each KV group's query heads (unit query) or of the KV "
        "groups (unit kv_group); rounded to the nearest whole head",
    )

    @model_validator(mode="after")
    def _one_target(self) -> HeadTarget:
        _exactly_one(self, "keep", "ratio")
        return self


class FFNTarget(StrictConfig):
    """FFN (MLP) channels to keep: gate/up rows and down columns together."""

    keep: int | None = Field(None, gt=0, le=MAX_WIDTH, description="channels kept per layer")
    ratio: float | None = Field(
        None, ge=0, lt=1, description="share of channels removed (0.25 = a quarter)"
    )
    multiple_of: int = Field(
        1,
        gt=0,
        le=MAX_COUNT,
        description="kept channels are a multiple of this (e.g. 64) so shapes stay kernel- "
        "and group-size-friendly; a ratio is rounded to the nearest multiple",
    )

    @model_validator(mode="after")
    def _one_target(self) -> FFNTarget:
        _exactly_one(self, "keep", "ratio")
        if self.keep is not None and self.keep % self.multiple_of:
            raise FieldError(
                ("keep",), f"keep {self.keep} is not a multiple of multiple_of {self.multiple_of}"
            )
        return self


class LayerTarget(StrictConfig):
    """Whole decoder layers to remove (depth pruning)."""

    remove: int | None = Field(
        None,
        gt=0,
        lt=MAX_COUNT,
        description="how many layers to remove, those with the lowest score first",
    )
    indices: list[LayerIndex] | None = Field(
        None, min_length=1, description="exactly which layers to remove (0-based)"
    )
    criterion: Literal["cosine"] = Field(
        "cosine",
        description="layer score for `remove`: cosine = mean over calibration tokens of 1 − "
        "cos(layer input, layer output); a layer that barely turns the hidden state goes first",
    )

    @model_validator(mode="after")
    def _one_target(self) -> LayerTarget:
        _exactly_one(self, "remove", "indices")
        if self.indices is not None and len(set(self.indices)) != len(self.indices):
            raise FieldError(("indices",), f"indices listed twice: {self.indices}")
        return self


class PruneConfig(StrictConfig):
    """Structured pruning of attention heads, FFN channels and decoder layers."""

    type: Literal["prune"] = "prune"
    criterion: Literal["magnitude", "activation", "taylor"] = Field(
        "activation",
        description="importance of heads and channels: magnitude = norm of their weights; "
        "activation = size of their contribution to the residual stream on the calibration "
        "tokens (activations × output weights, Wanda-like); taylor = |Σ gradient × weight| of "
        "the calibration loss (first-order estimate of the loss change)",
    )
    norm: Annotated[Literal[1, 2], ExactInt] = Field(
        2, description="weight norm of the magnitude criterion (L1 or L2)"
    )
    heads: HeadTarget | None = None
    ffn: FFNTarget | None = None
    layers: LayerTarget | None = None

    @model_validator(mode="after")
    def _some_target(self) -> PruneConfig:
        if self.heads is None and self.ffn is None and self.layers is None:
            raise ValueError("set at least one target: heads, ffn or layers")
        return self

    @property
    def needs_calibration(self) -> bool:
        width_by_data = self.criterion != "magnitude" and (
            self.heads is not None or self.ffn is not None
        )
        depth_by_score = self.layers is not None and self.layers.remove is not None
        return width_by_data or depth_by_score
