"""ONNX Runtime on this CPU: size, speed and fidelity of exported artifacts against the bf16
transformers baseline and the same model exported unquantized (float32) to ONNX Runtime.

Speed is `compress bench`'s measurement (batch 1, prompt 128, 64 greedy tokens with the KV
cache, median of 5 runs after a warm-up). Fidelity is measured on held-out WikiText-2 windows:
KL(bf16 baseline ‖ row) per token and top-1 agreement (what the gate's quality budget reads),
and parity: KL(the artifact in `compress.load` ‖ its ONNX export) and their top-1 agreement.

    .venv/bin/python benchmarks/onnx_export.py \\
        --artifacts runs/release/smollm2-135m-int4-g64 runs/release/smollm2-135m-int4-g64-edge

The artifacts come from `compress run recipes/int4-group.yaml` and `recipes/int4-edge.yaml`.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.artifact import load_artifact
from compress.bench import BenchSettings, Speed, measure_onnx, measure_torch, tensor_bytes
from compress.calibration import evaluation_windows, load_text
from compress.evaluate.quality import window_stats
from compress.kernels import cpu_kernel
from compress.models import load_model, resolve_source
from compress.onnx.export import export_onnx, write_onnx_model
from compress.onnx.graph import ExportOptions
from compress.onnx.runtime import OnnxCausalLM
from compress.recipe import ModelConfig

from _common import DEMO_SOURCE, SHARED_TEXT

log = logging.getLogger("onnx_export")


@dataclass
class Fidelity:
    kl_to_baseline: float
    top1_to_baseline: float
    kl_to_artifact: float | None = None  # parity with compress.load
    top1_to_artifact: float | None = None


def pooled(stats: list) -> tuple[float, float]:
    tokens = sum(s.tokens for s in stats)
    return sum(s.kl for s in stats) / tokens, sum(s.agree for s in stats) / tokens


def fidelity(
    logits: list[torch.Tensor],
    windows: torch.Tensor,
    baseline: list[torch.Tensor],
    artifact: list[torch.Tensor] | None = None,
) -> Fidelity:
    pairs = zip(logits, windows, baseline, strict=True)
    to_base = pooled([window_stats(lg, w, b) for lg, w, b in pairs])
    result = Fidelity(*to_base)
    if artifact is not None:
        pairs = zip(logits, windows, artifact, strict=True)
        parity = pooled([window_stats(lg, w, a) for lg, w, a in pairs])
        result.kl_to_artifact, result.top1_to_artifact = parity
    return result


@torch.no_grad()
def torch_logits(model: torch.nn.Module, windows: torch.Tensor) -> list[torch.Tensor]:
    return [model(w[None]).logits[0].float() for w in windows]


def onnx_logits(directory: Path, windows: torch.Tensor) -> list[torch.Tensor]:
    lm = OnnxCausalLM(directory, threads=torch.get_num_threads())
    return [torch.from_numpy(lm.forward(w[None].numpy(), lm.empty_cache(1))[0][0]) for w in windows]


def row(
    speed: Speed, reference: Speed, bf16_size: int, onnx_fp32: Speed | None, fid: Fidelity
) -> str:
    decode = speed.decode_tokens_per_s
    vs_fp32 = f"{decode / onnx_fp32.decode_tokens_per_s:.2f}×" if onnx_fp32 else "–"
    parity = (
        f"{fid.kl_to_artifact:.5f} / {100 * fid.top1_to_artifact:.1f}%"
        if fid.kl_to_artifact is not None
        else "–"
    )
    return (
        f"| {speed.label} | {speed.prefill_tokens_per_s:.0f} | {decode:.1f} "
        f"| {decode / reference.decode_tokens_per_s:.2f}× | {vs_fp32} "
        f"| {speed.size_on_disk_bytes / 1e6:.1f} MB ({speed.size_on_disk_bytes / bf16_size:.2f}×) "
        f"| {speed.peak_rss_increase_bytes / 2**20:.0f} MiB "
        f"| {fid.kl_to_baseline:.4f} / {100 * fid.top1_to_baseline:.1f}% | {parity} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", nargs="+", type=Path, required=True)
    parser.add_argument("--model", default=DEMO_SOURCE, help="the baseline's model source")
    parser.add_argument("--eval-text", default=str(SHARED_TEXT / "test.txt"))
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--levels", default="4,0", help="MatMulNBits accuracy levels to run")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = BenchSettings(repeats=args.repeats)
    length = max(settings.prompt_tokens + settings.new_tokens, args.seq_len)

    model, tokenizer = load_model(resolve_source(ModelConfig(source=args.model)), "bfloat16")
    windows = evaluation_windows(
        load_text(args.eval_text, field="--eval-text"), tokenizer, args.seq_len, args.eval_windows
    )
    baseline_logits = torch_logits(model, windows)
    bf16_size = tensor_bytes(model)
    bf16 = measure_torch(model, "transformers bf16 (baseline)", bf16_size, settings)
    lines = [row(bf16, bf16, bf16_size, None, fidelity(baseline_logits, windows, baseline_logits))]
    with tempfile.TemporaryDirectory(prefix="onnx-bench-") as tmp:
        fp32_dir = Path(tmp) / "fp32"
        fp32_dir.mkdir()
        options = ExportOptions(context_length=length, quantized_only=False)
        write_onnx_model(model, fp32_dir, options)  # weights widen to float32
        del model
        fp32 = measure_onnx(fp32_dir, "ORT float32 (baseline, unquantized)", settings)
        fid = fidelity(onnx_logits(fp32_dir, windows), windows, baseline_logits)
        lines.append(row(fp32, bf16, bf16_size, fp32, fid))
        for artifact in args.artifacts:
            quantized, _ = load_artifact(artifact, with_tokenizer=False)
            with cpu_kernel("packed"):
                artifact_logits = torch_logits(quantized, windows)
                speed = measure_torch(
                    quantized,
                    f"{artifact.name}: torch (compress.load, bf16)",
                    sum(p.stat().st_size for p in artifact.glob("model.safetensors")),
                    settings,
                )
            del quantized
            lines.append(
                row(
                    speed,
                    bf16,
                    bf16_size,
                    fp32,
                    fidelity(artifact_logits, windows, baseline_logits),
                )
            )
            for level in (int(x) for x in args.levels.split(",")):
                out = export_onnx(
                    artifact,
                    Path(tmp) / f"{artifact.name}-{level}",
                    accuracy_level=level,
                    context_length=length,
                )
                speed = measure_onnx(out, f"{artifact.name}: ORT, accuracy_level {level}", settings)
                fid = fidelity(onnx_logits(out, windows), windows, baseline_logits, artifact_logits)
                lines.append(row(speed, bf16, bf16_size, fp32, fid))
    import onnxruntime

    print(
        f"\n{args.model}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"{torch.get_num_threads()} threads. Speed: batch 1, prompt {settings.prompt_tokens}, "
        f"{settings.new_tokens} greedy tokens with the KV cache, median of {settings.repeats}. "
        f"Fidelity: {len(windows)}×{args.seq_len} held-out tokens of {Path(args.eval_text).name}."
        "\n\n| runtime | prefill tok/s | decode tok/s | decode × bf16 | decode × ORT fp32 "
        "| size on disk (× bf16) | peak RSS (+) | KL / top-1 vs baseline "
        "| parity: KL / top-1 vs compress.load |\n|---|---|---|---|---|---|---|---|---|"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
