"""Byzer-python in scripts: ``run command as Ray`` code, run here with the pyjava API, and the
schemas that type its output (``st(field(...))``, DDL, JSON, ``file``)."""
