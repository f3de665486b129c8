"""What the statements of a session's scripts set for the statements that follow them.

Example:
    >>> state = ScriptState(dialect="Spark")
    >>> state.dialect
    'spark'
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from sql_magics.language.dialect import check_dialect
from udf_engine import ConfigError
from udf_engine.models.loaders import WARM_FRAMEWORKS

# `set worker_scan = "off"` keeps every query on the driver path (sql_magics.planner); "on" is the default.
WORKER_SCAN = "worker_scan"
WORKER_SCAN_VALUES = ("on", "off")
# `set ray.address = "host:port"`: the Ray cluster the session's workers run on (before Ray starts).
RAY_ADDRESS = "ray.address"
# Which framework's spares wait for the next registration: Session(warm=...) for a new session
# ("keras" unless $RAYUDF_WARM says otherwise), `set warm = "..."` from then on; "none" for no spares.
WARM = "warm"
WARM_VARIABLE = "RAYUDF_WARM"
_NO_WARMING = ("none", "0", "false", "off", "no", "")


def warm_framework(warm: str | bool | None, *, named: str = "warm=") -> str | None:
    """The framework to warm (None: nothing, Ray starts when first needed) for ``Session(warm=...)``,
    or ``set warm`` (``named`` says which, in the error).

    Example:
        >>> warm_framework(False), warm_framework("onnx"), warm_framework(True), warm_framework("None")
        (None, 'onnx', 'keras', None)
    """
    if warm is None:
        warm = os.environ.get(WARM_VARIABLE, "keras")
    if isinstance(warm, bool):
        return "keras" if warm else None
    if warm.strip().lower() in _NO_WARMING:
        return None
    if warm not in WARM_FRAMEWORKS:
        raise ConfigError(f"{named}{warm!r}: give one of {', '.join(WARM_FRAMEWORKS)} or none (${WARM_VARIABLE} takes the same)")
    return warm


@dataclass
class ScriptState:
    """Variables, the SQL dialect and the ``!python`` settings of one session."""

    dialect: str = "duckdb"  # "duckdb" or "spark" (select text translated by sqlglot)
    variables: dict[str, str] = field(default_factory=dict)  # `set` variables, used as ${key}
    pinned: set[str] = field(default_factory=set)  # variables given from outside (rayudf run --set) that `set` leaves alone
    python_conf: dict[str, str] = field(default_factory=dict)  # `!python conf`, reaches registerCode as context.conf
    python_env: dict[str, str] = field(default_factory=dict)  # `!python env`, set in the workers' environment

    def __post_init__(self) -> None:
        self.dialect = check_dialect(self.dialect)

    def worker_scans(self) -> bool:
        """Whether queries over Parquet files may read and score them on the workers."""
        return self.variables.get(WORKER_SCAN, "on").lower() != "off"
