"""Imports every stage module so that each registers its handler (see `compress.registry`)."""

from compress.prune import stage as prune_stage
from compress.quant import stage as quantize_stage

__all__ = ["prune_stage", "quantize_stage"]
