"""The rayudf benchmark: SQL scoring against the in-process limit, Ray Data and a per-row UDF.

Run ``make bench`` or ``python -m bench --help``; it writes ``bench/RESULTS.md``.
"""
