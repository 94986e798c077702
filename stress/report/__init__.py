"""``python -m stress report``: read, graph, diff and merge what stress runs left behind.

The kernel has no one tool for this; the closest are reading dmesg beside /proc/lockdep and
/proc/lock_stat, and lockdep's own graph walk. Here every run writes a report directory (see
:mod:`stress.reporting`) and these modules read it back: :mod:`.load` (paths, formats, versions),
:mod:`.graphs` (merge, cross-run cycles, diff; pure functions on the JSON forms), :mod:`.cli`
(the subcommands and their text output).
"""
