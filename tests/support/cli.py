"""The outcome of one in-process ``lrpc`` command (see the ``cli`` fixture)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Result:
    """Exit code and captured output of one ``lrpc`` command."""

    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]
