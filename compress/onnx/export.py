"""`compress export ARTIFACT --format onnx --out DIR`: an ONNX Runtime model of an artifact.

The directory (staged, then renamed into place; sealed with its own manifest):

    model.onnx            the decoder (graph.py), KV cache in and out
    model.onnx.data       the weights, when they exceed protobuf's 2 GB limit
    genai_config.json     onnxruntime-genai's sidecar: inputs, outputs, heads, tokens, search
    tokenizer files, generation_config.json, config.json (the source model's, for reference)
    manifest.json         sha256 of every file; `export` says from which artifact and how
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from compress.artifact import (
    MANIFEST,
    PACKED_FORMAT,
    REPORT_FILES,
    WEIGHTS,
    load_artifact,
    seal_manifest,
)
from compress.errors import ArtifactError, BadInputError
from compress.export import export_manifest, verified_source
from compress.fileio import staging_dir
from compress.onnx.graph import (
    OPSET,
    ExportOptions,
    build_decoder,
    check_exportable,
    check_exportable_config,
)
from compress.onnx.runtime import MODEL_FILE, SIDECAR

log = logging.getLogger(__name__)

EXTERNAL_DATA = MODEL_FILE + ".data"
PROTOBUF_LIMIT_BYTES = 2**31 - 2**24  # 2 GB less headroom for the graph itself
DEFAULT_CONTEXT_LENGTH = 4096
# onnxruntime-genai picks its decoder class by `type` and refuses types it does not list; where
# it lists no class for a family, the name of one whose decoder interface (inputs, outputs,
# cache) is the same as the graph's, which is all genai reads.
GENAI_TYPES = {"olmo2": "olmo"}
# Everything in the artifact except its weights travels with the export.
_NOT_COPIED = {WEIGHTS, MANIFEST, "config.json", *REPORT_FILES}


def genai_config(model: nn.Module, context_length: int) -> dict[str, Any]:
    """onnxruntime-genai's `genai_config.json` for the graph `build_decoder` writes."""
    config = model.config
    generation = getattr(model, "generation_config", None)
    eos = config.eos_token_id if config.eos_token_id is not None else 0
    return {
        "model": {
            "bos_token_id": config.bos_token_id,
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": model.model.layers[0].self_attn.head_dim,
                "hidden_size": config.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": config.num_hidden_layers,
                "num_key_value_heads": config.num_key_value_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": config.pad_token_id if config.pad_token_id is not None else eos,
            "type": GENAI_TYPES.get(config.model_type, config.model_type),
            "vocab_size": config.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": bool(getattr(generation, "do_sample", False)),
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": float(getattr(generation, "repetition_penalty", None) or 1.0),
            "temperature": float(getattr(generation, "temperature", None) or 1.0),
            "top_k": int(getattr(generation, "top_k", None) or 50),
            "top_p": float(getattr(generation, "top_p", None) or 1.0),
        },
    }


def _transformers_config(source: Path) -> Any:
    """The artifact's config.json as transformers reads it (its architecture's defaults filled)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactError(
            f"{source / 'config.json'}: not a config transformers reads: {exc}"
        ) from None


def write_onnx_model(
    model: nn.Module,
    directory: Path,
    options: ExportOptions,
    *,
    external_data_above: int = PROTOBUF_LIMIT_BYTES,
) -> dict[str, Any]:
    """model.onnx (+ model.onnx.data when the weights exceed `external_data_above` bytes) and
    genai_config.json into `directory`; returns what the manifest records about the graph."""
    import onnx

    check_exportable(model, options)
    proto = build_decoder(model, options)
    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    external = weight_bytes > external_data_above
    onnx.save_model(
        proto,
        str(directory / MODEL_FILE),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=EXTERNAL_DATA,
        size_threshold=1024,
    )
    config = genai_config(model, options.context_length)
    (directory / SIDECAR).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {
        "opset": OPSET,
        "accuracy_level": options.accuracy_level,
        "context_length": options.context_length,
        "external_data": external,
        "weight_bytes": weight_bytes,
        "ops": ops,
    }


def export_onnx(
    source: Path,
    destination: Path,
    *,
    accuracy_level: int = 4,
    context_length: int | None = None,
    overwrite: bool = False,
    external_data_above: int = PROTOBUF_LIMIT_BYTES,
) -> Path:
    """Verify the artifact, check that the graph can express it, then write the export."""
    manifest = verified_source(source, destination, overwrite=overwrite)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    qconfig = config.get("quantization_config") or {}
    if qconfig.get("format") != PACKED_FORMAT:
        raise ArtifactError(
            f"{source / 'config.json'}: the artifact is not quantized (no {PACKED_FORMAT!r} "
            "quantization_config); the ONNX export writes quantized layers as MatMulNBits"
        )
    max_positions = int(config.get("max_position_embeddings") or DEFAULT_CONTEXT_LENGTH)
    length = context_length or min(max_positions, DEFAULT_CONTEXT_LENGTH)
    if not 0 < length <= max_positions:
        raise BadInputError(
            f"--context-length {length}: must be in 1..{max_positions} (max_position_embeddings)"
        )
    # What the graph cannot express is refused from config.json, before the weights load.
    check_exportable_config(_transformers_config(source), length)
    model, _ = load_artifact(source, verify=False, with_tokenizer=False)
    options = ExportOptions(context_length=length, accuracy_level=accuracy_level)
    check_exportable(model, options)  # before the staging directory exists

    with staging_dir(destination) as tmp:
        graph = write_onnx_model(model, tmp, options, external_data_above=external_data_above)
        for name in manifest["files"]:
            if name not in _NOT_COPIED:
                shutil.copy2(source / name, tmp / name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        seal_manifest(tmp, export_manifest(source, manifest, "onnx", **graph))
    log.info(
        "exported %s as ONNX to %s (%.1f MB of weights, accuracy_level %d)",
        source,
        destination,
        graph["weight_bytes"] / 1e6,
        accuracy_level,
    )
    return destination
