"""End-to-end greedy decoding: a dense Llama-shaped model against the same model with its
Linear layers replaced by our `QuantLinear` (INT4 group 128 RTN by default), tokens/s at
batch 1 and 8.

The model is `transformers`' LlamaForCausalLM with random weights (normal, std 0.02: the
config's `initializer_range`), built directly on the target device in the chosen dtype; nothing
is downloaded. Presets: `llama-1b` has Llama-3.2-1B's shapes (hidden 2048, FFN 8192, 16 layers,
32 query / 8 KV heads, vocabulary 128256, tied embeddings: 1.24 B parameters); `tiny` is a
few MB, for tests. The quantized variant is made by the quantize stage's own code
(`compress.quant.stage.preflight` + `quantize_model`, method rtn): every Linear inside the
decoder layers becomes a QuantLinear, whose forward calls `compress::dequant_matmul`; the
lm_head (tied to the embeddings) stays dense unless `--quantize-lm-head`. On CUDA that op runs
the cuda_ext kernels, picked by the number of rows (compress.kernels.cuda_path: tensor cores
for decode steps at batch 1 and 8, dequantize + cuBLAS for the prefill); the table says
whether they loaded (`compress.cuda_ops.load()`), so a run that fell back to
pure PyTorch shows. On CPU the op's CPU path runs instead (torch's packed int4/int8 matmuls
where they apply).

Memory: one model at a time. The dense model is built and measured, then quantized in place,
layer by layer (each dense weight is freed as its QuantLinear replaces it), and measured again.

Timing, per (variant, batch): a prompt of `--prompt-len` seeded random token ids, batch rows,
no padding. `model.generate(do_sample=False, min_new_tokens=n, max_new_tokens=n)` with the KV
cache, timed end to end (torch.cuda.synchronize before and after on CUDA), for n = 1 (the
prefill: one forward over the prompt that also yields the first new token) and for
n = `--new-tokens`; one warm-up call of each, then `--repeats` interleaved pairs, medians.
The difference of the medians is the time of the n − 1 cached decode steps (generate's own
per-call setup cancels out), so

    decode tok/s = batch · (new_tokens − 1) / (median full − median prefill)

(the first new token comes with the prefill, as in `compress bench`). "prefill ms" is the
median generate(max_new_tokens=1) time. Generate's per-step Python work (logits processors,
stopping criteria, cache bookkeeping) is part of decoding and is included: these are
eager-mode, end-to-end numbers, not kernel times (benchmarks/kernel.py has those).

On CUDA, "graph tok/s" times the decode step alone, without generate's Python: the prompt is
prefilled into a `transformers.StaticCache` (fixed shapes), one greedy step (forward, argmax,
next position, all in place) is captured as a CUDA graph, and `--new-tokens` replays are timed
between CUDA events, median of `--repeats`; tok/s = batch / seconds per step. That is the
number the kernels set; the eager column is what a plain `generate` user sees. Where capture
fails, the column says so and the reason is logged. On the CPU the same static-cache step
runs eagerly in the tests (tests/stages/test_bench_decode.py), checked against the model's
own logits, but is not timed.

Weights MB are the bytes of the model's parameters and buffers (tied tensors once; on the CPU
the int4 path also keeps a repacked copy of each weight on first use, not counted); peak GPU
MB is torch.cuda.max_memory_allocated over that row's calls (weights + KV cache +
activations).

Sanity, so that a fast but wrong kernel cannot pass unnoticed: "logit cos" is the quantized
model's worst per-row cosine similarity (logits centered) with the dense model's, on the whole
prompt's last position and on its first token alone (the prefill's and a decode step's matmul
shapes). A coarse check (tests/kernels/ tests the op itself): random Gaussian weights have no
structure for quantization to preserve and the error compounds over the layers, so RTN INT4
g128 measures about 0.96 on `tiny` and 0.71–0.84 on `llama-1b` (g32 0.78–0.88, INT8
per-channel 0.997; bf16 on the CPU, torch's packed path and dequantize → linear within 0.001
of each other), while a kernel that gets every layer wrong gives about 0 (0.07 on `tiny` with
every quantized layer's rows shifted by one).

    .venv/bin/python benchmarks/decode.py                       # llama-1b, cuda if present
    .venv/bin/python benchmarks/decode.py --preset tiny --device cpu --batch-sizes 1 2
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import logging
import math
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from torch import nn

from compress import cuda_ops
from compress.models import DTYPES, decoder_layers_prefix
from compress.quant.config import QuantizeConfig
from compress.quant.plan import preflight
from compress.quant.stage import quantize_model
from compress.registry import StageContext, StageResult

log = logging.getLogger("benchmarks.decode")

# LlamaConfig arguments per preset. llama-1b: Llama-3.2-1B's shapes (head_dim 64).
PRESETS: dict[str, dict] = {
    "llama-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    # Every in_features (256, 768) is a multiple of 128 and every out_features (256, 128, 768)
    # of 16, so group 128 applies everywhere and the CPU int4 path is the one exercised.
    "tiny": dict(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
}
DENSE_LABELS = {"float16": "FP16", "bfloat16": "BF16", "float32": "FP32"}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(preset: str, dtype: str, device: str | torch.device, seed: int = 0) -> nn.Module:
    """A random-weight LlamaForCausalLM of the preset's shapes, created on `device` in `dtype`
    (no float32 copy on the CPU first), in eval mode without gradients."""
    config = transformers.LlamaConfig(**PRESETS[preset], initializer_range=0.02, pad_token_id=0)
    torch.manual_seed(seed)
    with _default_dtype(DTYPES[dtype]), torch.device(device):
        model = transformers.LlamaForCausalLM(config)
    return model.eval().requires_grad_(False)


def quantize_linears(
    model: nn.Module,
    *,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = True,
    include_lm_head: bool = False,
    dtype: str,
) -> StageResult:
    """Replace the model's Linear layers with QuantLinear in place, as the quantize stage does
    (RTN): those inside the decoder layers, plus the lm_head when asked. Scales are stored in
    `dtype` (the activation dtype, which the CUDA kernels require)."""
    include = None
    if include_lm_head:
        names = {id(m): n for n, m in model.named_modules()}
        include = [decoder_layers_prefix(model) + ".*", names[id(model.get_output_embeddings())]]
    config = QuantizeConfig(bits=bits, group_size=group_size, symmetric=symmetric, include=include)
    preflight(model, config)
    return quantize_model(model, config, StageContext(dtype=dtype))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, tensors shared by several modules once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.numel() and tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class Row:
    model: str
    batch: int
    prefill_ms: float
    decode_tokens_per_s: float
    weights_bytes: int
    peak_gpu_bytes: int | None
    logit_cosine: float | None = None  # quantized rows: worst agreement with the dense model
    graph_tokens_per_s: float | None = None  # CUDA: the decode step replayed as a CUDA graph


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def timed_generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds for one greedy `generate` of exactly `new_tokens` tokens per row."""
    device = prompt.device
    _sync(device)
    start = time.perf_counter()
    out = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        min_new_tokens=new_tokens,
        max_new_tokens=new_tokens,
        use_cache=True,
        pad_token_id=0,
    )
    _sync(device)
    elapsed = time.perf_counter() - start
    expected = (prompt.shape[0], prompt.shape[1] + new_tokens)
    if tuple(out.shape) != expected:
        raise RuntimeError(f"generate returned {tuple(out.shape)}, expected {expected}")
    return elapsed


class StaticDecoder:
    """Greedy decoding one step at a time over a `transformers.StaticCache`, every tensor a
    step reads or writes fixed in place, so that `step()` can be captured as a CUDA graph.

    The constructor prefills the prompt; each `step()` feeds `token` (batch, 1) at `position`,
    writes the next greedy token into `token` and the step's last-position logits into
    `logits`, and advances `position`. `rewind()` goes back to the state after the prefill
    (the cache is overwritten from there on), so one capture serves every timed run."""

    @torch.inference_mode()
    def __init__(self, model: nn.Module, prompt: torch.Tensor, steps: int) -> None:
        self.model = model
        # transformers renamed the forward's cache argument (5.24 takes `cache`, and
        # deprecates `past_key_values`, which earlier releases take).
        forward_parameters = inspect.signature(model.forward).parameters
        self.cache_argument = "cache" if "cache" in forward_parameters else "past_key_values"
        self.prompt_len = prompt.shape[1]
        self.cache = transformers.StaticCache(
            config=model.config, max_cache_len=self.prompt_len + steps
        )
        positions = torch.arange(self.prompt_len, device=prompt.device)
        self.logits = self._forward(prompt, positions)
        self.token = self.logits.argmax(-1, keepdim=True)
        self.first_token = self.token.clone()
        self.position = torch.full((1,), self.prompt_len, device=prompt.device, dtype=torch.long)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=tokens, cache_position=positions, use_cache=True, logits_to_keep=1,
            **{self.cache_argument: self.cache},
        )  # fmt: skip
        return out.logits[:, -1]

    @torch.inference_mode()
    def step(self) -> None:
        self.logits.copy_(self._forward(self.token, self.position))
        self.token.copy_(self.logits.argmax(-1, keepdim=True))
        self.position.add_(1)

    @torch.inference_mode()
    def rewind(self) -> None:
        self.token.copy_(self.first_token)
        self.position.fill_(self.prompt_len)


@torch.inference_mode()
def capture_step(decoder: StaticDecoder) -> torch.cuda.CUDAGraph:
    """`decoder.step()` as a CUDA graph, after two eager warm-up steps on a side stream
    (handles and workspaces are made outside the capture); the decoder is then rewound, so
    the first replay is the first decode step. Raises RuntimeError where it cannot be
    captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        decoder.step()
        decoder.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decoder.step()
    decoder.rewind()
    return graph


@torch.inference_mode()
def graph_tokens_per_s(model: nn.Module, prompt: torch.Tensor, args: argparse.Namespace) -> float:
    """Decode tok/s of one greedy step captured as a CUDA graph and replayed (see the module
    docstring). Raises RuntimeError where the step cannot be captured."""
    decoder = StaticDecoder(model, prompt, args.new_tokens + 2)
    graph = capture_step(decoder)
    seconds = []
    for _ in range(args.repeats):
        decoder.rewind()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.new_tokens):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3 / args.new_tokens)
    return prompt.shape[0] / statistics.median(seconds)


def make_prompt(vocab: int, batch: int, args: argparse.Namespace, device: torch.device):
    """(batch, prompt_len) seeded random token ids: speed does not depend on what they say."""
    generator = torch.Generator().manual_seed(args.seed + batch)
    return torch.randint(0, vocab, (batch, args.prompt_len), generator=generator).to(device)


@torch.inference_mode()
def probe_logits(model: nn.Module, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 (batch, vocab) logits of the prompt's last position and of its first token
    alone: the matmuls of a prefill (batch·prompt_len rows) and of a decode step (batch rows),
    which take different kernels on CUDA (see compress.kernels.cuda_path)."""
    whole = model(input_ids=prompt, logits_to_keep=1).logits[:, -1]
    first = model(input_ids=prompt[:, :1], logits_to_keep=1).logits[:, -1]
    return whole.float(), first.float()


def centered_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each position's logits after removing their mean (softmax ignores
    a constant shift)."""
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return nn.functional.cosine_similarity(a, b, dim=-1)


def measure(model: nn.Module, label: str, prompt: torch.Tensor, args: argparse.Namespace) -> Row:
    device, batch = prompt.device, prompt.shape[0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed_generate(model, prompt, 1)  # warm-up: allocator, kernels, lazy CPU repacking
    timed_generate(model, prompt, args.new_tokens)
    prefill, full = [], []
    for _ in range(args.repeats):
        prefill.append(timed_generate(model, prompt, 1))
        full.append(timed_generate(model, prompt, args.new_tokens))
    prefill_s, full_s = statistics.median(prefill), statistics.median(full)
    decode_s = full_s - prefill_s
    tokens_per_s = batch * (args.new_tokens - 1) / decode_s if decode_s > 0 else math.nan
    graphed = None
    if device.type == "cuda":
        try:
            graphed = graph_tokens_per_s(model, prompt, args)
        except RuntimeError as error:  # the column says so; the reason goes to the log
            log.warning("%s batch %d: CUDA graph capture failed: %s", label, batch, error)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    log.info(
        "%s batch %d: prefill %.1f ms, generate %.1f ms, decode %.1f tok/s, graph %s tok/s",
        label,
        batch,
        1e3 * prefill_s,
        1e3 * full_s,
        tokens_per_s,
        "—" if graphed is None else f"{graphed:.1f}",
    )
    return Row(
        label, batch, 1e3 * prefill_s, tokens_per_s, weight_bytes(model), peak,
        graph_tokens_per_s=graphed,
    )  # fmt: skip


def render(rows: list[Row], header: list[str], dense_label: str, cuda: bool) -> str:
    dense = {r.batch: r for r in rows if r.model == dense_label}
    columns = ["model", "batch", "prefill ms", "decode tok/s", f"speedup vs {dense_label}"]
    if cuda:
        columns += ["graph tok/s", f"graph speedup vs {dense_label}"]
    columns += ["weights MB"] + (["peak GPU MB"] if cuda else [])
    columns += [f"logit cos vs {dense_label}"]
    lines = [*header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        speedup = r.decode_tokens_per_s / dense[r.batch].decode_tokens_per_s
        cells = [
            r.model,
            str(r.batch),
            f"{r.prefill_ms:.1f}",
            f"{r.decode_tokens_per_s:.1f}",
            f"{speedup:.2f}×",
        ]
        if cuda:
            graphed, dense_graphed = r.graph_tokens_per_s, dense[r.batch].graph_tokens_per_s
            cells.append("capture failed" if graphed is None else f"{graphed:.1f}")
            both = graphed is not None and dense_graphed is not None
            cells.append(f"{graphed / dense_graphed:.2f}×" if both else "—")
        cells.append(f"{r.weights_bytes / 1e6:.1f}")
        if cuda:
            cells.append(f"{(r.peak_gpu_bytes or 0) / 1e6:.0f}")
        cells.append("—" if r.logit_cosine is None else f"{r.logit_cosine:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-1b", choices=sorted(PRESETS))
    parser.add_argument("--dtype", default="float16", choices=sorted(DENSE_LABELS))
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8])
    parser.add_argument("--group-size", type=int, default=128, help="-1 = per channel")
    parser.add_argument("--asymmetric", action="store_true", help="store zero points")
    parser.add_argument("--quantize-lm-head", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the rows here as JSON")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the first comes with the prefill)")
    if args.prompt_len < 1 or args.repeats < 1 or min(args.batch_sizes) < 1:
        parser.error("--prompt-len, --repeats and --batch-sizes must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.stderr.write("--device cuda: no CUDA GPU is visible\n")
        return 2
    dense_label = DENSE_LABELS[args.dtype]
    granularity = "channel" if args.group_size == -1 else f"g{args.group_size}"
    quant_label = f"INT{args.bits} {granularity}" + (" asym" if args.asymmetric else "")

    log.info("building %s (%s) on %s", args.preset, args.dtype, device)
    model = build_model(args.preset, args.dtype, device, args.seed)
    params = sum(p.numel() for p in model.parameters())
    size = f"{params / 1e9:.2f} B" if params >= 1e9 else f"{params / 1e6:.1f} M"
    vocab = model.get_input_embeddings().num_embeddings
    prompts = {b: make_prompt(vocab, b, args, device) for b in args.batch_sizes}
    dense_logits = {b: probe_logits(model, prompt) for b, prompt in prompts.items()}
    rows = [measure(model, dense_label, prompt, args) for prompt in prompts.values()]

    result = quantize_linears(
        model,
        bits=args.bits,
        group_size=args.group_size,
        symmetric=not args.asymmetric,
        include_lm_head=args.quantize_lm_head,
        dtype=args.dtype,
    )
    log.info("%s", result.summary)
    if cuda:
        torch.cuda.empty_cache()
        kernels = cuda_ops.load()
        if not kernels:
            log.warning("cuda_ext kernels NOT loaded: QuantLinear runs the pure-PyTorch path")
        path = (
            "cuda_ext kernels loaded: yes"
            if kernels
            else "cuda_ext kernels loaded: **NO, pure-PyTorch fallback**"
        )
        device_name = torch.cuda.get_device_name(device)
    else:
        path = (
            "CPU: dequant_matmul's CPU path (torch's packed int4/int8 matmuls where they apply), "
            "no cuda_ext"
        )
        device_name = f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    for batch, prompt in prompts.items():
        row = measure(model, quant_label, prompt, args)
        pairs = zip(probe_logits(model, prompt), dense_logits[batch], strict=True)
        row.logit_cosine = min(centered_cosine(q, d).min().item() for q, d in pairs)
        rows.append(row)

    header = [
        f"## Greedy decode, {args.preset} ({size} parameters, random weights), "
        f"{dense_label} vs {quant_label} QuantLinear ({result.details['layers']} layers"
        f"{', lm_head included' if args.quantize_lm_head else ', lm_head dense'}); {path}",
        "",
        f"{device_name}, {datetime.date.today().isoformat()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, dtype {args.dtype}; prompt {args.prompt_len} "
        f"random tokens, {args.new_tokens} new tokens, KV cache, median of {args.repeats}. "
        f"decode tok/s = batch·(new tokens − 1) / (generate time − prefill time). "
        f"logit cos: the quantized model's worst centered cosine with the dense model's "
        f"logits on the prompt (prefill) and on its first token (decode-step shapes).",
    ]
    sys.stdout.write(render(rows, header, dense_label, cuda) + "\n")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
