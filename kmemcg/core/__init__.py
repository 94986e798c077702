"""Lowest layer: tasks, findings, stacks, the instrumentation point and blocking waits.

Nothing here knows about locks, RCU or memory: every other layer builds on these.
"""
