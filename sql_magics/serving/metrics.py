"""What a served function did: requests by status, latency, and the size of the coalesced worker calls.

Each replica counts its own; the directory gathers the replicas' snapshots and ``/metrics`` renders
their sum as Prometheus text.

Example:
    >>> m = Metrics()
    >>> m.request("f", "v1", 200, 0.004); m.batch("f", requests=3, rows=3)
    >>> text = Metrics.merged([m.snapshot(), m.snapshot()]).render()
    >>> 'rayudf_requests_total{function="f",endpoint="v1",code="200"} 2' in text
    True
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

# Seconds a request took: from a millisecond (a cached path) to ten seconds (a slow model).
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Requests (or rows) coalesced into one call to the workers.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)


@dataclass
class Histogram:
    """Observations counted into buckets (each bucket counts the values up to its bound), with their sum."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # one per bound, then +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def add(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total
        self.count += other.count

    def lines(self, name: str, labels: str) -> list[str]:
        cumulative, out = 0, []
        for bound, n in zip((*self.bounds, "+Inf"), self.counts, strict=True):
            cumulative += n
            out.append(f'{name}_bucket{{{labels},le="{bound}"}} {cumulative}')
        return [*out, f"{name}_sum{{{labels}}} {self.total:.6f}", f"{name}_count{{{labels}}} {self.count}"]


class Metrics:
    """One replica's counters (or several replicas' summed)."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, int]] = Counter()  # (function, endpoint, status code)
        self.latency: dict[tuple[str, str], Histogram] = {}  # (function, endpoint)
        self.batch_requests: dict[str, Histogram] = {}  # requests in one worker call, by function
        self.batch_rows: dict[str, Histogram] = {}  # rows in one worker call, by function
        self.queries_running = 0  # /model/predict select lists evaluating now (a gauge)
        self.first_token_s: dict[str, Histogram] = {}  # generation: seconds from a request to its first piece of text
        self.tokens: Counter[str] = Counter()  # generation: tokens generated for requests, by function
        self.sequences: dict[str, tuple[int, int]] = {}  # generation: (running, waiting) on the workers now, set to render

    def first_token(self, function: str, seconds: float) -> None:
        self.first_token_s.setdefault(function, Histogram(LATENCY_BUCKETS_S)).observe(seconds)

    def generated(self, function: str, tokens: int) -> None:
        self.tokens[function] += tokens

    def request(self, function: str, endpoint: str, code: int, seconds: float) -> None:
        self.requests[(function, endpoint, code)] += 1
        self.latency.setdefault((function, endpoint), Histogram(LATENCY_BUCKETS_S)).observe(seconds)

    def batch(self, function: str, *, requests: int, rows: int) -> None:
        self.batch_requests.setdefault(function, Histogram(BATCH_BUCKETS)).observe(requests)
        self.batch_rows.setdefault(function, Histogram(BATCH_BUCKETS)).observe(rows)

    def snapshot(self) -> dict:
        """The counters as plain data, to send to the directory."""
        return {"requests": dict(self.requests), "latency": self.latency, "batch_requests": self.batch_requests,
                "batch_rows": self.batch_rows, "queries_running": self.queries_running, "first_token_s": self.first_token_s,
                "tokens": dict(self.tokens)}

    @classmethod
    def merged(cls, snapshots: list[dict]) -> Metrics:
        total = cls()
        for snap in snapshots:
            total.requests.update(snap["requests"])
            total.queries_running += snap.get("queries_running", 0)
            total.tokens.update(snap.get("tokens", {}))
            for attr in ("latency", "batch_requests", "batch_rows", "first_token_s"):
                mine = getattr(total, attr)
                for key, hist in snap.get(attr, {}).items():
                    mine.setdefault(key, Histogram(hist.bounds)).add(hist)
        return total

    def render(self) -> str:
        """Prometheus' text format."""
        out = [
            "# HELP rayudf_requests_total Requests answered, by function, endpoint and status code.",
            "# TYPE rayudf_requests_total counter",
        ]
        out += [f'rayudf_requests_total{{function="{f}",endpoint="{e}",code="{c}"}} {n}' for (f, e, c), n in sorted(self.requests.items())]
        out += ["# HELP rayudf_errors_total Requests answered with an error (status 400 and above).", "# TYPE rayudf_errors_total counter"]
        errors: Counter[tuple[str, str]] = Counter()
        for (f, e, c), n in self.requests.items():
            if c >= 400:
                errors[(f, e)] += n
        out += [f'rayudf_errors_total{{function="{f}",endpoint="{e}"}} {n}' for (f, e), n in sorted(errors.items())]
        out += ["# HELP rayudf_request_seconds Seconds from a request to its answer.", "# TYPE rayudf_request_seconds histogram"]
        for (f, e), hist in sorted(self.latency.items()):
            out += hist.lines("rayudf_request_seconds", f'function="{f}",endpoint="{e}"')
        for name, attr, what in (("rayudf_batch_requests", "batch_requests", "Requests"), ("rayudf_batch_rows", "batch_rows", "Rows")):
            out += [f"# HELP {name} {what} coalesced into one call to a function's workers.", f"# TYPE {name} histogram"]
            for f, hist in sorted(getattr(self, attr).items()):
                out += hist.lines(name, f'function="{f}"')
        out += ["# HELP rayudf_sql_queries_running /model/predict select lists being evaluated now.",
                "# TYPE rayudf_sql_queries_running gauge", f"rayudf_sql_queries_running {self.queries_running}"]
        out += ["# HELP rayudf_time_to_first_token_seconds Seconds from a generation request to its first piece of text.",
                "# TYPE rayudf_time_to_first_token_seconds histogram"]
        for f, hist in sorted(self.first_token_s.items()):
            out += hist.lines("rayudf_time_to_first_token_seconds", f'function="{f}"')
        out += ["# HELP rayudf_generated_tokens_total Tokens generated for requests (its rate is tokens/s).",
                "# TYPE rayudf_generated_tokens_total counter"]
        out += [f'rayudf_generated_tokens_total{{function="{f}"}} {n}' for f, n in sorted(self.tokens.items())]
        for i, (name, what) in enumerate((("running", "in a running batch"), ("waiting", "waiting to join one"))):
            out += [f"# HELP rayudf_sequences_{name} Generation: sequences {what} on the function's workers now.",
                    f"# TYPE rayudf_sequences_{name} gauge"]
            out += [f'rayudf_sequences_{name}{{function="{f}"}} {counts[i]}' for f, counts in sorted(self.sequences.items())]
        return "\n".join(out) + "\n"
