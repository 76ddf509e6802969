"""`compress bench`: prefill and decode speed, peak memory and size on disk of an artifact,
next to its uncompressed baseline measured the same way in the same invocation.

Decoding is greedy with the model's KV cache, one token at a time at batch 1 (the edge case);
each figure is the median of `repeats` timed runs after a warm-up run. The prompt is seeded
random token ids: speed does not depend on what the tokens say.

Runtimes: `torch` runs the artifact as `compress.load` gives it and the baseline in the
artifact's dtype; `onnx` exports both (the artifact with MatMulNBits layers, the baseline
unquantized in float32) into a temporary directory and runs them with ONNX Runtime on the CPU.
"""

from __future__ import annotations

import inspect
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from compress.errors import BadInputError
from compress.profiling import PeakMemory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchSettings:
    prompt_tokens: int = 128
    new_tokens: int = 64
    repeats: int = 5
    seed: int = 0


@dataclass(frozen=True)
class Speed:
    """One model's numbers (medians over repeats)."""

    label: str
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    peak_rss_increase_bytes: int
    size_on_disk_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prompt_ids(vocab_size: int, settings: BenchSettings) -> torch.Tensor:
    generator = torch.Generator().manual_seed(settings.seed)
    return torch.randint(0, vocab_size, (1, settings.prompt_tokens), generator=generator)


@torch.inference_mode()
def timed_greedy(
    model: nn.Module, prompt: torch.Tensor, new_tokens: int
) -> tuple[float, float, torch.Tensor]:
    """(prefill seconds, seconds for `new_tokens` cached greedy steps, the (1, new_tokens)
    tokens produced: the first comes from the prefill, each step makes the next)."""
    start = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    prefill = time.perf_counter() - start
    tokens = [out.logits[:, -1:].argmax(-1)]  # (1, 1) each
    # transformers ≥ 5.24 calls the KV cache `cache` (argument and output); before, past_key_values.
    cache_arg = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else ("past_key_values")
    )
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        cache = getattr(out, cache_arg)
        out = model(input_ids=tokens[-1], use_cache=True, **{cache_arg: cache})
        tokens.append(out.logits[:, -1:].argmax(-1))
    decode = time.perf_counter() - start
    return prefill, decode, torch.cat(tokens, dim=1)


def timed_greedy_onnx(
    lm: Any, prompt: torch.Tensor, new_tokens: int
) -> tuple[float, float, np.ndarray]:
    """`timed_greedy` for an `OnnxCausalLM`."""
    ids = prompt.numpy()
    start = time.perf_counter()
    logits, cache = lm.forward(ids, lm.empty_cache(ids.shape[0]))
    prefill = time.perf_counter() - start
    tokens = [logits[:, -1:].argmax(-1)]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits, cache = lm.forward(tokens[-1], cache)
        tokens.append(logits[:, -1:].argmax(-1))
    decode = time.perf_counter() - start
    return prefill, decode, np.concatenate(tokens, axis=1)


def measure_torch(
    model: nn.Module, label: str, size_on_disk: int, settings: BenchSettings
) -> Speed:
    model.eval()
    prompt = prompt_ids(model.get_input_embeddings().num_embeddings, settings)
    return measure(
        lambda: timed_greedy(model, prompt, settings.new_tokens), label, size_on_disk, settings
    )


def measure_onnx(directory: Path, label: str, settings: BenchSettings) -> Speed:
    from compress.onnx.runtime import OnnxCausalLM

    lm = OnnxCausalLM(directory, threads=torch.get_num_threads())
    vocab = lm.session.get_outputs()[0].shape[-1]
    prompt = prompt_ids(vocab, settings)
    size = sum(p.stat().st_size for p in directory.glob("model.onnx*"))
    return measure(
        lambda: timed_greedy_onnx(lm, prompt, settings.new_tokens), label, size, settings
    )


def measure(
    run: Callable[[], tuple[float, float, Any]],
    label: str,
    size_on_disk: int,
    settings: BenchSettings,
) -> Speed:
    """Median prefill and decode speed of `repeats` calls of `run` after a warm-up call."""
    with PeakMemory() as memory:
        run()  # warm-up: allocations, threads
        runs = [run() for _ in range(settings.repeats)]
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    speed = Speed(
        label=label,
        prefill_tokens_per_s=settings.prompt_tokens / prefill,
        # new_tokens - 1 cached steps: the first new token comes with the prefill.
        decode_tokens_per_s=(settings.new_tokens - 1) / decode if decode > 0 else float("nan"),
        peak_rss_increase_bytes=memory.result.peak_rss_increase_bytes,
        size_on_disk_bytes=size_on_disk,
    )
    log.info(
        "%s: prefill %.0f tok/s, decode %.1f tok/s",
        label,
        speed.prefill_tokens_per_s,
        speed.decode_tokens_per_s,
    )
    return speed


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored (tied tensors once): what saving it writes."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


Runtime = Literal["torch", "onnx"]


def bench_artifact(
    artifact_dir: Path,
    baseline_spec: str | None,
    settings: BenchSettings,
    runtime: Runtime = "torch",
) -> dict[str, Any]:
    """Measure the baseline (the artifact's source unless named) and the artifact, one after
    the other in this process; returns the `bench` section of the report."""
    from compress.artifact import WEIGHTS, load_artifact, read_manifest
    from compress.models import load_model, resolve_source
    from compress.recipe import ModelConfig

    manifest = read_manifest(artifact_dir)
    spec = baseline_spec or (manifest.get("source") or {}).get("spec")
    if spec is None:
        raise BadInputError(f"{artifact_dir}: the manifest names no source; pass --baseline")
    dtype = manifest.get("dtype", "bfloat16")
    if runtime == "onnx":
        baseline, artifact = _bench_onnx(artifact_dir, spec, dtype, settings)
    else:
        baseline_model, _ = load_model(resolve_source(ModelConfig(source=spec)), dtype)
        baseline = measure_torch(
            baseline_model, f"baseline ({dtype})", tensor_bytes(baseline_model), settings
        )
        del baseline_model
        artifact_model, _ = load_artifact(artifact_dir, with_tokenizer=False)
        weights = (artifact_dir / WEIGHTS).stat().st_size
        artifact = measure_torch(artifact_model, "artifact", weights, settings)
    section: dict[str, Any] = {"runtime": runtime, "torch": torch.__version__}
    if runtime == "onnx":
        import onnxruntime

        section["onnxruntime"] = onnxruntime.__version__
    return {
        **section,
        "threads": torch.get_num_threads(),
        "settings": asdict(settings),
        "baseline": baseline.to_dict(),
        "artifact": artifact.to_dict(),
        "table": bench_table(baseline, artifact, settings, runtime),
    }


def _bench_onnx(
    artifact_dir: Path, baseline_spec: str, dtype: str, settings: BenchSettings
) -> tuple[Speed, Speed]:
    """Both models exported into a temporary directory and run with ONNX Runtime: the
    baseline unquantized in float32, the artifact as `compress export --format onnx` writes it."""
    from compress.models import load_model, resolve_source
    from compress.onnx.export import export_onnx, write_onnx_model
    from compress.onnx.graph import ExportOptions
    from compress.recipe import ModelConfig

    length = settings.prompt_tokens + settings.new_tokens
    with tempfile.TemporaryDirectory(prefix="compress-bench-") as tmp:
        baseline_dir = Path(tmp) / "baseline"
        baseline_dir.mkdir()
        options = ExportOptions(context_length=length, quantized_only=False)
        model, _ = load_model(resolve_source(ModelConfig(source=baseline_spec)), dtype)
        write_onnx_model(model, baseline_dir, options)  # weights widen to float32
        del model  # only the ONNX Runtime session holds weights while it is timed
        baseline = measure_onnx(baseline_dir, "baseline (onnx float32)", settings)
        shutil.rmtree(baseline_dir)
        artifact_onnx = export_onnx(artifact_dir, Path(tmp) / "artifact", context_length=length)
        artifact = measure_onnx(artifact_onnx, "artifact (onnx)", settings)
    return baseline, artifact


def bench_table(
    baseline: Speed, artifact: Speed, settings: BenchSettings, runtime: Runtime = "torch"
) -> str:
    """Markdown: both rows and the artifact / baseline ratios."""

    def row(s: Speed) -> str:
        return (
            f"| {s.label} | {s.prefill_tokens_per_s:.0f} | {s.decode_tokens_per_s:.1f} "
            f"| {s.peak_rss_increase_bytes / 2**20:.0f} MiB | {s.size_on_disk_bytes / 1e6:.1f} MB |"
        )

    ratios = [
        artifact.prefill_tokens_per_s / baseline.prefill_tokens_per_s,
        artifact.decode_tokens_per_s / baseline.decode_tokens_per_s,
        artifact.peak_rss_increase_bytes / max(1, baseline.peak_rss_increase_bytes),
        artifact.size_on_disk_bytes / baseline.size_on_disk_bytes,
    ]
    ratio = "| artifact / baseline | " + " | ".join(f"{r:.2f}×" for r in ratios) + " |"
    return "\n".join(
        [
            f"Batch 1, prompt {settings.prompt_tokens} tokens, {settings.new_tokens} greedy "
            f"tokens with the KV cache, median of {settings.repeats} runs, "
            f"{torch.get_num_threads()} threads, runtime {runtime}.",
            "",
            "| model | prefill tok/s | decode tok/s | peak RSS (+) | weights |",
            "|---|---|---|---|---|",
            row(baseline),
            row(artifact),
            ratio,
        ]
    )


# --------------------------------------------------------------------------- results on disk

BENCH_JSON = "bench.json"
BENCH_MARKDOWN = "bench.md"


def write_bench_annex(artifact_dir: Path, runtime: Runtime, section: dict[str, Any]) -> None:
    """bench.json (one section per runtime) and bench.md beside the artifact. They stay
    outside the artifact's seal: a measurement of this machine, taken after the verdict, must
    not change the sealed report (the artifact still verifies)."""
    from compress.fileio import atomic_write_json, atomic_write_text
    from compress.seal import read_json_file

    path = artifact_dir / BENCH_JSON
    sections: dict[str, Any] = {}
    if path.is_file():
        try:
            stored = read_json_file(path)
            sections = stored if isinstance(stored, dict) else {}
        except BadInputError:
            log.warning("%s is unreadable; writing it anew", path)
    sections[runtime] = section
    atomic_write_json(path, sections)
    atomic_write_text(
        artifact_dir / BENCH_MARKDOWN,
        "\n".join(
            f"## Speed (`compress bench --runtime {name}`)\n\n{entry['table']}\n"
            for name, entry in sections.items()
            if isinstance(entry, dict) and "table" in entry
        ),
    )
