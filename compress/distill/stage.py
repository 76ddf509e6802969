"""The `distill` stage: recover the student (the model as earlier stages left it) by
distilling from the teacher (the model as it was before the recipe's stages).

The student trains in float32 (AdamW updates vanish in bfloat16 weights) and returns to the
recipe dtype afterwards. With `qat`, the Linears the next quantize stage will quantize see
their weights fake-quantized during training (`compress.distill.fake_quant`).
"""

from __future__ import annotations

import logging

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from compress.distill.config import DistillConfig, SyntheticData
from compress.distill.fake_quant import add_fake_quantization, remove_fake_quantization
from compress.distill.trainer import train
from compress.errors import PreflightError
from compress.models import DTYPES, decoder_layers_prefix
from compress.quant.config import QuantizeConfig
from compress.quant.stage import preflight as quantize_preflight
from compress.quant.stage import range_search_of, select_layers, spec_of
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
        quantize_preflight(model, _qat_as_quantize(config))  # group sizes fit every layer


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


@register_stage(DistillConfig, preflight=preflight)
def distill_model(model: nn.Module, config: DistillConfig, context: StageContext) -> StageResult:
    if context.teacher is None:
        raise RuntimeError("the distill stage needs a teacher")
    teacher = context.teacher(config.teacher)
    check_teacher(model, teacher, config)
    sequences = training_sequences(config, context, teacher)  # (N, T)
    dtype = DTYPES[context.dtype]
    qat_layers = {}
    # nn.Module's own cast: transformers refuses .float() on models it loaded from GGUF
    # (it marks them quantized), though their weights are plain float tensors by now.
    nn.Module.to(model, torch.float32)
    if config.qat is not None:
        quantize = _qat_as_quantize(config)
        qat_layers = select_layers(model, quantize)
        add_fake_quantization(qat_layers, spec_of(quantize), dtype, range_search_of(quantize))
    try:
        result = train(model, teacher, sequences, config, checkpoint_dir=context.work_dir)
    finally:
        remove_fake_quantization(qat_layers)
        nn.Module.to(model, dtype)
    first, last = result.curve[0], result.curve[-1]
    summary = (
        f"{result.steps} steps, {result.steps * config.batch_size * config.grad_accumulation} "
        f"sequences of {sequences.shape[1]} tokens; loss {first['loss']:.4f} → {last['loss']:.4f}"
        + (f"; QAT {quantize.scheme}" if config.qat is not None else "")
    )
    log.info("distill: %s in %.1f s", summary, result.seconds)
    return StageResult(
        summary=summary,
        details={
            "steps": result.steps,
            "tokens_this_run": result.tokens,
            "resumed_from_step": result.resumed_from,
            "train_seconds": result.seconds,
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
