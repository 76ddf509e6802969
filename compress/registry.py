"""Explicit stage registry: one typed config class → one handler.

A stage module registers itself with `@register_stage(ConfigType, preflight=check_fn)` on its
apply function (plus `plan=` when it changes shapes); nothing is discovered from class or file
names. `compress.stages` imports every stage module, so importing it fills the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel
from torch import nn

if TYPE_CHECKING:
    from compress.distill.parallel import DataParallel


@dataclass(frozen=True)
class StageContext:
    """What a stage may read besides the model and its own config."""

    dtype: str  # the recipe's dtype name, e.g. "bfloat16"
    # Calibration token windows (num_samples, seq_len), built on first call; None when the
    # recipe has no calibration section (stages that need one are refused at validation).
    calibration_windows: Callable[[], torch.Tensor] | None = None
    calibration_batch_size: int = 8
    # Where each decoder layer is moved while it is calibrated (the model itself stays put).
    calibration_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # The distillation teacher: called with None, the model as it was before the recipe's
    # stages (loaded again from the source, so earlier stages never hold two copies); called
    # with a model source (as in `model.source`), that model.
    teacher: Callable[[str | None], nn.Module] | None = None
    # A directory of this stage's own, kept across `--resume` (in-stage checkpoints).
    work_dir: Path | None = None
    # Rank 0's view of a data-parallel launch (`accelerate launch`); None for one process.
    parallel: DataParallel | None = None


@dataclass(frozen=True)
class StageResult:
    """What a stage reports: a one-line summary and numbers for the report."""

    summary: str
    details: dict[str, Any] = field(default_factory=dict)


Preflight = Callable[[nn.Module, Any], None]
Apply = Callable[[nn.Module, Any, StageContext], StageResult]
# The model as the stage will leave it, without weights (meta tensors), for the preflight of
# later stages; None for stages that keep every shape (quantize keeps the Linear shapes).
Plan = Callable[[nn.Module, Any], nn.Module]


@dataclass(frozen=True)
class StageHandler:
    config_type: type[BaseModel]
    preflight: Preflight  # raises PreflightError naming the layers at fault; must be cheap
    apply: Apply  # modifies the model in place
    plan: Plan | None = None


_REGISTRY: dict[type[BaseModel], StageHandler] = {}


def register_stage(
    config_type: type[BaseModel], *, preflight: Preflight, plan: Plan | None = None
) -> Callable[[Apply], Apply]:
    def decorator(apply: Apply) -> Apply:
        if config_type in _REGISTRY:
            raise RuntimeError(f"a handler for {config_type.__name__} is already registered")
        _REGISTRY[config_type] = StageHandler(config_type, preflight, apply, plan)
        return apply

    return decorator


def handler_for(config: BaseModel) -> StageHandler:
    import compress.stages  # noqa: F401  (registers every built-in stage; a no-op once imported)

    try:
        return _REGISTRY[type(config)]
    except KeyError:
        raise RuntimeError(f"no stage handler registered for {type(config).__name__}") from None
