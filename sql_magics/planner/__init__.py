"""Where a statement runs: DuckDB's parse trees read, the Parquet source found, the plan (driver or
workers) and its rewrite, the shares cut from the files, and the scans that run them on the workers."""
