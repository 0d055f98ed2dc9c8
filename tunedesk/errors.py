"""Errors shared by every command."""

from __future__ import annotations


class CommandError(Exception):
    """A user-facing failure: printed as one clear line, exit code 2 (or `code`)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code
