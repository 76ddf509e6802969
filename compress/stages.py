"""Imports every stage module so that each registers its handler (see `compress.registry`)."""

from compress.distill import stage as distill_stage
from compress.prune import stage as prune_stage
from compress.quant import stage as quantize_stage

__all__ = ["distill_stage", "prune_stage", "quantize_stage"]
