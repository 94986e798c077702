"""Stress drivers, the ``python -m stress`` command line and its reports (above kmemcg)."""
