"""Typed configuration of the distillation (recovery) stage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from compress.prune.config import LayerIndex
from compress.quant.config import Bits, check_group_size
from compress.schema import (
    CUDA_DEVICE,
    DEVICE_PATTERN,
    MAX_COUNT,
    MAX_STEPS,
    MAX_TOKENS,
    MAX_TRAIN_TOKENS,
    MAX_WIDTH,
    FieldError,
    Seed,
    StrictConfig,
    Text,
)

MAX_TEMPERATURE = 100.0  # softer than this is uniform noise: a typo (e.g. 20 for 2.0) at most


class HiddenMatching(StrictConfig):
    """Match student hidden states to the teacher's on chosen decoder layers."""

    layers: list[LayerIndex] = Field(
        ..., min_length=1, description="student decoder layers whose outputs are matched"
    )
    teacher_layers: list[LayerIndex] | None = Field(
        None,
        description="the teacher layer for each student layer (default: the same indices; "
        "give them when layers were removed)",
    )
    loss: Literal["mse", "cosine"] = "mse"
    weight: float = Field(
        1.0, gt=0, le=1000, description="added to the loss as weight × hidden loss"
    )

    @model_validator(mode="after")
    def _paired(self) -> HiddenMatching:
        if self.teacher_layers is not None and len(self.teacher_layers) != len(self.layers):
            raise FieldError(
                ("teacher_layers",),
                f"teacher_layers has {len(self.teacher_layers)} entries, layers has "
                f"{len(self.layers)}: one teacher layer per student layer",
            )
        return self


class SyntheticData(StrictConfig):
    """Train on text sampled from the teacher instead of the calibration text."""

    num_sequences: int = Field(64, gt=0, le=MAX_TOKENS)
    length: int = Field(
        256, gt=1, le=MAX_TOKENS, description="tokens per sequence, the start token included"
    )
    temperature: float = Field(1.0, gt=0, le=MAX_TEMPERATURE, description="sampling temperature")
    batch_size: int = Field(
        8, gt=0, le=MAX_COUNT, description="sequences sampled per generate call"
    )


class QATConfig(StrictConfig):
    """Quantization-aware training: the student's forward sees its weights fake-quantized
    (straight-through gradients) exactly as the recipe's next quantize stage will store them.
    The recipe checks that these settings equal that stage's."""

    bits: Bits
    group_size: int = Field(..., le=MAX_WIDTH)
    symmetric: bool = True
    observer: Literal["minmax", "mse"] = "minmax"

    @field_validator("group_size")
    @classmethod
    def _check_group_size(cls, group_size: int, info: ValidationInfo) -> int:
        # The quantize stage's own rule, so a mismatch is reported as the stage would.
        return check_group_size(group_size, info.data.get("bits"))


class DistillConfig(StrictConfig):
    """Recover a pruned (or to-be-quantized) student by distilling from the teacher: the model
    as it was before the recipe's stages."""

    type: Literal["distill"] = "distill"
    teacher: Text | None = Field(
        None,
        description="a model source (as in `model.source`) to distil from; default: the "
        "recipe's model as it was before the stages",
    )
    temperature: float = Field(
        2.0, gt=0, le=MAX_TEMPERATURE, description="softens both distributions; loss × T²"
    )
    alpha: float = Field(
        0.7, ge=0, le=1, description="weight of the KL term; 1 − alpha weighs next-token CE"
    )
    hidden: HiddenMatching | None = None
    synthetic: SyntheticData | None = Field(
        None, description="train on text sampled from the teacher (default: calibration text)"
    )
    steps: int | None = Field(
        None, gt=0, le=MAX_STEPS, description="optimizer steps (or set tokens)"
    )
    tokens: int | None = Field(
        None, gt=0, le=MAX_TRAIN_TOKENS, description="token budget; steps = tokens / batch"
    )
    batch_size: int = Field(4, gt=0, le=MAX_COUNT, description="sequences per micro-batch")
    grad_accumulation: int = Field(
        1, gt=0, le=MAX_COUNT, description="micro-batches per optimizer step"
    )
    # A learning rate above 1 or a decoupled weight decay above 10 diverges at once.
    lr: float = Field(5e-5, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=10)
    warmup_steps: int = Field(10, ge=0, le=MAX_STEPS)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay ends at lr × this")
    max_grad_norm: float | None = Field(
        1.0, gt=0, le=1e6, description="gradient clipping; null = off"
    )
    autocast: Literal["none", "bf16"] = Field(
        "none", description="bf16 autocast for the forward passes (weights stay float32)"
    )
    seed: Seed = 0
    device: str = Field(
        "auto",
        pattern=DEVICE_PATTERN,
        description="where the student trains (it returns to CPU memory afterwards); auto = "
        "cuda if available, else cpu. Under `accelerate launch` each process trains on the "
        "device the launcher gives it",
    )
    teacher_device: str | None = Field(
        None,
        pattern=rf"^(offload|cpu|{CUDA_DEVICE})$",
        description="where the teacher runs: null = the student's device; another device "
        "(e.g. cuda:1 for a large teacher); offload = weights in CPU memory, each layer moved "
        "to the student's device for its forward (slow, needs no room for a second model)",
    )
    checkpoint_every: int = Field(
        50,
        gt=0,
        le=MAX_STEPS,
        description="steps between resumable checkpoints (model, optimizer, data)",
    )
    qat: QATConfig | None = None

    @model_validator(mode="after")
    def _one_budget(self) -> DistillConfig:
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("set exactly one of steps, tokens (the training budget)")
        return self

    @property
    def needs_calibration(self) -> bool:
        return self.synthetic is None

    def total_steps(self, seq_len: int) -> int:
        if self.steps is not None:
            return self.steps
        per_step = self.batch_size * self.grad_accumulation * seq_len
        return max(1, -(-(self.tokens or 0) // per_step))
