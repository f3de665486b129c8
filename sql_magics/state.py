"""What the statements of a session's scripts set for the statements that follow them.

Example:
    >>> state = ScriptState(dialect="Spark")
    >>> state.dialect
    'spark'
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sql_magics.language.dialect import check_dialect

# `set worker_scan = "off"` keeps every query on the driver path (sql_magics.planner); "on" is the default.
WORKER_SCAN = "worker_scan"
WORKER_SCAN_VALUES = ("on", "off")


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
