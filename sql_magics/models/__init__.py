"""Models as SQL functions: the ``register`` kinds, and the registry that builds, installs, swaps and retires them."""
