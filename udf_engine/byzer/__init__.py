"""Byzer/MLSQL's Python API on rayudf: ``RayContext`` and ``PythonContext``, and the ``pyjava`` import names."""
