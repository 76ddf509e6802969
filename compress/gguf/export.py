"""`compress export ARTIFACT --format gguf --out DIR`: the artifact as one GGUF file for llama.cpp.

The directory (staged, then renamed into place; sealed with its own manifest):

    model.gguf       hyperparameters, tokenizer, chat template and every tensor
    config.json      the source model's, for reference
    manifest.json    sha256 of every file; `export` says from which artifact and how, with the
                     tensor types and the fp16 rounding of d and m (blocks.py)

Quantized layers keep their integer codes (blocks.py); tensors left in floating point keep the
artifact's dtype (F32 / F16 / BF16), 1-D tensors (norms, biases) are F32 as llama.cpp expects.
Everything is planned and checked first (names, block formats, tokenizer), so what GGUF cannot
hold is refused, naming the layer, before a byte is written; tensors are then converted and
written one at a time, so memory stays at one layer.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from compress.artifact import (
    PACKED_FORMAT,
    REPORT_FILES,
    WEIGHTS,
    layer_specs,
    seal_manifest,
)
from compress.errors import ArtifactError
from compress.export import export_manifest, verified_source
from compress.fileio import staging_dir
from compress.gguf.blocks import (
    BLOCK,
    BlockFormat,
    RoundingError,
    block_format,
    encode_blocks,
    rounding_error,
)
from compress.gguf.layout import (
    Family,
    arch_name,
    check_expressible,
    family_of,
    float_tensor,
    gguf_tensor_name,
    llama3_rope_factors,
    row_transform,
    write_hparams,
)
from compress.gguf.vocab import Vocabulary, read_vocabulary, write_vocabulary
from compress.quant.packing import unpack_weight, unpack_zero_points
from compress.quant.primitives import QParams, QuantSpec, dequantize

log = logging.getLogger(__name__)

GGUF_FILE = "model.gguf"
_FILE_TYPES = {
    BlockFormat.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    BlockFormat.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    BlockFormat.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}
_FLOAT_TYPES = {
    torch.float32: gguf.GGMLQuantizationType.F32,
    torch.float16: gguf.GGMLQuantizationType.F16,
    torch.bfloat16: gguf.GGMLQuantizationType.BF16,
}


@dataclass
class TensorJob:
    """One GGUF tensor: where it comes from, what it will be, and how to make its bytes."""

    name: str  # GGUF name
    source: str  # the artifact's tensor or layer it is made from
    ggml_type: gguf.GGMLQuantizationType
    byte_shape: tuple[int, ...]  # of the uint8 / float array `make` returns
    np_dtype: type
    make: Callable[[], tuple[np.ndarray, RoundingError | None]]  # bytes, and d/m rounding

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.byte_shape)) * np.dtype(self.np_dtype).itemsize


@dataclass
class QuantizedLayer:
    """A quantized Linear as stored: unpacked codes, scales, zero points."""

    codes: torch.Tensor  # (N, K) int32
    scale: torch.Tensor  # (N, G)
    zero: torch.Tensor  # (N, G) int32
    spec: QuantSpec


def _read_layer(tensors: Any, layer: str, spec: QuantSpec) -> QuantizedLayer:
    out_features, in_features = tensors.get_tensor(f"{layer}.weight_shape").tolist()
    codes = unpack_weight(tensors.get_tensor(f"{layer}.weight_packed"), spec.bits, in_features)
    scale = tensors.get_tensor(f"{layer}.weight_scale")
    if spec.symmetric:
        zero = torch.full(scale.shape, spec.mid, dtype=torch.int32)
    else:
        packed = tensors.get_tensor(f"{layer}.weight_zero_point")
        zero = unpack_zero_points(packed, spec.bits, out_features)
    return QuantizedLayer(codes=codes, scale=scale, zero=zero, spec=spec)


def _rows_through(
    layer: QuantizedLayer, rows: Callable[[torch.Tensor], torch.Tensor]
) -> QuantizedLayer:
    """The layer with its output rows reordered (codes, scales and zero points alike)."""
    return QuantizedLayer(rows(layer.codes), rows(layer.scale), rows(layer.zero), layer.spec)


def _quantized_job(
    name: str,
    layer: str,
    shape: tuple[int, int],
    fmt: BlockFormat,
    load: Callable[[], QuantizedLayer],
) -> TensorJob:
    n, k = shape

    def make() -> tuple[np.ndarray, RoundingError]:
        q = load()
        blocks = encode_blocks(q.codes, q.scale, q.zero, q.spec)
        return blocks.data, rounding_error(q.codes, q.scale, q.zero, q.spec)

    return TensorJob(
        name=name,
        source=layer,
        ggml_type=gguf.GGMLQuantizationType[fmt.value],
        byte_shape=(n, k // BLOCK * fmt.bytes_per_block),
        np_dtype=np.uint8,
        make=make,
    )


def _float_job(
    name: str, source: str, shape: list[int], dtype: torch.dtype, load: Callable[[], torch.Tensor]
) -> TensorJob:
    """A float tensor: 1-D (norms, biases) as F32, 2-D in its own dtype (BF16 as raw bytes)."""
    out_dtype = torch.float32 if len(shape) == 1 else dtype
    ggml_type = _FLOAT_TYPES[out_dtype]

    def make() -> tuple[np.ndarray, None]:
        tensor = load().to(out_dtype).contiguous()
        if out_dtype == torch.bfloat16:
            return tensor.view(torch.uint8).numpy(), None
        return tensor.numpy(), None

    if ggml_type == gguf.GGMLQuantizationType.BF16:
        byte_shape, np_dtype = (*shape[:-1], shape[-1] * 2), np.uint8
    else:
        byte_shape, np_dtype = tuple(shape), np.dtype(str(out_dtype).removeprefix("torch.")).type
    return TensorJob(name, source, ggml_type, byte_shape, np_dtype, make)


def _embeddings_are_head(handle: Any, spec: QuantSpec) -> bool:
    """Whether the stored embeddings are exactly the quantized head's dequantized table: the
    quantize stage makes them so for a tied head (and unties the config, since the head is no
    longer a plain weight). Then the GGUF holds the table once, as `token_embd` in the head's
    blocks, and llama.cpp uses it at both ends, as it does for any tied model."""
    key = "model.embed_tokens.weight"
    if key not in set(handle.keys()):
        return False
    table = handle.get_tensor(key)
    head = _read_layer(handle, "lm_head", spec)
    if table.shape != head.codes.shape:
        return False
    qparams = QParams(scale=head.scale, zero=head.zero)
    return torch.equal(dequantize(head.codes, qparams, spec, dtype=table.dtype), table)


def plan_tensors(
    handle: Any, weights: Path, config: Any, family: Family, specs: dict[str, QuantSpec]
) -> list[TensorJob]:
    """Every GGUF tensor of the open safetensors `handle` (the artifact's `weights`), checked:
    refuses (naming the layer) what GGUF cannot hold. The jobs read from `handle` when made."""
    keys = list(handle.keys())
    name_map = gguf.get_tensor_name_map(family.arch, config.num_hidden_layers)
    shared = "lm_head" in specs and _embeddings_are_head(handle, specs["lm_head"])
    tied = shared or bool(getattr(config, "tie_word_embeddings", False))
    jobs: list[TensorJob] = []

    def named(hf_name: str) -> str:
        if tied and hf_name.startswith("lm_head."):
            hf_name = "model.embed_tokens." + hf_name.removeprefix("lm_head.")
        mapped = gguf_tensor_name(name_map, hf_name)
        if mapped is None:
            raise ArtifactError(
                f"{weights}: tensor {hf_name} has no name in llama.cpp's {arch_name(family)} layout"
            )
        return mapped

    for layer, spec in specs.items():
        n, k = handle.get_tensor(f"{layer}.weight_shape").tolist()
        fmt = block_format(spec, k)
        if not isinstance(fmt, BlockFormat):
            raise ArtifactError(f"{weights}: layer {layer} ({spec.bits}-bit): {fmt}")
        rows = row_transform(config, family, layer)

        def load(layer: str = layer, spec: QuantSpec = spec, rows=rows) -> QuantizedLayer:
            return _rows_through(_read_layer(handle, layer, spec), rows)

        jobs.append(_quantized_job(named(f"{layer}.weight"), layer, (n, k), fmt, load))

    quantized_prefixes = tuple(f"{layer}." for layer in specs)
    for key in keys:
        if key.startswith(quantized_prefixes) and not key.endswith(".bias"):
            continue
        if key == "model.embed_tokens.weight" and shared:
            continue  # the tied table is written once, from the head's quantized blocks
        if key == "lm_head.weight" and tied:
            continue
        slice_ = handle.get_slice(key)
        shape = list(slice_.get_shape())
        rows = row_transform(config, family, key.rsplit(".", 1)[0])

        def load(key: str = key, rows=rows) -> torch.Tensor:
            return rows(float_tensor(key, handle.get_tensor(key), family))

        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(
            slice_.get_dtype()
        )
        if dtype is None:
            raise ArtifactError(f"{weights}: tensor {key} is {slice_.get_dtype()}, not a float")
        jobs.append(_float_job(named(key), key, shape, dtype, load))

    factors = llama3_rope_factors(config)
    if factors is not None:
        jobs.append(
            TensorJob(
                "rope_freqs.weight",
                "rope_parameters (llama3)",
                gguf.GGMLQuantizationType.F32,
                factors.shape,
                np.float32,
                lambda: (factors, None),
            )
        )
    return jobs


def _file_type(jobs: list[TensorJob]) -> gguf.LlamaFileType:
    """The most common 2-D weight type, as llama.cpp's `general.file_type` names it."""
    counts = Counter(j.ggml_type for j in jobs if len(j.byte_shape) == 2)
    if not counts:
        return gguf.LlamaFileType.ALL_F32
    top = counts.most_common(1)[0][0]
    for fmt, file_type in _FILE_TYPES.items():
        if top.name == fmt.value:
            return file_type
    return {
        gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
        gguf.GGMLQuantizationType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    }.get(top, gguf.LlamaFileType.ALL_F32)


def _summarize_rounding(errors: dict[str, RoundingError]) -> dict[str, Any]:
    count = sum(e.count for e in errors.values())
    worst = max(errors, key=lambda k: errors[k].max_steps) if errors else None
    return {
        "max_steps": max((e.max_steps for e in errors.values()), default=0.0),
        "mean_steps": sum(e.mean_steps * e.count for e in errors.values()) / max(count, 1),
        "changed_weights": sum(e.changed for e in errors.values()),
        "weights": count,
        "worst_layer": worst,
        "bit_exact": all(e.changed == 0 for e in errors.values()),
    }


def write_gguf(
    path: Path,
    config: Any,
    family: Family,
    jobs: list[TensorJob],
    vocabulary: Vocabulary,
    tokenizer: Any,
    name: str,
) -> dict[str, Any]:
    """Header, metadata and tensors, one tensor in memory at a time; returns the rounding
    summary of d and m."""
    writer = gguf.GGUFWriter(path, arch_name(family))
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(_file_type(jobs))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_hparams(writer, config, family, len(vocabulary.tokens))
    write_vocabulary(writer, vocabulary, tokenizer)
    for job in jobs:
        writer.add_tensor_info(
            job.name, job.byte_shape, np.dtype(job.np_dtype), job.nbytes, raw_dtype=job.ggml_type
        )
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    errors: dict[str, RoundingError] = {}
    for job in tqdm(jobs, desc="writing GGUF tensors", unit="tensor"):
        data, error = job.make()
        if data.shape != job.byte_shape:
            raise AssertionError(f"{job.source}: made {data.shape}, planned {job.byte_shape}")
        writer.write_tensor_data(data)
        if error is not None:
            errors[job.source] = error
    writer.close()
    return _summarize_rounding(errors)


def _tokenizer(source: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{source}: the artifact's tokenizer does not load: {exc}") from None


def export_gguf(
    source: Path,
    destination: Path,
    *,
    tokenizer_pre: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Verify the artifact, plan and check every tensor and the vocabulary, then write."""
    from transformers import AutoConfig

    manifest = verified_source(source, destination, overwrite=overwrite)
    raw_config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    qconfig = raw_config.get("quantization_config") or {}
    if qconfig and qconfig.get("format") != PACKED_FORMAT:
        raise ArtifactError(
            f"{source / 'config.json'}: quantization_config.format is not {PACKED_FORMAT!r}"
        )
    config = AutoConfig.from_pretrained(source)
    where = str(source / "config.json")
    family = family_of(config, where)
    check_expressible(config, family, where)
    tokenizer = _tokenizer(source)
    vocabulary = read_vocabulary(source, tokenizer, int(config.vocab_size), pre=tokenizer_pre)
    name = str(manifest.get("name") or raw_config.get("_name_or_path") or source.name)
    weights = source / WEIGHTS
    with safe_open(str(weights), framework="pt") as handle:
        names = handle.keys()
        layers = [k.removesuffix(".weight_packed") for k in names if k.endswith(".weight_packed")]
        specs = layer_specs(qconfig, layers) if qconfig else {}
        jobs = plan_tensors(handle, weights, config, family, specs)  # refusals: nothing written
        with staging_dir(destination) as tmp:
            rounding = write_gguf(
                tmp / GGUF_FILE, config, family, jobs, vocabulary, tokenizer, name
            )
            (tmp / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n", "utf-8")
            for report in REPORT_FILES:
                if (source / report).is_file():
                    shutil.copy2(source / report, tmp / report)
            types = Counter(job.ggml_type.name for job in jobs)
            fields = export_manifest(
                source,
                manifest,
                "gguf",
                architecture=arch_name(family),
                tensor_types=dict(sorted(types.items())),
                tokenizer={"model": vocabulary.model, "pre": vocabulary.pre},
                fp16_rounding=rounding,
                gguf_bytes=(tmp / GGUF_FILE).stat().st_size,
            )
            seal_manifest(tmp, fields)
    log.info(
        "exported %s as GGUF (%s) to %s: %.1f MB, %s; d/m fp16 rounding: max %.2e, mean %.2e "
        "steps (%s)",
        source,
        arch_name(family),
        destination,
        fields["export"]["gguf_bytes"] / 1e6,
        ", ".join(f"{n} {t}" for t, n in sorted(types.items())),
        rounding["max_steps"],
        rounding["mean_steps"],
        "bit-exact" if rounding["bit_exact"] else f"{rounding['changed_weights']} weights moved",
    )
    return destination
