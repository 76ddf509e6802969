"""Run a GGUF file in llama.cpp (through llama-cpp-python): speed, greedy tokens, logits.

A reference runtime, not part of the ``compress`` package, and it must not import it: it runs in
the benchmark virtualenv ``scripts/build_llama_cpp.sh`` builds (``.venv-llama``), which holds
llama-cpp-python compiled for this CPU and numpy, nothing else. ``benchmarks/gguf_export.py``
calls it as::

    .venv-llama/bin/python benchmarks/_llama_cpp_driver.py --model model.gguf \\
        --prompt prompt.npy --new-tokens 64 --repeats 5 --threads 2 --out result.json \\
        [--greedy-prompt text.npy] [--windows windows.npy --logits-dir DIR]

Speed is measured as ``compress bench`` measures torch and ONNX Runtime: the prompt (int64 ids,
shape (1, P)) is evaluated in one batch (prefill), then ``new_tokens - 1`` cached greedy steps
(the first new token comes from the prefill); one warm-up run, then the median of ``repeats``.
``--greedy-prompt`` also returns the greedy tokens of another prompt (a real text: a random
prompt's next-token distributions are flat, and greedy paths split on near-ties). With
``--windows`` (int64, (W, T)), each window's logits for every position are written to
``DIR/window_<i>.npy`` (float32, (T, vocab)) for the caller's KL.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import llama_cpp
import numpy as np


def _memory_kib(field: str) -> int:
    """VmRSS / VmHWM of this process in KiB. Not getrusage's ru_maxrss: a child keeps its
    parent's high-water mark across fork and exec, which hides the model's own memory."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _last_logits(llm: llama_cpp.Llama) -> np.ndarray:
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def timed_greedy(llm: llama_cpp.Llama, prompt: list[int], new_tokens: int):
    """(prefill seconds, decode seconds, the new_tokens greedy ids)."""
    llm.reset()
    llm._ctx.kv_cache_clear()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - start
    tokens = [int(_last_logits(llm).argmax())]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([tokens[-1]])
        tokens.append(int(_last_logits(llm).argmax()))
    decode = time.perf_counter() - start
    return prefill, decode, tokens


def window_logits(path: str, windows: np.ndarray, threads: int, out: Path) -> None:
    length = windows.shape[1]
    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=length,
        n_batch=length,
        n_ubatch=length,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
        verbose=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    for index, window in enumerate(windows):
        llm.reset()
        llm._ctx.kv_cache_clear()
        llm.eval(window.tolist())
        np.save(out / f"window_{index}.npy", np.asarray(llm.scores[:length], dtype=np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt", required=True, help=".npy of int64 ids, shape (1, P)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--greedy-prompt", help=".npy of int64 ids, shape (1, P): greedy tokens")
    parser.add_argument("--windows", help=".npy of int64 ids, shape (W, T)")
    parser.add_argument("--logits-dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    before = _memory_kib("VmRSS") * 1024
    prompt = np.load(args.prompt)[0].tolist()
    longest = max(len(prompt), np.load(args.greedy_prompt).shape[1] if args.greedy_prompt else 0)
    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=longest + args.new_tokens,
        n_batch=longest,
        n_ubatch=longest,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    timed_greedy(llm, prompt, args.new_tokens)  # warm-up
    runs = [timed_greedy(llm, prompt, args.new_tokens) for _ in range(args.repeats)]
    peak = _memory_kib("VmHWM") * 1024
    result = {
        "prefill_tokens_per_s": len(prompt) / statistics.median(r[0] for r in runs),
        "decode_tokens_per_s": (args.new_tokens - 1) / statistics.median(r[1] for r in runs),
        "peak_rss_increase_bytes": peak - before,
        "tokens": runs[-1][2],
        "greedy_tokens": (
            timed_greedy(llm, np.load(args.greedy_prompt)[0].tolist(), args.new_tokens)[2]
            if args.greedy_prompt
            else None
        ),
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode(),
    }
    del llm
    if args.windows:
        window_logits(args.model, np.load(args.windows), args.threads, args.logits_dir)
    args.out.write_text(json.dumps(result) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
