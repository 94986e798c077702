"""Stack traces and a stack depot, as lib/stackdepot.c keeps them for KASAN and lockdep.

A captured stack is a tuple of ``(filename, lineno, function)`` frames, innermost first, interned
in a per-kernel depot so that the thousands of identical allocation stacks of a stress run cost
one tuple. Frames inside the model's own plumbing (lock wrappers, lockdep, the instrumentation
point) are skipped so a report starts at the code that took the lock, the way the kernel's
``lock_acquire+0x..`` frames are noise a reader skips.

Unlike the kernel, capturing costs a frame walk (~1-3 us); callers capture only on slow paths
(a new lockdep edge, an allocation when KASAN is on, a finding).
"""

from __future__ import annotations

import os
import sys
import threading
from types import FrameType

Frame = tuple[str, int, str]
Stack = tuple[Frame, ...]

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Plumbing whose frames say nothing to a reader of a report.
_SKIP_DIRS = (
    os.path.join(_PKG_DIR, "core"),
    os.path.join(_PKG_DIR, "locking"),
)
_SKIP_FILES = {os.path.join(os.path.dirname(os.__file__), "threading.py")}

MAX_DEPTH = 24


def _skipped(filename: str) -> bool:
    return filename.startswith(_SKIP_DIRS) or filename in _SKIP_FILES


class StackDepot:
    """Interns stacks so that identical ones are stored once (lib/stackdepot.c)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stacks: dict[Stack, Stack] = {}

    def save(self, stack: Stack) -> Stack:
        # dict.setdefault is atomic on CPython and internally locked on free-threaded builds;
        # the explicit lock documents the intent and costs little on this slow path.
        with self._lock:
            return self._stacks.setdefault(stack, stack)

    def capture(self, skip: int = 1, frame: FrameType | None = None) -> Stack:
        """The caller's stack (innermost first), plumbing frames removed, interned."""
        f = frame if frame is not None else sys._getframe(skip)
        out: list[Frame] = []
        while f is not None and len(out) < MAX_DEPTH:
            co = f.f_code
            if not _skipped(co.co_filename):
                out.append((co.co_filename, f.f_lineno, co.co_name))
            f = f.f_back
        return self.save(tuple(out))

    def __len__(self) -> int:
        with self._lock:
            return len(self._stacks)

    def entries(self) -> int:
        with self._lock:
            return sum(len(s) for s in self._stacks)


def frame_site(skip: int = 1) -> Frame:
    """The first non-plumbing frame above the caller: the 'at:' of a lock acquisition."""
    f = sys._getframe(skip)
    while f is not None and _skipped(f.f_code.co_filename):
        f = f.f_back
    if f is None:
        return ("?", 0, "?")
    return (f.f_code.co_filename, f.f_lineno, f.f_code.co_name)


def format_site(site: Frame | None) -> str:
    if not site:
        return "?"
    fn, line, func = site
    return f"{func} [{os.path.basename(fn)}:{line}]"


def format_stack(stack: Stack | None, indent: str = "       ") -> str:
    """Kernel-style trace lines, innermost first: ``function [file.py:LINE]``."""
    if not stack:
        return f"{indent}<no stack recorded>\n"
    return "".join(f"{indent}{format_site(fr)}\n" for fr in stack)
