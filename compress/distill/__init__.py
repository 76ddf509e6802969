"""Distillation recovery: losses, QAT fake quantization, the training loop, the stage."""
