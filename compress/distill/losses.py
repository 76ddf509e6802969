"""Distillation losses: pure functions of logits and hidden states.

Shapes: logits (B, T, V), hidden states (B, T, H), labels (B, T). Every loss is a mean over the
positions that count (`mask`, (B, T), True = counts), so batches of different sizes and
padding weigh tokens equally.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (B, T) `values` over `mask`."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """T² · KL(softmax(teacher / T) ‖ softmax(student / T)) per position, averaged.

    The T² factor keeps the gradient's size independent of T (Hinton et al. 2015), so the
    mixing weight with the task loss means the same at every temperature. Computed in float32.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ (a different vocabulary?)"
        )
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)  # (B, T)
    return temperature**2 * _masked_mean(kl, mask)


def next_token_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of predicting token t+1 from position t."""
    shifted = logits[:, :-1].float()  # (B, T-1, V)
    targets = input_ids[:, 1:]  # (B, T-1)
    losses = F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return _masked_mean(losses.view_as(targets), None if mask is None else mask[:, 1:])


def hidden_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: Literal["mse", "cosine"],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Match a (projected) student hidden state to the teacher's: MSE or 1 − cosine."""
    if student.shape != teacher.shape:
        raise ValueError(f"hidden states {tuple(student.shape)} vs {tuple(teacher.shape)}")
    if kind == "mse":
        per_position = (student.float() - teacher.float()).pow(2).mean(-1)
    else:
        per_position = 1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)
    return _masked_mean(per_position, mask)


def distillation_loss(
    kd: torch.Tensor,
    task: torch.Tensor,
    alpha: float,
    hidden: torch.Tensor | None = None,
    hidden_weight: float = 0.0,
) -> torch.Tensor:
    """α · KD + (1 − α) · task (+ hidden_weight · hidden)."""
    total = alpha * kd + (1 - alpha) * task
    if hidden is not None:
        total = total + hidden_weight * hidden
    return total
