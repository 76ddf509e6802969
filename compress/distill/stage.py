"""The `distill` stage: recover the student (the model as earlier stages left it) by
distilling from the teacher (the model as it was before the recipe's stages).

The student trains in float32 (AdamW updates vanish in bfloat16 weights) and returns to the
recipe dtype afterwards. With `qat`, the Linears the next quantize stage will quantize see
their weights fake-quantized during training (`compress.distill.fake_quant`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from compress.calibration import calibration_device
from compress.distill.config import DistillConfig, SyntheticData
from compress.distill.fake_quant import add_fake_quantization, remove_fake_quantization
from compress.distill.parallel import (
    DISTILL,
    DataParallel,
    check_batch_size,
    world_size_from_environment,
)
from compress.distill.trainer import TrainResult, train
from compress.errors import PreflightError
from compress.models import DTYPES, decoder_layers_prefix
from compress.quant.config import QuantizeConfig
from compress.quant.plan import preflight as quantize_preflight
from compress.quant.plan import range_search_of, select_layers, select_targets, spec_of
from compress.registry import StageContext, StageResult, register_stage

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic.safetensors"  # the teacher's samples, in the stage's work directory


def _num_layers(model: nn.Module) -> int:
    return len(model.get_submodule(decoder_layers_prefix(model)))


def _qat_as_quantize(config: DistillConfig) -> QuantizeConfig:
    assert config.qat is not None
    return QuantizeConfig(
        bits=config.qat.bits,
        group_size=config.qat.group_size,
        symmetric=config.qat.symmetric,
        observer=config.qat.observer,
    )


def _refuse_qat_over_experts(model: nn.Module, config: DistillConfig) -> None:
    """QAT fake-quantizes Linear layers; MoE experts (3-D parameters) would train unaware of the
    quantization the next stage applies to them, so say so rather than train half the model."""
    experts = sorted(select_targets(model, _qat_as_quantize(config)).experts)
    if experts:
        more = f" and {len(experts) - 3} more" if len(experts) > 3 else ""
        shown = ", ".join(experts[:3]) + more
        raise PreflightError(
            f"QAT fake-quantizes Linear layers only, and this model's experts ({shown}) would "
            "train without it; distill without `qat` (the quantize stage still quantizes them)",
            field="qat",
        )


def preflight(model: nn.Module, config: DistillConfig) -> None:
    """Student-side checks, against the model as the earlier stages will leave it."""
    if config.hidden is not None:
        count = _num_layers(model)
        missing = [i for i in config.hidden.layers if not 0 <= i < count]
        if missing:
            raise PreflightError(
                f"hidden.layers {missing}: the student has {count} decoder layers (0..{count - 1})"
            )
    if config.qat is not None:
        try:
            quantize_preflight(model, _qat_as_quantize(config))  # group sizes fit every layer
        except PreflightError as exc:
            field = f"qat.{exc.field}" if exc.field else "qat"
            raise PreflightError(str(exc), field=field) from None
        _refuse_qat_over_experts(model, config)
    check_batch_size(config.batch_size, world_size_from_environment())
    if world_size_from_environment() == 1:  # under a launcher, each process has its device
        calibration_device(config.device, field="device")
        if config.teacher_device not in (None, "offload"):
            calibration_device(config.teacher_device, field="teacher_device")


def check_teacher(student: nn.Module, teacher: nn.Module, config: DistillConfig) -> None:
    """Teacher-side checks, before any training step."""
    s_vocab = student.get_output_embeddings().out_features
    t_vocab = teacher.get_output_embeddings().out_features
    if s_vocab != t_vocab:
        raise PreflightError(
            f"teacher vocabulary ({t_vocab} tokens) differs from the student's ({s_vocab}): "
            "logit distillation needs the same tokenizer"
        )
    if config.hidden is not None:
        count = _num_layers(teacher)
        teacher_layers = config.hidden.teacher_layers or config.hidden.layers
        missing = [i for i in teacher_layers if not 0 <= i < count]
        if missing:
            raise PreflightError(
                f"hidden.teacher_layers {missing}: the teacher has {count} decoder layers "
                f"(0..{count - 1}); after removing layers, name the teacher layer of each "
                "matched student layer"
            )


def synthetic_sequences(teacher: nn.Module, data: SyntheticData, seed: int) -> torch.Tensor:
    """(num_sequences, length) token ids sampled from the teacher, each from its BOS token.

    Seeded (the global RNG is restored afterwards), so a resumed run samples the same text."""
    start = teacher.config.bos_token_id
    if start is None:
        raise PreflightError("synthetic: the teacher's config has no bos_token_id to start from")
    chunks = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for first in tqdm(range(0, data.num_sequences, data.batch_size), desc="distill: sampling"):
            count = min(data.batch_size, data.num_sequences - first)
            prompt = torch.full((count, 1), start, dtype=torch.long)
            with torch.no_grad():
                out = teacher.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    do_sample=True,
                    temperature=data.temperature,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=data.length - 1,
                    min_new_tokens=data.length - 1,  # no early EOS: every sequence is full
                    pad_token_id=start,
                )
            chunks.append(out)
    return torch.cat(chunks)


def training_sequences(
    config: DistillConfig, context: StageContext, teacher: nn.Module
) -> torch.Tensor:
    """The calibration windows, or the teacher's samples (kept in the stage's work directory,
    so a resumed run does not sample again)."""
    if config.synthetic is None:
        if context.calibration_windows is None:
            raise RuntimeError("the distill stage needs calibration windows")
        return context.calibration_windows()
    cached = None if context.work_dir is None else context.work_dir / SYNTHETIC
    if cached is not None and cached.is_file():
        return load_file(cached)["input_ids"]
    sequences = synthetic_sequences(teacher, config.synthetic, config.seed)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        save_file({"input_ids": sequences.contiguous()}, str(tmp))
        tmp.replace(cached)
    return sequences


def place_teacher(
    teacher: nn.Module, config: DistillConfig, student_device: torch.device
) -> torch.device:
    """Move the teacher where `teacher_device` says; returns where its inputs go."""
    if config.teacher_device == "offload":
        from accelerate import cpu_offload

        cpu_offload(teacher, execution_device=student_device)
        return student_device
    device = (
        student_device
        if config.teacher_device is None
        else calibration_device(config.teacher_device, field="teacher_device")
    )
    nn.Module.to(teacher, device)
    return device


def run_training(
    student: nn.Module,
    teacher: nn.Module,
    sequences: torch.Tensor,
    config: DistillConfig,
    *,
    dtype: torch.dtype,
    work_dir: Path | None,
    parallel: DataParallel | None,
) -> TrainResult:
    """Train in float32 on the training device with the QAT wrappers on, then return the
    student to CPU memory in the recipe's dtype (on every rank, the same way)."""
    device = (
        calibration_device(config.device, field="device") if parallel is None else parallel.device
    )
    teacher_device = place_teacher(teacher, config, device)
    # nn.Module's own cast: transformers refuses .float() on models it loaded from GGUF
    # (it marks them quantized), though their weights are plain float tensors by now.
    nn.Module.to(student, device=device, dtype=torch.float32)
    qat_layers = {}
    if config.qat is not None:
        quantize = _qat_as_quantize(config)
        qat_layers = select_layers(student, quantize)
        add_fake_quantization(qat_layers, spec_of(quantize), dtype, range_search_of(quantize))
    try:
        return train(
            student,
            teacher,
            sequences,
            config,
            checkpoint_dir=work_dir,
            teacher_device=teacher_device,
            parallel=parallel,
        )
    finally:
        remove_fake_quantization(qat_layers)
        nn.Module.to(student, device="cpu", dtype=dtype)


def _send_job(
    parallel: DataParallel,
    student: nn.Module,
    sequences: torch.Tensor,
    config: DistillConfig,
    context: StageContext,
) -> None:
    """Rank 0 → workers: the student's architecture and weights, the sequences, the config."""
    state = student.state_dict()
    parallel.send_message(
        {
            "op": DISTILL,
            "config": config.model_dump(mode="json"),
            "student_config": student.config.to_dict(),
            "state_keys": list(state),
            "sequences": list(sequences.shape),
            "dtype": context.dtype,
            "work_dir": None if context.work_dir is None else str(context.work_dir),
        }
    )
    parallel.broadcast_tensors([*state.values(), sequences])


def serve_job(
    message: dict, teacher_of: Callable[[str | None], nn.Module], parallel: DataParallel
) -> None:
    """A worker's side of one distill stage: rebuild the student, train in step with rank 0."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = DistillConfig.model_validate(message["config"])
    student_config = dict(message["student_config"])
    student_config = AutoConfig.for_model(student_config.pop("model_type"), **student_config)
    student = AutoModelForCausalLM.from_config(student_config, dtype=torch.float32)
    state = student.state_dict()
    if list(state) != message["state_keys"]:
        raise RuntimeError(
            f"rank {parallel.rank}: the rebuilt student's tensors differ from rank 0's "
            f"({len(state)} vs {len(message['state_keys'])} names)"
        )
    sequences = torch.empty(message["sequences"], dtype=torch.long)
    parallel.broadcast_tensors([*state.values(), sequences])
    teacher = teacher_of(config.teacher)
    work_dir = None if message["work_dir"] is None else Path(message["work_dir"])
    dtype = DTYPES[message["dtype"]]
    run_training(
        student, teacher, sequences, config, dtype=dtype, work_dir=work_dir, parallel=parallel
    )


@register_stage(DistillConfig, preflight=preflight)
def distill_model(model: nn.Module, config: DistillConfig, context: StageContext) -> StageResult:
    if context.teacher is None:
        raise RuntimeError("the distill stage needs a teacher")
    teacher = context.teacher(config.teacher)
    check_teacher(model, teacher, config)
    sequences = training_sequences(config, context, teacher)  # (N, T)
    parallel = context.parallel
    if parallel is not None:
        nn.Module.to(model, torch.float32)  # the workers' copies are float32 too
        _send_job(parallel, model, sequences, config, context)
    result = run_training(
        model,
        teacher,
        sequences,
        config,
        dtype=DTYPES[context.dtype],
        work_dir=context.work_dir,
        parallel=parallel,
    )
    first, last = result.curve[0], result.curve[-1]
    summary = (
        f"{result.steps} steps, {result.steps * config.batch_size * config.grad_accumulation} "
        f"sequences of {sequences.shape[1]} tokens; loss {first['loss']:.4f} → {last['loss']:.4f}"
        + (f"; QAT {_qat_as_quantize(config).scheme}" if config.qat is not None else "")
        + ("" if parallel is None else f"; data-parallel over {parallel.world_size} processes")
    )
    log.info("distill: %s in %.1f s", summary, result.seconds)
    return StageResult(
        summary=summary,
        details={
            "steps": result.steps,
            "tokens_this_run": result.tokens,
            "resumed_from_step": result.resumed_from,
            "train_seconds": result.seconds,
            "processes": 1 if parallel is None else parallel.world_size,
            "temperature": config.temperature,
            "alpha": config.alpha,
            "data": "calibration" if config.synthetic is None else "teacher samples",
            "sequences": list(sequences.shape),
            "qat": None if config.qat is None else config.qat.model_dump(),
            "loss_first": first,
            "loss_last": last,
            "curve": result.curve,
        },
    )
