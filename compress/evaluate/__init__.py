"""Evaluation: lm-eval runs, the release gate and its reports."""
