"""Token windows from text: random ones for calibration, consecutive ones for evaluation.

A text source is a local UTF-8 file, or a Hugging Face dataset written as
`hf:<dataset_id>[:<config>]:<split>[:<column>]` (see `parse_hf_spec`), whose rows are joined
with blank lines into one text.

The whole text is tokenized once, as one stream, and windows are cut from that stream:

- `token_windows` (calibration) draws `num_samples` windows at seeded random, *non-overlapping*
  offsets. Non-overlapping because overlapping windows repeat the same activations, so the
  calibration set would hold fewer distinct tokens than its size says; random because the
  start of a text (one article) is not representative of the rest.
- `evaluation_windows` (perplexity, KL divergence) takes consecutive windows from the start:
  the standard fixed-length perplexity protocol, fully determined by the text and `seq_len`.

Windows follow the model's own convention, as lm-eval and llama.cpp's perplexity do. The text
is tokenized without special tokens, and where the tokenizer puts BOS in front of text in use
(`window_bos`), every window is BOS followed by `seq_len - 1` text tokens: a model trained with
BOS (Gemma, Llama 3, Mistral, Phi) treats a sequence without it as out of distribution (a
Gemma-family checkpoint scored perplexity 46.0 with BOS and 139.9 without on the same 511
WikiText tokens), and GPTQ's Hessians and the distillation loss must see the activations the
model sees in use, BOS's attention sink included. Every position is scored the same way in both
conventions (position t predicts token t + 1): with BOS, the first text token is predicted
from BOS alone. Where the tokenizer adds no BOS (SmolLM2, Qwen), windows are text tokens only.
Baseline and compressed model always see identical windows.

Asking for more tokens than the source holds is a `DataError` that states both counts, never a
silently smaller set.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from compress.errors import BadInputError, DataError
from compress.fileio import user_path
from compress.recipe import CalibrationConfig

log = logging.getLogger(__name__)

HF_PREFIX = "hf:"
DEFAULT_COLUMN = "text"
ROW_SEPARATOR = "\n\n"
CALIBRATION_FIELD = "calibration.path"

# Split on ":" except inside brackets, so split slices such as `train[:1000]` stay whole.
_SPEC_SEPARATOR = re.compile(r":(?![^\[]*\])")


@dataclass(frozen=True)
class HFSource:
    """A parsed `hf:` source: the arguments of `datasets.load_dataset` plus the text column."""

    dataset: str
    config: str | None
    split: str
    column: str = DEFAULT_COLUMN


def parse_hf_spec(source: str, *, field: str = CALIBRATION_FIELD) -> HFSource:
    """`hf:<dataset_id>[:<config>]:<split>[:<column>]` → `HFSource`.

    Two fields are `id:split`; three are `id:config:split`; four are `id:config:split:column`.
    (Three fields are read as config + split, not split + column: `hf:wikitext:<config>:<split>`
    is the common case.) A dataset without configs that needs a column leaves the config empty:
    `hf:<id>::<split>:<column>`. Colons inside a split slice (`train[:1000]`) are kept.
    """
    if not source.startswith(HF_PREFIX):
        raise DataError(f"{field}: {source!r} is not an `hf:` source")
    parts = _SPEC_SEPARATOR.split(source.removeprefix(HF_PREFIX))
    if not 2 <= len(parts) <= 4:
        raise DataError(
            f"{field}: {source!r}: expected `hf:<dataset_id>[:<config>]:<split>[:<column>]`, "
            f"e.g. `hf:wikitext:wikitext-2-raw-v1:validation:text`"
        )
    dataset, *rest = parts
    config, split, column = (
        (None, rest[0], DEFAULT_COLUMN)
        if len(rest) == 1
        else (rest[0] or None, rest[1], rest[2] if len(rest) == 3 else DEFAULT_COLUMN)
    )
    if not dataset or not split or not column:
        raise DataError(
            f"{field}: {source!r}: the dataset id, split and column must not be empty "
            f"(only the config may be, as in `hf:<id>::<split>:<column>`)"
        )
    return HFSource(dataset=dataset, config=config, split=split, column=column)


def _join_rows(rows: list[Any], describe: str, field: str) -> str:
    """Rows of one text column → one text; empty rows are dropped (not counted as text)."""
    bad = next((r for r in rows if r is not None and not isinstance(r, str)), None)
    if bad is not None:
        raise DataError(f"{field}: {describe}: the column holds {type(bad).__name__}, not text")
    return ROW_SEPARATOR.join(r for r in rows if r)


def _load_hf_text(spec: HFSource, source: str, field: str) -> str:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{field}: {source!r} needs the `datasets` package (pip install 'compress[eval]')"
        ) from None
    try:
        table = datasets.load_dataset(spec.dataset, spec.config, split=spec.split)
    except Exception as exc:  # network, unknown id/config/split: all mean "cannot get the data"
        raise DataError(f"{field}: cannot load {source!r}: {type(exc).__name__}: {exc}") from exc
    if spec.column not in table.column_names:
        raise DataError(
            f"{field}: {source!r}: no column {spec.column!r}; columns: {table.column_names}"
        )
    return _join_rows(table[spec.column], repr(source), field)


def load_text(source: str, *, field: str = CALIBRATION_FIELD) -> str:
    """The text of a local UTF-8 file or an `hf:` dataset spec; errors name `field` and source."""
    if source.startswith(HF_PREFIX):
        text = _load_hf_text(parse_hf_spec(source, field=field), source, field)
    else:
        check_text_source(source, field=field)
        path = user_path(source, field=field)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{field}: {source} is not UTF-8 text ({exc})") from None
    if not text.strip():
        raise DataError(f"{field}: {source} holds no text")
    return text


def window_bos(tokenizer: Any) -> int | None:
    """BOS's id when the tokenizer puts it in front of text in use, else None.

    Asked of the tokenizer itself, by encoding a short text with special tokens on, rather than
    of `add_bos_token`: not every tokenizer class has that flag, and the encoding is what lm-eval
    and a serving stack will feed the model.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def describe_windows(tokenizer: Any) -> dict[str, Any]:
    """The window convention as the report states it."""
    bos = window_bos(tokenizer)
    token = None if bos is None else tokenizer.convert_ids_to_tokens(bos)
    return {"starts_with_bos": bos is not None, "bos_token_id": bos, "bos_token": token}


def _text_tokens_per_window(seq_len: int, bos: int | None) -> int:
    length = seq_len - (bos is not None)
    if length < 1:
        raise DataError(f"seq_len {seq_len} leaves no room for text after the tokenizer's BOS")
    return length


def _with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """(N, L) text windows → (N, L + 1) with BOS in front, or unchanged without BOS."""
    if bos is None:
        return windows
    return torch.cat([torch.full((len(windows), 1), bos, dtype=windows.dtype), windows], dim=1)


def tokenize(text: str, tokenizer: Any) -> torch.Tensor:
    """The whole text as one int64 token stream, without special tokens (module docstring)."""
    # verbose=False: the stream is longer than the model's context on purpose; do not warn.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


def non_overlapping_offsets(
    available: int, num_windows: int, seq_len: int, seed: int
) -> np.ndarray:
    """`num_windows` start offsets of non-overlapping `seq_len` windows in `available` tokens.

    Uniform over all placements: with `slack = available - num_windows * seq_len` spare tokens,
    a placement is a choice of how the slack is spread into the num_windows + 1 gaps, i.e. a
    choice of num_windows sorted positions `c_i` among `slack + num_windows` ("stars and bars");
    window i starts at `c_i + i * (seq_len - 1)`. Returned in a seeded random order, so any
    prefix of the windows is itself spread over the whole text.
    """
    slack = available - num_windows * seq_len
    if slack < 0:
        raise ValueError("not enough tokens")  # callers check first, with a better message
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(slack + num_windows, size=num_windows, replace=False))
    offsets = chosen + np.arange(num_windows) * (seq_len - 1)
    return offsets[rng.permutation(num_windows)]


def _cut(tokens: torch.Tensor, offsets: np.ndarray | torch.Tensor, seq_len: int) -> torch.Tensor:
    starts = torch.as_tensor(offsets, dtype=torch.int64)
    return tokens[starts[:, None] + torch.arange(seq_len)]


def token_windows(
    text: str,
    tokenizer: Any,
    num_samples: int,
    seq_len: int,
    seed: int,
    *,
    source: str = "the text",
) -> torch.Tensor:
    """`(num_samples, seq_len)` int64 windows at seeded random, non-overlapping offsets.

    The same (text, tokenizer, seed) gives the same windows; another seed gives others (as long
    as the text has tokens to spare). With a BOS tokenizer each window is BOS + `seq_len - 1`
    text tokens (module docstring). `source` only names the text in error messages.
    """
    _check_positive(num_samples=num_samples, seq_len=seq_len)
    bos = window_bos(tokenizer)
    length = _text_tokens_per_window(seq_len, bos)
    tokens = tokenize(text, tokenizer)
    requested = num_samples * length
    if requested > tokens.numel():
        raise DataError(
            f"{source} holds {tokens.numel():,} tokens; {num_samples} non-overlapping windows of "
            f"{length} text tokens need {requested:,}. Lower num_samples or seq_len, or use a "
            f"longer text"
        )
    offsets = non_overlapping_offsets(tokens.numel(), num_samples, length, seed)
    log.info(
        "%d windows × %d tokens drawn (seed %d) from %s (%s tokens)%s",
        num_samples,
        seq_len,
        seed,
        source,
        f"{tokens.numel():,}",
        "" if bos is None else ", each starting with BOS",
    )
    return _with_bos(_cut(tokens, offsets, length), bos)


def check_text_source(source: str, *, field: str = CALIBRATION_FIELD) -> None:
    """The cheap check before any model loads: the file exists, or the `hf:` spec parses.

    An `hf:` dataset is not fetched here (that is the slow part, and needs the network);
    `load_text` reports a dataset that cannot be loaded.
    """
    if source.startswith(HF_PREFIX):
        parse_hf_spec(source, field=field)
    elif not user_path(source, field=field).is_file():
        raise DataError(f"{field}: {source} does not exist or is not a file")


def check_calibration_source(cfg: CalibrationConfig) -> None:
    """`check_text_source` for the recipe's `calibration.path`, and its device."""
    check_text_source(cfg.path, field=CALIBRATION_FIELD)
    calibration_device(cfg.device)


def calibration_device(spec: str, field: str = "calibration.device") -> torch.device:
    """A device setting (`auto|cpu|cuda[:N]`) → a device this machine has (`auto`: cuda if
    available); `field` names the setting in errors."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInputError(
                f"{field}: {spec!r}, but torch {torch.__version__} sees no CUDA "
                "device here; use cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BadInputError(
                f"{field}: {spec!r}, but only {torch.cuda.device_count()} CUDA "
                "device(s) are visible"
            )
    return device


def calibration_batches(cfg: CalibrationConfig, tokenizer: Any) -> torch.Tensor:
    """The recipe's calibration set: `(cfg.num_samples, cfg.seq_len)` int64 token windows."""
    text = load_text(cfg.path, field=CALIBRATION_FIELD)
    try:
        return token_windows(
            text, tokenizer, cfg.num_samples, cfg.seq_len, cfg.seed, source=cfg.path
        )
    except DataError as exc:
        raise DataError(f"calibration: {exc}") from None


def evaluation_windows(
    text: str, tokenizer: Any, seq_len: int, max_windows: int | None = None
) -> torch.Tensor:
    """Consecutive non-overlapping `seq_len` windows from the start of the text: `(N, seq_len)`.

    The standard fixed-length perplexity protocol, deterministic; with a BOS tokenizer each
    window is BOS + `seq_len - 1` consecutive text tokens (module docstring). The tail shorter
    than one window is dropped. `max_windows` caps N; a text with fewer full windows gives fewer
    (logged as a warning), and a text shorter than one window is a `DataError`.
    """
    _check_positive(seq_len=seq_len)
    if max_windows is not None:
        _check_positive(max_windows=max_windows)
    bos = window_bos(tokenizer)
    length = _text_tokens_per_window(seq_len, bos)
    tokens = tokenize(text, tokenizer)
    available = tokens.numel() // length
    if available == 0:
        raise DataError(
            f"the evaluation text holds {tokens.numel():,} tokens, fewer than one window of "
            f"{length} text tokens"
        )
    count = available if max_windows is None else min(available, max_windows)
    if max_windows is not None and count < max_windows:
        log.warning(
            "evaluation text holds only %d windows of %d tokens (%d asked for)",
            count,
            seq_len,
            max_windows,
        )
    return _with_bos(tokens[: count * length].reshape(count, length), bos)
