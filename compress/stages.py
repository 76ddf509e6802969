"""Imports every stage module so that each registers its handler (see `compress.registry`)."""

from compress.quant import stage as quantize_stage

__all__ = ["quantize_stage"]
