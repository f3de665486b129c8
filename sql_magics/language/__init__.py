"""The statement language as text: tokens, the parser and its statement kinds, ``#%python`` cells,
``${key}`` variables and ``$name`` parameters, and Spark SQL translated to DuckDB's."""
