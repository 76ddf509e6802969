"""Running an exported decoder with ONNX Runtime: prefill, cached decode steps, greedy tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import ArtifactError

MODEL_FILE = "model.onnx"
SIDECAR = "genai_config.json"


def session_options(threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return options


class OnnxCausalLM:
    """An export directory loaded into an InferenceSession, with the cache bookkeeping."""

    def __init__(
        self,
        directory: str | Path,
        *,
        providers: list[str] | None = None,
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        directory = Path(directory)
        sidecar = directory / SIDECAR
        if not sidecar.is_file():
            raise ArtifactError(f"{directory}: no {SIDECAR}; not an ONNX export of compress")
        decoder = json.loads(sidecar.read_text(encoding="utf-8"))["model"]["decoder"]
        self.num_layers = decoder["num_hidden_layers"]
        self.kv_heads = decoder["num_key_value_heads"]
        self.head_dim = decoder["head_size"]
        self.session = ort.InferenceSession(
            str(directory / decoder["filename"]),
            sess_options=session_options(threads),
            providers=providers or ["CPUExecutionProvider"],
        )
        self._present = [o.name for o in self.session.get_outputs()][1:]

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in range(2 * self.num_layers)]

    def forward(
        self, input_ids: np.ndarray, cache: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits (batch, tokens, vocab) for `input_ids` after the cached tokens, and the cache
        with them appended. Rows are unpadded: every row has the same length."""
        batch, tokens = input_ids.shape
        past = cache[0].shape[2]
        feeds: dict[str, np.ndarray] = {
            "input_ids": input_ids.astype(np.int64, copy=False),
            "attention_mask": np.ones((batch, past + tokens), dtype=np.int64),
        }
        for i in range(self.num_layers):
            feeds[f"past_key_values.{i}.key"] = cache[2 * i]
            feeds[f"past_key_values.{i}.value"] = cache[2 * i + 1]
        logits, *present = self.session.run(None, feeds)
        return logits, present

    def greedy(self, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
        """(batch, new_tokens) greedy tokens: the first from the prefill, one per cached step."""
        logits, cache = self.forward(prompt, self.empty_cache(prompt.shape[0]))
        tokens = [logits[:, -1:].argmax(-1)]
        for _ in range(new_tokens - 1):
            logits, cache = self.forward(tokens[-1], cache)
            tokens.append(logits[:, -1:].argmax(-1))
        return np.concatenate(tokens, axis=1)
