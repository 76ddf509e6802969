"""llama.cpp on this CPU: size, speed and fidelity of GGUF exports of artifacts, beside the bf16
transformers baseline, ONNX Runtime (the baseline in float32 and our INT4 export of the same
artifact) and llama.cpp on the demo model's own Q4_1 GGUF, all in one invocation.

Speed is `compress bench`'s measurement for every runtime (batch 1, the same random 128-token
prompt, 64 greedy tokens with the KV cache, median of 5 after a warm-up). llama.cpp runs in
the benchmark virtualenv `scripts/build_llama_cpp.sh` builds (`_llama_cpp_driver.py`).
Fidelity on held-out WikiText-2 windows: KL(bf16 baseline ‖ row) and top-1 agreement, and
parity with `compress.load` (the artifact in torch): KL(compress.load ‖ llama.cpp) and, for the
file itself without llama.cpp's arithmetic, KL(compress.load ‖ transformers reading the GGUF),
both in float32 (`transformers-read`). Greedy: how many of the 64 tokens ONNX Runtime and
llama.cpp generate from 128 tokens of held-out text equal `compress.load`'s (bf16), up to the
first difference.

    bash scripts/build_llama_cpp.sh      # once: .venv-llama (about 5 minutes on 2 cores)
    .venv/bin/python benchmarks/gguf_export.py \\
        --artifacts runs/release/smollm2-135m-int4-g64-edge runs/release/smollm2-135m-int4-g32-gguf

`--families` adds llama.cpp against `compress.load` on tiny random models of each supported
family with their own conventions (Llama 3 rope, Gemma 3's per-layer windows, Phi-3's partial
rotary, soft-caps, q/k norms).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from onnx_export import Fidelity, fidelity, onnx_logits, torch_logits

from compress.artifact import load_artifact
from compress.bench import (
    BenchSettings,
    Speed,
    measure_onnx,
    measure_torch,
    prompt_ids,
    tensor_bytes,
    timed_greedy,
    timed_greedy_onnx,
)
from compress.calibration import evaluation_windows, load_text
from compress.gguf.export import GGUF_FILE, export_gguf
from compress.models import load_model, resolve_source
from compress.onnx.export import export_onnx, write_onnx_model
from compress.onnx.graph import ExportOptions
from compress.onnx.runtime import OnnxCausalLM
from compress.recipe import ModelConfig

from _common import DEMO_SOURCE, REPO, SHARED_TEXT

log = logging.getLogger("gguf_export")
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"]
DRIVER = Path(__file__).with_name("_llama_cpp_driver.py")
LLAMA_PYTHON = REPO / ".venv-llama" / "bin" / "python"


def run_llama_cpp(
    model: Path,
    settings: BenchSettings,
    prompt: torch.Tensor,
    windows: torch.Tensor | None,
    work: Path,
    greedy_prompt: torch.Tensor | None = None,
) -> tuple[Speed, list[int] | None, list[torch.Tensor]]:
    """Speed, greedy tokens of `greedy_prompt` and (with `windows`) per-window logits of
    `model` in llama.cpp."""
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "prompt.npy", prompt.numpy())
    command = [
        str(LLAMA_PYTHON),
        str(DRIVER),
        "--model",
        str(model),
        "--prompt",
        str(work / "prompt.npy"),
        "--new-tokens",
        str(settings.new_tokens),
        "--repeats",
        str(settings.repeats),
        "--threads",
        str(torch.get_num_threads()),
        "--out",
        str(work / "result.json"),
    ]
    if greedy_prompt is not None:
        np.save(work / "greedy.npy", greedy_prompt.numpy())
        command += ["--greedy-prompt", str(work / "greedy.npy")]
    if windows is not None:
        np.save(work / "windows.npy", windows.numpy())
        command += ["--windows", str(work / "windows.npy"), "--logits-dir", str(work / "logits")]
    subprocess.run(command, check=True)
    result = json.loads((work / "result.json").read_text())
    speed = Speed(
        label=f"{model.parent.name}: llama.cpp",
        prefill_tokens_per_s=result["prefill_tokens_per_s"],
        decode_tokens_per_s=result["decode_tokens_per_s"],
        peak_rss_increase_bytes=result["peak_rss_increase_bytes"],
        size_on_disk_bytes=model.stat().st_size,
    )
    logits = []
    if windows is not None:
        for index in range(len(windows)):
            logits.append(torch.from_numpy(np.load(work / "logits" / f"window_{index}.npy")))
    log.info("%s: %s", model, {k: v for k, v in result.items() if "tokens" not in k})
    return speed, result["greedy_tokens"], logits


def transformers_read_logits(export: Path, windows: torch.Tensor) -> list[torch.Tensor]:
    """The GGUF as stock transformers reads it (dequantized), in float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export, gguf_file=GGUF_FILE, dtype=torch.float32)
    return torch_logits(model, windows)


def float32_reference(artifact: Path) -> torch.nn.Module:
    """compress.load's model computed in float32: the integers exactly dequantized. A tied
    quantized head's table (stored in the artifact's dtype) is taken at its exact values too,
    as the GGUF stores it once, in the head's blocks."""
    model, _ = load_artifact(artifact, with_tokenizer=False)
    model = model.float()
    head = model.lm_head
    table = model.model.embed_tokens.weight
    if hasattr(head, "dequantized_weight") and table.shape == (head.out_features, head.in_features):
        exact = head.dequantized_weight()
        if torch.equal(exact.to(torch.bfloat16).float(), table):
            with torch.no_grad():
                table.copy_(exact)
    return model


def same_prefix(tokens: list[int], reference: list[int]) -> str:
    """How many greedy tokens agree with the reference's before the first difference."""
    pairs = enumerate(zip(tokens, reference, strict=True))
    agree = next((i for i, (a, b) in pairs if a != b), len(reference))
    return f"{agree}/{len(reference)}"


def row(
    speed: Speed,
    reference: Speed,
    ort_int4: Speed | None,
    bf16_size: int,
    fid: Fidelity,
    extra: str = "–",
    greedy: str = "–",
) -> str:
    decode = speed.decode_tokens_per_s
    vs_ort = f"{decode / ort_int4.decode_tokens_per_s:.2f}×" if ort_int4 else "–"
    parity = (
        f"{fid.kl_to_artifact:.5f} / {100 * fid.top1_to_artifact:.1f}%"
        if fid.kl_to_artifact is not None
        else "–"
    )
    return (
        f"| {speed.label} | {speed.prefill_tokens_per_s:.0f} | {decode:.1f} "
        f"| {decode / reference.decode_tokens_per_s:.2f}× | {vs_ort} "
        f"| {speed.size_on_disk_bytes / 1e6:.1f} MB ({speed.size_on_disk_bytes / bf16_size:.3f}×) "
        f"| {speed.peak_rss_increase_bytes / 2**20:.0f} MiB "
        f"| {fid.kl_to_baseline:.4f} / {100 * fid.top1_to_baseline:.1f}% | {parity} | {extra} "
        f"| {greedy} |"
    )


def demo_table(args: argparse.Namespace, work: Path) -> list[str]:
    settings = BenchSettings(repeats=args.repeats)
    length = max(settings.prompt_tokens + settings.new_tokens, args.seq_len)
    resolved = resolve_source(ModelConfig(source=args.model))
    model, tokenizer = load_model(resolved, "bfloat16")
    windows = evaluation_windows(
        load_text(args.eval_text, field="--eval-text"), tokenizer, args.seq_len, args.eval_windows
    )
    baseline_logits = torch_logits(model, windows)
    bf16_size = tensor_bytes(model)
    prompt = prompt_ids(model.get_input_embeddings().num_embeddings, settings)
    bf16 = measure_torch(model, "transformers bf16 (baseline)", bf16_size, settings)
    same = fidelity(baseline_logits, windows, baseline_logits)
    lines = [row(bf16, bf16, None, bf16_size, same)]
    fp32_dir = work / "ort-fp32"
    fp32_dir.mkdir()
    write_onnx_model(model, fp32_dir, ExportOptions(context_length=length, quantized_only=False))
    del model
    fp32 = measure_onnx(fp32_dir, "ORT float32 (baseline, unquantized)", settings)
    lines.append(
        row(
            fp32,
            bf16,
            None,
            bf16_size,
            fidelity(onnx_logits(fp32_dir, windows), windows, baseline_logits),
        )
    )
    original = Path(resolved.display)
    speed, _, logits = run_llama_cpp(original, settings, prompt, windows, work / "original")
    speed = Speed(**{**speed.to_dict(), "label": f"{original.name}: llama.cpp (the original file)"})
    lines.append(row(speed, bf16, None, bf16_size, fidelity(logits, windows, baseline_logits)))

    text_prompt = windows[:1, : settings.prompt_tokens]  # greedy paths from real text
    for artifact in args.artifacts:
        reference = float32_reference(artifact)
        artifact_logits = torch_logits(reference, windows)
        del reference
        with torch.inference_mode():
            _, _, ours = timed_greedy(
                load_artifact(artifact, with_tokenizer=False)[0], text_prompt, settings.new_tokens
            )
        ours = ours[0].tolist()
        onnx_dir = export_onnx(artifact, work / f"{artifact.name}-onnx", context_length=length)
        ort = measure_onnx(
            onnx_dir, f"{artifact.name}: ORT INT4 export (accuracy_level 4)", settings
        )
        fid = fidelity(onnx_logits(onnx_dir, windows), windows, baseline_logits, artifact_logits)
        lm = OnnxCausalLM(onnx_dir, threads=torch.get_num_threads())
        ort_tokens = timed_greedy_onnx(lm, text_prompt, settings.new_tokens)[2][0].tolist()
        lines.append(row(ort, bf16, ort, bf16_size, fid, greedy=same_prefix(ort_tokens, ours)))
        export = export_gguf(artifact, work / f"{artifact.name}-gguf")
        manifest = json.loads((export / "manifest.json").read_text())["export"]
        read = fidelity(
            transformers_read_logits(export, windows), windows, baseline_logits, artifact_logits
        )
        speed, tokens, logits = run_llama_cpp(
            export / GGUF_FILE, settings, prompt, windows, work / artifact.name, text_prompt
        )
        speed = Speed(**{**speed.to_dict(), "label": f"{artifact.name}: GGUF export, llama.cpp"})
        fid = fidelity(logits, windows, baseline_logits, artifact_logits)
        types = ", ".join(f"{n} {t}" for t, n in manifest["tensor_types"].items())
        rounding = manifest["fp16_rounding"]
        extra = (
            f"{read.kl_to_artifact:.2e} / {100 * read.top1_to_artifact:.1f}%; d/m rounding max "
            f"{rounding['max_steps']:.1e} steps ({types})"
        )
        lines.append(row(speed, bf16, ort, bf16_size, fid, extra, same_prefix(tokens, ours)))
    return [
        f"\n{args.model}; torch {torch.__version__}, {torch.get_num_threads()} threads. "
        "Speed: batch 1, "
        f"prompt {settings.prompt_tokens}, {settings.new_tokens} greedy tokens with the KV cache, "
        f"median of {settings.repeats}. Fidelity: {len(windows)}×{args.seq_len} held-out tokens of "
        f"{Path(args.eval_text).name}.\n",
        "| runtime | prefill tok/s | decode tok/s | decode × bf16 | decode × our ORT INT4 "
        "| size on disk (× bf16) | peak RSS (+) | KL / top-1 vs baseline "
        "| parity: KL / top-1 vs compress.load | transformers-read GGUF: KL / top-1 vs "
        "compress.load (float32) | greedy tokens = compress.load's (text prompt) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *lines,
    ]


def families_table(work: Path) -> list[str]:
    """llama.cpp against compress.load (float32) on tiny random models of each family."""
    import sys

    sys.path.insert(0, str(REPO))
    from transformers import AutoTokenizer

    from compress.artifact import save_artifact
    from compress.quant.config import QuantizeConfig
    from compress.registry import StageContext, handler_for
    from tests.families import sharpened, tiny_family_model

    resolved = resolve_source(ModelConfig(source=DEMO_SOURCE))
    tokenizer = AutoTokenizer.from_pretrained(resolved.location, gguf_file=resolved.gguf_file)
    stages = [
        QuantizeConfig(bits=4, group_size=32, symmetric=True, gguf_exact=True),
        QuantizeConfig(bits=8, group_size=-1, symmetric=True, gguf_exact=True, include=["lm_head"]),
    ]
    ids = torch.from_numpy(np.random.default_rng(0).integers(3, len(tokenizer), size=(1, 40)))
    lines = []
    for index, family in enumerate(FAMILIES):
        # Directories (and so general.name) without the family's name: llama.cpp sets token
        # attributes by model name ("phi3" expects Phi-3's own vocabulary, not the demo's).
        name = f"tiny-{index}"
        model = sharpened(
            tiny_family_model(
                family,
                len(tokenizer),
                dtype=torch.bfloat16,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
        for config in stages:
            handler_for(config).apply(model, config, StageContext(dtype="bfloat16"))
        artifact = save_artifact(
            model,
            tokenizer,
            work / name,
            recipe_yaml="version: 1\n",
            manifest_fields={"dtype": "bfloat16"},
        )
        export = export_gguf(
            artifact, work / f"{name}-gguf", tokenizer_pre="qwen2" if family == "qwen2" else None
        )
        tokens = ids[:, :20] if family == "mistral" else ids  # exact up to Mistral's window
        reference = float32_reference(artifact)
        expected = torch_logits(reference, tokens)
        _, _, logits = run_llama_cpp(
            export / GGUF_FILE,
            BenchSettings(repeats=1),
            tokens[:, :8],
            tokens,
            work / f"{name}-run",
        )
        stats = fidelity(logits, tokens, expected)
        kl, top1 = stats.kl_to_baseline, stats.top1_to_baseline
        lines.append(f"| {family} | {tokens.shape[1]} | {kl:.2e} | {100 * top1:.1f}% |")
    return [
        "\nllama.cpp vs compress.load (float32) on tiny random models (2 layers, hidden 64, "
        "INT4 g32 sym + INT8 head, gguf_exact), each family's own conventions:\n",
        "| family | tokens | KL (nats/token) | top-1 agreement |",
        "|---|---|---|---|",
        *lines,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", nargs="*", type=Path, default=[])
    parser.add_argument("--model", default=DEMO_SOURCE, help="the baseline's model source")
    parser.add_argument("--eval-text", default=str(SHARED_TEXT / "test.txt"))
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--families", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not LLAMA_PYTHON.exists():
        raise SystemExit(f"{LLAMA_PYTHON} not found: run scripts/build_llama_cpp.sh first")
    with tempfile.TemporaryDirectory(prefix="gguf-bench-") as tmp:
        lines = demo_table(args, Path(tmp)) if args.artifacts else []
        if args.families:
            lines += families_table(Path(tmp) / "families")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
