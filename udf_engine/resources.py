"""What one worker reserves on the cluster, whether that fits in what is free, and the Ray options that ask for it.

The builder (will the workers fit?), the warm pool (a spare reserves what a worker of its kind
would) and Byzer-python's tasks all read a UDF's resource options through here.

Example:
    >>> worker = WorkerResources(num_cpus=0.5, resources=(("accelerator", 1.0),))
    >>> worker.needs(2)
    {'CPU': 1.0, 'accelerator': 2.0}
    >>> shortage(worker.needs(2), free={"CPU": 0.5, "accelerator": 4.0})
    'asked CPU=1, accelerator=2, free CPU=0.5, accelerator=4'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from udf_engine.settings import UDFConf

# Two floats of reserved resources that differ by less are equal (Ray adds fractions up in floating point).
_EPSILON = 1e-9


@dataclass(frozen=True)
class WorkerResources:
    """One worker's reservation (CPUs, GPUs, custom resources) and the environment its process gets."""

    num_cpus: float = 0.0
    num_gpus: float = 0.0
    resources: tuple[tuple[str, float], ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, conf: UDFConf) -> WorkerResources:
        """What a worker of a UDF with these settings reserves."""
        return cls(
            conf.num_cpus, conf.num_gpus, tuple(sorted(conf.resources.items())), tuple(sorted((k, str(v)) for k, v in conf.env.items()))
        )

    def needs(self, count: int = 1) -> dict[str, float]:
        """What ``count`` such workers reserve, by Ray resource name (zero amounts left out)."""
        per_worker = {"CPU": self.num_cpus, "GPU": self.num_gpus, **dict(self.resources)}
        return {k: v * count for k, v in per_worker.items() if v}

    def task_options(self) -> dict[str, Any]:
        """Ray's options for a task (or actor) that reserves what one worker does."""
        return {
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "resources": dict(self.resources) or None,
            "runtime_env": {"env_vars": dict(self.env)} if self.env else None,
        }

    def actor_options(self) -> dict[str, Any]:
        """Ray's options for a worker actor: one batch at a time, a UDF's workers spread over the nodes."""
        return {**self.task_options(), "max_concurrency": 1, "scheduling_strategy": "SPREAD"}


def shortage(needs: Mapping[str, float], free: Mapping[str, float] | None = None) -> str:
    """What is asked and what is free, e.g. "asked CPU=0.5, free CPU=0" ("" when it fits); ``free`` is
    the cluster's free resources now unless given."""
    if free is None:
        import ray

        free = ray.available_resources()
    if all(free.get(k, 0.0) + _EPSILON >= v for k, v in needs.items()):
        return ""
    asked = ", ".join(f"{k}={v:g}" for k, v in needs.items())
    have = ", ".join(f"{k}={free.get(k, 0.0):g}" for k in needs)
    return f"asked {asked}, free {have}"


def fits(needs: Mapping[str, float]) -> bool:
    """Whether ``needs`` fit in the cluster's free resources now."""
    return not shortage(needs)
