"""The distillation training loop: teacher → student, resumable bit for bit.

Determinism is by construction: the sequence order of every epoch is a permutation drawn from
the config's seed and the epoch number, so the batch of any step is known without replaying
earlier ones; a checkpoint holds the student, the optimizer, the scheduler position, the loss
curve and the torch RNG state. Resuming from the checkpoint at step k and training to the end
gives the same weights as an uninterrupted run (tested on CPU).

Checkpoints are written into a staging directory that replaces the previous one atomically, so
a kill -9 leaves either the previous checkpoint or the new one. Tensors go to safetensors; the
optimizer state (tensors, numbers, lists) is read back with `torch.load(weights_only=True)`,
which refuses arbitrary pickled objects.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from tqdm.auto import tqdm

from compress.distill.config import DistillConfig
from compress.distill.losses import distillation_loss, hidden_loss, kd_loss, next_token_loss
from compress.distill.parallel import DataParallel
from compress.fileio import staging_dir
from compress.models import decoder_layers_prefix

log = logging.getLogger(__name__)

STUDENT = "student.safetensors"
EXTRA = "extra.safetensors"  # hidden-state projections + RNG state
OPTIMIZER = "optimizer.pt"
TRAINER = "trainer.json"


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    curve: list[dict[str, float]] = field(default_factory=list)  # per step: step, loss, kd, ...
    resumed_from: int | None = None


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_rows(step: int, micro: int, config: DistillConfig, num_sequences: int) -> list[int]:
    """Which sequences micro-batch `micro` of optimizer step `step` uses (seeded, no replay)."""
    start = (step * config.grad_accumulation + micro) * config.batch_size
    rows = []
    for position in range(start, start + config.batch_size):
        epoch, offset = divmod(position, num_sequences)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        rows.append(int(torch.randperm(num_sequences, generator=generator)[offset]))
    return rows


class _LayerOutputs:
    """Forward hooks that keep the outputs of chosen decoder layers, (B, T, H) each."""

    def __init__(self, model: nn.Module, indices: list[int]) -> None:
        layers = model.get_submodule(decoder_layers_prefix(model))
        self.outputs: dict[int, torch.Tensor] = {}
        self.handles = [layers[i].register_forward_hook(self._hook(i)) for i in indices]

    def _hook(self, index: int):
        def hook(_m: nn.Module, _args: tuple, output: object) -> None:
            self.outputs[index] = output[0] if isinstance(output, tuple) else output

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _autocast(config: DistillConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if config.autocast == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _save_checkpoint(
    directory: Path,
    student: nn.Module,
    projections: nn.ModuleDict,
    optimizer: torch.optim.Optimizer,
    state: dict,
) -> None:
    with staging_dir(directory) as tmp:
        save_model(student, str(tmp / STUDENT))  # handles tied embeddings
        extra = {
            f"projection.{k}": v.detach().contiguous() for k, v in projections.state_dict().items()
        }
        extra["rng"] = torch.get_rng_state()
        save_file(extra, tmp / EXTRA)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        (tmp / TRAINER).write_text(json.dumps(state), encoding="utf-8")


def _load_checkpoint(
    directory: Path,
    student: nn.Module,
    projections: nn.ModuleDict,
    optimizer: torch.optim.Optimizer,
) -> dict:
    missing, unexpected = load_model(student, str(directory / STUDENT))
    if missing or unexpected:
        raise RuntimeError(
            f"{directory / STUDENT}: does not fit the student (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); delete the directory to start over"
        )
    extra = load_file(directory / EXTRA)
    projections.load_state_dict(
        {k.removeprefix("projection."): v for k, v in extra.items() if k.startswith("projection.")}
    )
    torch.set_rng_state(extra["rng"])
    optimizer.load_state_dict(torch.load(directory / OPTIMIZER, weights_only=True))
    return json.loads((directory / TRAINER).read_text(encoding="utf-8"))


def _projections(student: nn.Module, teacher: nn.Module, config: DistillConfig) -> nn.ModuleDict:
    """A learned projection per matched layer where the widths differ (none where equal)."""
    projections = nn.ModuleDict()
    if config.hidden is None:
        return projections
    s_width, t_width = student.config.hidden_size, teacher.config.hidden_size
    if s_width != t_width:
        for index in config.hidden.layers:
            projections[str(index)] = nn.Linear(s_width, t_width, bias=False)
    return projections


@dataclass
class _Setup:
    """Everything one training step reads."""

    student: nn.Module
    teacher: nn.Module
    sequences: torch.Tensor  # (N, T) token ids
    config: DistillConfig
    projections: nn.ModuleDict
    device: torch.device  # the student's
    teacher_device: torch.device  # where the teacher's inputs go (its execution device)
    parallel: DataParallel | None = None
    student_taps: _LayerOutputs | None = None
    teacher_taps: _LayerOutputs | None = None

    def hidden_term(self) -> torch.Tensor | None:
        hidden = self.config.hidden
        if hidden is None or self.student_taps is None or self.teacher_taps is None:
            return None
        terms = []
        for s_index, t_index in zip(
            hidden.layers, hidden.teacher_layers or hidden.layers, strict=True
        ):
            student_out = self.student_taps.outputs[s_index]
            if str(s_index) in self.projections:
                student_out = self.projections[str(s_index)](student_out)
            teacher_out = self.teacher_taps.outputs[t_index].detach().to(self.device)
            terms.append(hidden_loss(student_out, teacher_out, hidden.loss))
        return torch.stack(terms).mean()

    def accumulate_gradients(self, step: int) -> dict[str, float]:
        """Forward/backward over the step's micro-batches; returns the mean loss parts."""
        config = self.config
        sums: dict[str, float] = {}
        for micro in range(config.grad_accumulation):
            rows = batch_rows(step, micro, config, self.sequences.shape[0])
            if self.parallel is not None:
                rows = self.parallel.shard(rows)  # (B / world_size) rows on this rank
            batch = self.sequences[rows].to(self.device)  # (B, T)
            with torch.no_grad(), _autocast(config, self.teacher_device):
                teacher_batch = batch.to(self.teacher_device)
                teacher_logits = self.teacher(input_ids=teacher_batch, use_cache=False).logits
                teacher_logits = teacher_logits.to(self.device)
            with _autocast(config, self.device):
                student_logits = self.student(input_ids=batch, use_cache=False).logits
            kd = kd_loss(student_logits, teacher_logits, config.temperature)
            task = next_token_loss(student_logits, batch)
            hidden = self.hidden_term()
            weight = config.hidden.weight if config.hidden else 0.0
            loss = distillation_loss(kd, task, config.alpha, hidden, weight)
            (loss / config.grad_accumulation).backward()
            for name, value in (("loss", loss), ("kd", kd), ("task", task), ("hidden", hidden)):
                if value is not None:
                    part = float(value.detach()) / config.grad_accumulation
                    sums[name] = sums.get(name, 0.0) + part
        return sums


def _setup(
    student: nn.Module,
    teacher: nn.Module,
    sequences: torch.Tensor,
    config: DistillConfig,
    teacher_device: torch.device | None,
    parallel: DataParallel | None,
) -> _Setup:
    device = next(student.parameters()).device
    setup = _Setup(
        student,
        teacher,
        sequences,
        config,
        _projections(student, teacher, config).to(device),
        device,
        device if teacher_device is None else teacher_device,
        parallel,
    )
    if config.hidden is not None:
        setup.student_taps = _LayerOutputs(student, config.hidden.layers)
        setup.teacher_taps = _LayerOutputs(
            teacher, config.hidden.teacher_layers or config.hidden.layers
        )
    return setup


def train(
    student: nn.Module,
    teacher: nn.Module,
    sequences: torch.Tensor,
    config: DistillConfig,
    *,
    checkpoint_dir: Path | None = None,
    teacher_device: torch.device | None = None,
    parallel: DataParallel | None = None,
) -> TrainResult:
    """Distill `teacher` into `student` (in place) on `sequences` (N, T) of token ids.

    `teacher_device`: where the teacher's inputs go (default: the student's device).
    `parallel`: this process's share of a data-parallel run; only rank 0 writes checkpoints,
    every rank reads them on resume."""
    seq_len = sequences.shape[1]
    total = config.total_steps(seq_len)
    torch.manual_seed(config.seed)
    setup = _setup(student, teacher, sequences, config, teacher_device, parallel)
    writes_checkpoints = checkpoint_dir is not None and (parallel is None or parallel.is_main)
    params = [
        p for p in [*student.parameters(), *setup.projections.parameters()] if p.requires_grad
    ]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    start_step, curve, resumed_from = 0, [], None
    if checkpoint_dir is not None and (checkpoint_dir / TRAINER).is_file():
        state = _load_checkpoint(checkpoint_dir, student, setup.projections, optimizer)
        start_step, curve, resumed_from = state["step"], state["curve"], state["step"]
        log.info("distill: resuming at step %d of %d from %s", start_step, total, checkpoint_dir)
    # Built after the optimizer state is restored: with last_epoch it starts at `start_step`.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, config.warmup_steps, total, config.min_lr_ratio),
        last_epoch=start_step - 1,
    )

    teacher.eval()
    student.train()
    tokens_per_step = config.batch_size * config.grad_accumulation * seq_len
    started = time.perf_counter()
    progress = tqdm(
        range(start_step, total),
        desc="distill",
        unit="step",
        initial=start_step,
        total=total,
        disable=parallel is not None and not parallel.is_main,
    )
    try:
        for step in progress:
            parts = setup.accumulate_gradients(step)
            if parallel is not None:
                parallel.average_gradients(params)
                parts = parallel.average_floats(parts)
            if config.max_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                parts["grad_norm"] = float(norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            parts["lr"] = scheduler.get_last_lr()[0]
            curve.append({"step": step + 1, **parts})
            elapsed = time.perf_counter() - started
            rate = (step + 1 - start_step) * tokens_per_step / max(elapsed, 1e-9)
            progress.set_postfix(loss=f"{parts['loss']:.4f}", tok_s=f"{rate:.0f}")
            done = step + 1
            if writes_checkpoints and done % config.checkpoint_every == 0 and done < total:
                assert checkpoint_dir is not None
                state = {"step": done, "curve": curve}
                _save_checkpoint(checkpoint_dir, student, setup.projections, optimizer, state)
    finally:
        for taps in (setup.student_taps, setup.teacher_taps):
            if taps is not None:
                taps.remove()
        student.eval()
    return TrainResult(
        steps=total,
        tokens=(total - start_step) * tokens_per_step,
        seconds=time.perf_counter() - started,
        curve=curve,
        resumed_from=resumed_from,
    )
