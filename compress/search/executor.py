"""Where the search's independent jobs run: in this process, or as Ray tasks.

Sensitivity (chunks of layer groups) and candidates (allocations of one round of the walk) are
independent jobs. `LocalExecutor` runs them one after another in this process, on the model it
already holds. `RayExecutor` runs each as a Ray task on a local Ray (`num_cpus`) or an existing
cluster (`address`); a task reloads the model from the recipe's source and returns small results
(a table, a verdict), so nothing large crosses the wire. Ray is an optional extra
(`pip install 'compress[ray]'`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from compress.errors import BadInputError
from compress.search.config import RayOptions

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class Executor(Protocol):
    parallelism: int  # jobs that run at once
    in_process: bool  # jobs may use the model this process holds

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]: ...

    def close(self) -> None: ...


class LocalExecutor:
    parallelism = 1
    in_process = True

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        return [fn(item) for item in items]

    def close(self) -> None:
        pass


class RayExecutor:
    in_process = False

    def __init__(self, options: RayOptions) -> None:
        try:
            import ray
        except ImportError:
            raise BadInputError(
                "search.executor: ray needs the `ray` extra (pip install 'compress[ray]')"
            ) from None
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            settings: dict[str, Any] = {
                "address": options.address,
                "include_dashboard": False,
                "logging_level": logging.WARNING,
            }
            if options.address is None:
                settings["num_cpus"] = options.num_cpus
            ray.init(**settings)
        cpus = ray.cluster_resources().get("CPU", 1.0)
        self.cpus_per_task = options.cpus_per_task
        self.parallelism = max(1, int(cpus // options.cpus_per_task))
        log.info(
            "search: Ray %s with %g CPUs, %d tasks at once (%g CPUs each)",
            options.address or "local",
            cpus,
            self.parallelism,
            options.cpus_per_task,
        )

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        remote = self._ray.remote(num_cpus=self.cpus_per_task)(fn)
        return self._ray.get([remote.remote(item) for item in items])

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()


def executor_for(kind: str, options: RayOptions) -> Executor:
    return RayExecutor(options) if kind == "ray" else LocalExecutor()


def chunks(items: Sequence[T], count: int) -> list[list[T]]:
    """`items` in `count` contiguous chunks of near-equal size (fewer when items are few)."""
    count = max(1, min(count, len(items)))
    size, extra = divmod(len(items), count)
    out, start = [], 0
    for i in range(count):
        end = start + size + (i < extra)
        out.append(list(items[start:end]))
        start = end
    return out
