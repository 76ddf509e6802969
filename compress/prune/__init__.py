"""Structured pruning: targets (config), plan (shapes), scores, statistics, slicing, stage."""
