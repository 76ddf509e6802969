"""Perplexity and KL divergence to the baseline: the cheap, sensitive quality signals.

On token windows (`compress.calibration.evaluation_windows`), every position but the last
predicts the next token of its window (a window of T tokens scores T - 1 predictions):

- perplexity = exp(mean negative log-likelihood of the next token, over all scored positions);
- KL divergence = mean over the same positions of KL(p_base ‖ p_model)
  = Σ_v p_base(v) (log p_base(v) − log p_model(v)), in nats. It sees every change of the
  output distribution, not only changes of the one token the text happens to contain, which
  is why it moves long before benchmark accuracy does;
- top-1 agreement = the share of positions where both models' most likely token is the same.

Log-softmax is always taken in float32 (bf16 logits are upcast first, which is exact), and
sums are accumulated in float64.

API. `baseline_logprobs(baseline_model, windows)` captures the baseline once (and its own
perplexity, free, as `.perplexity`); `measure_quality(model, windows, baseline)` measures a
model against it. KL and agreement have no meaning without a baseline, so the baseline is a
required argument rather than an optional one that yields NaN; `measure_perplexity` is the
perplexity-only measurement for a model alone. Results keep per-window values (mean NLL, mean
KL, agreement, token count, and the baseline's mean NLL on the same window) so paired
confidence intervals can be computed later.

Memory: how the baseline distribution is kept
---------------------------------------------
KL needs the baseline's whole next-token distribution at every scored position. Held as
float32 log-probabilities that is vocab × 4 bytes per token: 64 windows × 512 tokens × 49,152
× 4 B = 6.4 GB for the demo model, 16.8 GB with Llama-3's 128,256-token vocabulary.

What `BaselineLogProbs` keeps instead: the input of the baseline's output layer (the final
hidden state, model dtype, on the CPU) for every token, plus one private copy of the output
layer (a copy, because stages change the model in place and may quantize `lm_head`). The
baseline's logits are *replayed*: the same module applied to the same input with the same batch
shapes, which reproduces them bit for bit; that is checked for every batch at capture time.
Cost: hidden × 2 bytes per token (576 × 2 B = 1.2 KB against 196 KB of float32 log-probs: 38 MB
for 64 × 512 tokens) plus the layer copy (49,152 × 576 × 2 B = 57 MB). Exact, and the baseline
model can be deleted (or compressed in place) before the compressed model is measured.

Alternatives, and why not:

- Top-k log-probs + the tail's total mass r (one bucket): compact, but biased low. Merging
  the tail into one bucket can only lower KL (log-sum inequality); what is lost is
  r · KL(p_tail / r ‖ q_tail / q(tail)), and nothing stored bounds it: it grows without limit
  as the model moves mass away from the baseline's tail tokens. Measured on the demo model
  (bf16, 4 × 512 WikiText-2 test tokens), the mean tail mass is 0.16 at k = 64 and 0.089 at
  k = 256, and KL comes out 25 % / 14 % low for int8 per-channel RTN (true KL 0.0042) and
  20 % / 11 % low for int4 group-64 RTN (true KL 0.54). Too biased to gate on.
- llama.cpp's `--kl-divergence-base` file: every token's full distribution as uint16 codes
  spanning the 16 nats below the top logit (2 bytes × vocab + 8 bytes per token, 3.2 GB here);
  log-probs are rounded to 16 nats / 65,535 = 2.4e-4 and tokens below −16 nats are left out of
  the sum. Close to exact, but gigabytes of disk per baseline.
- Both models side by side, window by window: exact and simplest, but the baseline must stay
  loaded next to the compressed model; the pipeline compresses in place and reloads the
  artifact from disk, so the baseline would have to be loaded a second time.

Logits post-processed after the output layer are replayed with the model's own post-processing
(`LogitPostprocessing`, read from its config): Gemma 2/3's final soft-capping, Granite's
`logits_scaling`, Cohere's `logit_scale`. Any other difference between the replay and the
model's logits is caught while capturing (`baseline_logprobs` raises `BadInputError`) instead of
measuring something else.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.errors import BadInputError
from compress.models import LogitPostprocessing, logit_postprocessing

log = logging.getLogger(__name__)

PERPLEXITY_KEYS = ("nll", "tokens")
QUALITY_KEYS = ("nll", "kl", "agreement", "tokens", "baseline_nll")
POSITIONS_PER_CHUNK = 512  # positions whose float32 log-probs are held at once


# --------------------------------------------------------------------------- results


def _check_per_window(per_window: dict[str, list[float]], keys: tuple[str, ...], n: int) -> None:
    missing = sorted(set(keys) - set(per_window))
    if missing:
        raise ValueError(f"per_window lacks {missing}")
    wrong = {k: len(per_window[k]) for k in keys if len(per_window[k]) != n}
    if wrong:
        raise ValueError(f"per_window lists must have num_windows = {n} entries, got {wrong}")


@dataclass(frozen=True)
class PerplexityResult:
    """A model's perplexity on token windows; `per_window` has "nll" (mean) and "tokens"."""

    perplexity: float
    num_windows: int
    num_tokens: int
    per_window: dict[str, list[float]]

    def __post_init__(self) -> None:
        _check_per_window(self.per_window, PERPLEXITY_KEYS, self.num_windows)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PerplexityResult:
        return cls(**data)


@dataclass(frozen=True)
class QualityResult:
    """A model measured against a baseline on the same windows.

    `kl_divergence` is the mean per-token KL(baseline ‖ model) in nats. `per_window` holds, per
    window, "nll", "kl" and "agreement" (means over the window's scored positions), "tokens"
    (how many positions were scored) and "baseline_nll" (the baseline's mean NLL on that
    window, for paired comparisons). Aggregates are the token-weighted means of those lists.
    """

    perplexity: float
    baseline_perplexity: float
    kl_divergence: float
    top1_agreement: float
    num_windows: int
    num_tokens: int
    per_window: dict[str, list[float]]

    def __post_init__(self) -> None:
        _check_per_window(self.per_window, QUALITY_KEYS, self.num_windows)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QualityResult:
        return cls(**data)


# --------------------------------------------------------------------------- per-window maths


@dataclass(frozen=True)
class WindowStats:
    """Sums over one window's scored positions (float64)."""

    tokens: int
    nll: float
    kl: float = math.nan
    agree: float = math.nan


def _position_sums(
    logits: torch.Tensor, targets: torch.Tensor, baseline_logits: torch.Tensor | None
) -> tuple[float, float, float]:
    """(Σ NLL, Σ KL, Σ top-1 agreement) over positions; logits (P, V) predict targets (P,)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    nll = -logprobs.gather(-1, targets[:, None]).double().sum().item()
    if baseline_logits is None:
        return nll, math.nan, math.nan
    base = torch.log_softmax(baseline_logits.to(logprobs.device).float(), dim=-1)
    kl = (base.exp() * (base - logprobs)).sum(-1).double().sum().item()
    agree = (base.argmax(-1) == logprobs.argmax(-1)).sum().item()
    return nll, kl, float(agree)


def window_stats(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    baseline_logits: torch.Tensor | None = None,
    *,
    chunk: int = POSITIONS_PER_CHUNK,
) -> WindowStats:
    """One window: `logits` (T, V) of any float dtype, `tokens` (T,), baseline logits (T, V).

    Position t predicts token t + 1, so T - 1 positions are scored. Taken `chunk` positions at
    a time, so the float32 temporaries stay at a few × chunk × vocab × 4 bytes however long
    the window. float32 log-softmax is accurate to ~1e-6 nats per token and ~1e-8 on average
    (measured against float64 on 511 × 49,152 logits); a float64 pass costs 3.5× the time.
    """
    targets = tokens[1:].to(logits.device)
    scored = logits[:-1]
    base = None if baseline_logits is None else baseline_logits[:-1]
    sums = [
        _position_sums(
            scored[start : start + chunk],
            targets[start : start + chunk],
            None if base is None else base[start : start + chunk],
        )
        for start in range(0, targets.numel(), chunk)
    ]
    nll, kl, agree = (math.fsum(column) for column in zip(*sums, strict=True))
    return WindowStats(tokens=targets.numel(), nll=nll, kl=kl, agree=agree)


def _means(stats: list[WindowStats], attribute: str) -> list[float]:
    return [getattr(s, attribute) / s.tokens for s in stats]


def _pooled(stats: list[WindowStats], attribute: str) -> float:
    """Token-weighted mean: the sum over all scored positions / their number."""
    return math.fsum(getattr(s, attribute) for s in stats) / sum(s.tokens for s in stats)


def perplexity_result(stats: list[WindowStats]) -> PerplexityResult:
    return PerplexityResult(
        perplexity=math.exp(_pooled(stats, "nll")),
        num_windows=len(stats),
        num_tokens=sum(s.tokens for s in stats),
        per_window={"nll": _means(stats, "nll"), "tokens": [float(s.tokens) for s in stats]},
    )


def quality_result(stats: list[WindowStats], baseline: PerplexityResult) -> QualityResult:
    return QualityResult(
        perplexity=math.exp(_pooled(stats, "nll")),
        baseline_perplexity=baseline.perplexity,
        kl_divergence=_pooled(stats, "kl"),
        top1_agreement=_pooled(stats, "agree"),
        num_windows=len(stats),
        num_tokens=sum(s.tokens for s in stats),
        per_window={
            "nll": _means(stats, "nll"),
            "kl": _means(stats, "kl"),
            "agreement": _means(stats, "agree"),
            "tokens": [float(s.tokens) for s in stats],
            "baseline_nll": list(baseline.per_window["nll"]),
        },
    )


# --------------------------------------------------------------------------- running models


def _check_windows(windows: torch.Tensor) -> torch.Tensor:
    if windows.dim() != 2 or windows.dtype != torch.int64 or windows.shape[1] < 2:
        raise ValueError(
            f"windows must be (num_windows, seq_len ≥ 2) int64 token ids, got "
            f"{tuple(windows.shape)} {windows.dtype}"
        )
    return windows.cpu()


def _input_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def _forward(
    model: nn.Module, windows: torch.Tensor, batch_size: int, desc: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(batch of windows, logits) for consecutive batches, with a progress bar."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    model.eval()
    device = _input_device(model)
    with tqdm(total=len(windows), desc=desc, unit="window", disable=None, leave=False) as bar:
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            yield batch, model(input_ids=batch.to(device), use_cache=False).logits
            bar.update(len(batch))


def _window_stats_of_batch(
    batch: torch.Tensor, logits: torch.Tensor, baseline_logits: torch.Tensor | None = None
) -> list[WindowStats]:
    """Window by window (`window_stats` bounds the float32 temporaries)."""
    return [
        window_stats(logits[i], batch[i], None if baseline_logits is None else baseline_logits[i])
        for i in range(len(batch))
    ]


@torch.inference_mode()
def measure_perplexity(
    model: nn.Module, windows: torch.Tensor, *, batch_size: int = 1
) -> PerplexityResult:
    """Perplexity of `model` alone on `(N, T)` windows (puts the model in eval mode)."""
    windows = _check_windows(windows)
    stats: list[WindowStats] = []
    for batch, logits in _forward(model, windows, batch_size, "perplexity"):
        stats.extend(_window_stats_of_batch(batch, logits))
    result = perplexity_result(stats)
    log.info("perplexity %.4f over %d tokens", result.perplexity, result.num_tokens)
    return result


# --------------------------------------------------------------------------- the baseline


@dataclass(frozen=True, eq=False)
class BaselineLogProbs:
    """The baseline's next-token log-probs on a set of windows, kept replayable (module doc).

    `hidden[b]` is the input of the output layer for capture batch b (windows
    `b * batch_size ...`), on the CPU in the model's dtype; `head` is a private copy of the
    output layer and `postprocess` what the model does to its result (`LogitPostprocessing`).
    `perplexity` is the baseline's own perplexity on the windows.
    """

    windows: torch.Tensor
    hidden: tuple[torch.Tensor, ...]
    head: nn.Module
    batch_size: int
    perplexity: PerplexityResult
    postprocess: LogitPostprocessing = field(default_factory=LogitPostprocessing)

    @property
    def nbytes(self) -> int:
        tensors = [*self.hidden, *self.head.parameters(), *self.head.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def head_device(self) -> torch.device:
        return next(self.head.parameters()).device

    def batch_logits(self, index: int) -> torch.Tensor:
        """The baseline's logits for capture batch `index`: exactly what the model produced."""
        return self.postprocess(self.head(self.hidden[index].to(self.head_device())))

    @torch.inference_mode()
    def logprobs(self, window: int) -> torch.Tensor:
        """float32 (T, V) log-probs of one window (position t predicts token t + 1)."""
        index, row = divmod(window, self.batch_size)
        return torch.log_softmax(self.batch_logits(index)[row].float(), dim=-1)


def _output_layer(model: nn.Module) -> nn.Module:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    if head is None:
        raise BadInputError(
            f"{type(model).__name__} exposes no output layer (get_output_embeddings()), "
            "so its baseline log-probs cannot be kept compactly"
        )
    return head


def _check_replay(replayed: torch.Tensor, logits: torch.Tensor, model: nn.Module) -> None:
    """The replay must reproduce the model's logits: bit for bit, or within output rounding."""
    if replayed.shape == logits.shape and torch.equal(replayed.to(logits.dtype), logits):
        return
    eps = torch.finfo(replayed.dtype).eps
    if replayed.shape == logits.shape and torch.allclose(
        replayed.float(), logits.float(), rtol=2 * eps, atol=2 * eps
    ):
        log.warning("baseline replay is within 2 ulps of the model's logits, not bit-exact")
        return
    diff = (
        (replayed.float() - logits.float()).abs().max().item()
        if replayed.shape == logits.shape
        else f"shape {tuple(replayed.shape)} vs {tuple(logits.shape)}"
    )
    raise BadInputError(
        f"{type(model).__name__}: its logits are not its output layer applied to the last "
        f"hidden state followed by its known post-processing (max |difference| {diff}); the "
        "compact baseline replays soft-capping, logits_scaling and logit_scale only"
    )


@torch.inference_mode()
def baseline_logprobs(
    model: nn.Module, windows: torch.Tensor, *, batch_size: int = 1
) -> BaselineLogProbs:
    """Capture the baseline on `(N, T)` windows, compactly and exactly (module docstring).

    Run it before the model is changed: the result is independent of the model afterwards.
    `batch_size` is also the batch size `measure_quality` will use (the replay must see the
    same shapes to be bit-exact).
    """
    windows = _check_windows(windows)
    head = _output_layer(model)
    replay_head = copy.deepcopy(head).requires_grad_(False).eval()
    postprocess = logit_postprocessing(model)
    captured: list[torch.Tensor] = []

    def capture(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append(args[0] if args else next(iter(kwargs.values())))

    hidden: list[torch.Tensor] = []
    stats: list[WindowStats] = []
    handle = head.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for batch, logits in _forward(model, windows, batch_size, "baseline"):
            if len(captured) != 1:
                raise BadInputError(
                    f"{type(model).__name__}: its output layer ran {len(captured)} times in one "
                    "forward pass (expected once)"
                )
            _check_replay(postprocess(replay_head(captured[0])), logits, model)
            hidden.append(captured.pop().to("cpu", copy=True))
            stats.extend(_window_stats_of_batch(batch, logits))
    finally:
        handle.remove()
    baseline = BaselineLogProbs(
        windows=windows.clone(),
        hidden=tuple(hidden),
        head=replay_head,
        batch_size=batch_size,
        perplexity=perplexity_result(stats),
        postprocess=postprocess,
    )
    log.info(
        "baseline captured: perplexity %.4f over %d tokens; kept in %.1f MB",
        baseline.perplexity.perplexity,
        baseline.perplexity.num_tokens,
        baseline.nbytes / 1e6,
    )
    return baseline


# --------------------------------------------------------------------------- model vs baseline


@torch.inference_mode()
def measure_quality(
    model: nn.Module, windows: torch.Tensor, baseline: BaselineLogProbs
) -> QualityResult:
    """Perplexity, KL(baseline ‖ model) and top-1 agreement of `model` on `windows`.

    `windows` must be the ones the baseline was captured on, and batches are the baseline's
    (`baseline.batch_size`), so that its replayed logits are bit-identical to the captured
    ones. The model under test may be on another device than the baseline's layer copy.
    """
    windows = _check_windows(windows)
    if not torch.equal(windows, baseline.windows):
        raise ValueError(
            f"windows {tuple(windows.shape)} differ from the ones the baseline was captured on "
            f"{tuple(baseline.windows.shape)}"
        )
    stats: list[WindowStats] = []
    batches = _forward(model, windows, baseline.batch_size, "quality")
    for index, (batch, logits) in enumerate(batches):
        base_logits = baseline.batch_logits(index)
        if base_logits.shape != logits.shape:
            raise ValueError(
                f"model logits {tuple(logits.shape)} and baseline logits "
                f"{tuple(base_logits.shape)} differ in shape (vocabulary size?)"
            )
        stats.extend(_window_stats_of_batch(batch, logits, base_logits))
    result = quality_result(stats, baseline.perplexity)
    log.info(
        "perplexity %.4f (baseline %.4f), KL %.5f nats/token, top-1 agreement %.4f, %d tokens",
        result.perplexity,
        result.baseline_perplexity,
        result.kl_divergence,
        result.top1_agreement,
        result.num_tokens,
    )
    return result
