"""Argument parsing shared by ``python -m stress`` and ``python -m stress report``: bad usage is
one line on stderr and exit 2, never a usage dump or a traceback."""

from __future__ import annotations

import argparse


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise UsageError(message)
