"""Where the rows are: the session's DuckDB connection, what its catalog holds, the formats of
``load`` and ``save``, and the Delta lake."""
