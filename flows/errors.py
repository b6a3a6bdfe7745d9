"""Errors the command line reports without a traceback (imported by flows/cli.py and the commands it runs)."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""
