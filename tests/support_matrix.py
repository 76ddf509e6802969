"""The support matrix: every decoder family of tests/families.py through every capability, each
cell a parity check that passes or a refusal that names what is missing.

`tests/stages/test_support_matrix.py` runs the cells (one test per family × capability) and
checks README's table against what they returned, so the table is generated from the tests,
never written by hand: `python -m tests.support_matrix` prints it (`--write` updates README).

A cell returns an `Outcome`: "ok" with the measured number that its check bounded, or
"refused" with the first line of the error the toolkit raised (BadInputError and its kinds:
preflight, artifact, data). Anything else, a failed parity check included, raises.

Every model is a tiny random one of its family (vocabulary 256, 2 layers, hidden 64) in
bfloat16, as recipes run by default; windows are random token ids.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import compress.stages  # noqa: F401  (fills the stage registry)
from compress.artifact import load_artifact, save_artifact
from compress.distill.config import DistillConfig
from compress.distill.losses import kd_loss
from compress.errors import BadInputError
from compress.evaluate.quality import baseline_logprobs, measure_quality
from compress.export import export_artifact
from compress.kernels import cpu_kernel
from compress.models import decoder_layers_prefix
from compress.prune.config import PruneConfig
from compress.quant.config import QuantizeConfig
from compress.registry import StageContext, handler_for
from tests.families import FAMILIES, tiny_family_model

VOCAB = 256
DTYPE = "bfloat16"
README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- support-matrix:begin -->", "<!-- support-matrix:end -->"

# Random windows: calibration (GPTQ, distillation, held-out signals) and a parity prompt
# longer than the families' sliding window (24), so windowed attention is exercised.
CALIBRATION = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
HELD_OUT = torch.randint(0, VOCAB, (4, 40), generator=torch.Generator().manual_seed(1))
PROMPT = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))

INT4 = QuantizeConfig(bits=4, group_size=32)
INT4_GPTQ = QuantizeConfig(method="gptq", bits=4, group_size=32)
INT8 = QuantizeConfig(bits=8)


@dataclass(frozen=True)
class Outcome:
    status: str  # "ok" | "refused"
    detail: str  # the measured number, or the refusal's first line

    def cell_text(self) -> str:
        # Only the status: the measured numbers vary in their last digits across CPUs, and
        # README must be reproducible on any machine.
        return "✓" if self.status == "ok" else "refused"


# --------------------------------------------------------------------------- helpers


def source_model(family: str) -> nn.Module:
    return tiny_family_model(family, VOCAB, dtype=torch.bfloat16)


def context(dtype: str = DTYPE) -> StageContext:
    return StageContext(
        dtype=dtype, calibration_windows=lambda: CALIBRATION, calibration_batch_size=4
    )


def apply_stage(model: nn.Module, config, ctx: StageContext | None = None):
    handler = handler_for(config)
    handler.preflight(model, config)
    return handler.apply(model, config, ctx or context())


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor = PROMPT) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


def relative_error(test: torch.Tensor, reference: torch.Tensor) -> float:
    return float((test - reference).norm() / reference.norm())


def float_matrices(model: nn.Module) -> list[str]:
    """Weight matrices (2-D and 3-D parameters) inside the decoder layers still held in float:
    what a quantize stage that claims the whole decoder must leave none of, routers aside."""
    prefix = decoder_layers_prefix(model) + "."
    return [
        name
        for name, parameter in model.named_parameters()
        if name.startswith(prefix)
        and parameter.dim() >= 2
        and parameter.is_floating_point()
        and not is_router(name)
    ]


def is_router(name: str) -> bool:
    """MoE routers stay 16-bit by design (tiny, and routing decisions are sensitive)."""
    return bool(re.search(r"\.mlp\.(gate|router|shared_expert_gate)\.weight$", name))


def check_quantized(family: str, config: QuantizeConfig, bound: float) -> tuple[nn.Module, float]:
    """Quantize a fresh model; every decoder matrix quantized, output moved but within `bound`."""
    reference = source_model(family)
    model = copy.deepcopy(reference)
    apply_stage(model, config)
    left = float_matrices(model)
    assert not left, f"{family}: decoder weights left in float after quantize: {left[:4]}"
    error = relative_error(logits(model), logits(reference))
    assert 0 < error < bound, f"{family}: relative logit error {error:.3g} not in (0, {bound})"
    return model, error


def save(model: nn.Module, directory: Path) -> Path:
    return save_artifact(
        model, None, directory, recipe_yaml="version: 1\n", manifest_fields={"dtype": DTYPE}
    )


# --------------------------------------------------------------------------- the cells


def rtn_int4(family: str, work: Path) -> Outcome:
    """RTN INT4 g32 quantizes every decoder matrix; the artifact reloads bit for bit."""
    model, error = check_quantized(family, INT4, 0.5)
    loaded, _ = load_artifact(save(model, work / "rtn-int4"), with_tokenizer=False)
    assert torch.equal(logits(loaded), logits(model)), f"{family}: reload changed the logits"
    return Outcome("ok", f"{error:.3f}")


def gptq_int4(family: str, work: Path) -> Outcome:
    _, error = check_quantized(family, INT4_GPTQ, 0.5)
    return Outcome("ok", f"{error:.3f}")


def int8(family: str, work: Path) -> Outcome:
    _, error = check_quantized(family, INT8, 0.05)
    return Outcome("ok", f"{error:.4f}")


def prune_int4(family: str, work: Path) -> Outcome:
    """Half the query heads of each KV group and half the FFN channels removed, then INT4: the
    pruned model loads in stock transformers with the same logits, and quantizes fully."""
    from transformers import AutoModelForCausalLM

    model = source_model(family)
    apply_stage(model, PruneConfig(criterion="magnitude", heads={"ratio": 0.5}, ffn={"ratio": 0.5}))
    model.save_pretrained(work / "pruned")
    stock = AutoModelForCausalLM.from_pretrained(work / "pruned", dtype=torch.bfloat16).eval()
    assert torch.equal(logits(stock), logits(model)), f"{family}: stock load of the pruned model"
    apply_stage(model, INT4)
    left = float_matrices(model)
    assert not left, f"{family}: decoder weights left in float after prune → quantize: {left[:4]}"
    heads = model.config.num_attention_heads
    return Outcome("ok", f"{heads} heads")


STEPS, LR = 6, 1e-3


def distill(family: str, work: Path) -> Outcome:
    """A few distillation steps move a perturbed student towards its teacher (float32)."""
    teacher = tiny_family_model(family, VOCAB, dtype=torch.float32)
    student = copy.deepcopy(teacher)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if ".layers." in name and parameter.dim() >= 2 and not is_router(name):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    before = _kd(student, teacher)
    config = DistillConfig(steps=STEPS, batch_size=4, lr=LR, warmup_steps=1, alpha=1.0)
    ctx = StageContext(
        dtype="float32", calibration_windows=lambda: CALIBRATION, teacher=lambda _: teacher
    )
    apply_stage(student, config, ctx)
    after = _kd(student, teacher)
    assert after < 0.9 * before, f"{family}: distillation KD {before:.4g} → {after:.4g}"
    return Outcome("ok", f"KD ×{after / before:.2f}")


def _kd(student: nn.Module, teacher: nn.Module) -> float:
    return float(kd_loss(logits(student, CALIBRATION), logits(teacher, CALIBRATION), 2.0))


def gate_signals(family: str, work: Path) -> Outcome:
    """KL(baseline ‖ INT4) from the compact baseline equals the direct full-vocabulary KL
    (the model's own logit post-processing replayed), and the baseline against itself is 0."""
    reference = source_model(family)
    baseline = baseline_logprobs(reference, HELD_OUT, batch_size=2)
    assert measure_quality(reference, HELD_OUT, baseline).kl_divergence == 0.0
    model = copy.deepcopy(reference)
    apply_stage(model, INT4)
    measured = measure_quality(model, HELD_OUT, baseline).kl_divergence
    # In the baseline's batches: the CPU op picks its kernel by rows per call, and a GEMM's
    # rounding depends on its shape; this cell checks the KL's arithmetic, not the kernels.
    batches = HELD_OUT.split(baseline.batch_size)
    base = torch.cat([logits(reference, b) for b in batches])[:, :-1].double().log_softmax(-1)
    test = torch.cat([logits(model, b) for b in batches])[:, :-1].double().log_softmax(-1)
    direct = float((base.exp() * (base - test)).sum(-1).mean())
    assert abs(measured - direct) <= 1e-3 * direct, f"{family}: KL {measured} vs {direct}"
    return Outcome("ok", f"KL {measured:.1e}")


def _int4_artifact(family: str, work: Path) -> tuple[nn.Module, Path]:
    model = source_model(family)
    apply_stage(model, INT4)
    left = float_matrices(model)
    assert not left, f"{family}: the INT4 artifact holds float decoder weights: {left[:4]}"
    return model, save(model, work / "int4")


def reference_logits(model: nn.Module) -> torch.Tensor:
    """Through the reference kernel, which dequantizes and multiplies as stock transformers with
    compressed-tensors does (the fast CPU kernels sum in another order), so parity is exact."""
    with cpu_kernel("reference"):
        return logits(model)


def stock_load(family: str, work: Path) -> Outcome:
    """Stock transformers + compressed-tensors reads the symmetric INT4 artifact bit for bit."""
    from transformers import AutoModelForCausalLM

    model, path = _int4_artifact(family, work)
    # Experts through transformers' per-expert loop, the order our experts module sums in (its
    # grouped_mm path rounds bf16 differently).
    stock = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, experts_implementation="eager"
    ).eval()
    assert torch.equal(logits(stock), reference_logits(model)), f"{family}: stock logits differ"
    return Outcome("ok", "bit-exact")


def int_quantized(family: str, work: Path) -> Outcome:
    """`compress export --format int-quantized`, read by stock transformers, bit for bit."""
    from transformers import AutoModelForCausalLM

    model, path = _int4_artifact(family, work)
    exported = export_artifact(path, work / "int-quantized", "int-quantized")
    stock = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.bfloat16).eval()
    assert torch.equal(logits(stock), reference_logits(model)), f"{family}: int-quantized logits"
    return Outcome("ok", "bit-exact")


def onnx(family: str, work: Path) -> Outcome:
    """The ONNX export at accuracy level 0 against the artifact in float32 (1e-4 of the largest
    logit), and its cached decode against its own full forward."""
    from compress.onnx.export import export_onnx
    from compress.onnx.runtime import OnnxCausalLM

    _, path = _int4_artifact(family, work)
    exported = export_onnx(path, work / "onnx", accuracy_level=0, context_length=64)
    reference, _ = load_artifact(path, with_tokenizer=False)
    expected = logits(reference.float())[0].numpy()
    session = OnnxCausalLM(exported)
    prompt = PROMPT.numpy()
    full, _ = session.forward(prompt, session.empty_cache(1))
    scale = np.abs(expected).max()
    error = np.abs(full[0] - expected).max() / scale
    assert error < 1e-4, f"{family}: ONNX logits differ by {error:.3g} of the largest"
    split = 30
    _, cache = session.forward(prompt[:, :split], session.empty_cache(1))
    steps = []
    for t in range(split, prompt.shape[1]):
        step, cache = session.forward(prompt[:, t : t + 1], cache)
        steps.append(step[0, -1])
    decode = np.abs(np.stack(steps) - full[0, split:]).max() / scale
    assert decode < 1e-4, f"{family}: cached decode differs from the full forward by {decode:.3g}"
    return Outcome("ok", f"{max(error, decode):.0e}")


CELLS: dict[str, Callable[[str, Path], Outcome]] = {
    "RTN INT4": rtn_int4,
    "GPTQ INT4": gptq_int4,
    "INT8": int8,
    "prune → INT4": prune_int4,
    "distill": distill,
    "KL / perplexity gate": gate_signals,
    "stock transformers": stock_load,
    "int-quantized export": int_quantized,
    "ONNX + ORT": onnx,
}


def cell_dir(root: Path, family: str, cell: str) -> Path:
    path = root / family / re.sub(r"[^a-z0-9]+", "-", cell.lower()).strip("-")
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_cell(family: str, cell: str, work: Path) -> Outcome:
    """The cell's outcome; a refusal is the toolkit's own error, first line kept."""
    try:
        return CELLS[cell](family, work)
    except BadInputError as exc:
        # Paths under the cell's scratch directory differ per run: keep the names inside it.
        message = str(exc).strip().splitlines()[0].replace(f"{work}{os.sep}", "")
        return Outcome("refused", message)


# --------------------------------------------------------------------------- the README table


def markdown(outcomes: dict[tuple[str, str], Outcome]) -> str:
    """The table README shows; refusals are listed under it with their messages."""
    cells = list(CELLS)
    lines = [
        "| family | " + " | ".join(cells) + " |",
        "|---|" + "---|" * len(cells),
    ]
    refusals = []
    for family in FAMILIES:
        row = [outcomes[family, cell].cell_text() for cell in cells]
        lines.append(f"| {family} | " + " | ".join(row) + " |")
        refusals += [
            f"- {family}, {cell}: {outcomes[family, cell].detail}"
            for cell in cells
            if outcomes[family, cell].status == "refused"
        ]
    return "\n".join(lines + (["", *refusals] if refusals else []))


def readme_table(text: str) -> str | None:
    """README's generated block, or None when it has none."""
    if BEGIN not in text or END not in text:
        return None
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def with_table(text: str, table: str) -> str:
    head, rest = text.split(BEGIN, 1)
    return f"{head}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}"


def all_outcomes() -> dict[tuple[str, str], Outcome]:
    with tempfile.TemporaryDirectory() as tmp:
        return {
            (family, cell): run_cell(family, cell, cell_dir(Path(tmp), family, cell))
            for family in FAMILIES
            for cell in CELLS
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update README's table in place")
    args = parser.parse_args(argv)
    table = markdown(all_outcomes())
    if args.write:
        README.write_text(with_table(README.read_text(encoding="utf-8"), table), encoding="utf-8")
    else:
        sys.stdout.write(table + "\n")
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    raise SystemExit(main())
