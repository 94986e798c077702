"""Top-level pytest configuration: the repository root is importable (stress/, benchmarks/)."""
