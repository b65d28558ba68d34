"""Shared fixtures: running the command line in-process."""

from __future__ import annotations

import pytest
from lrpc.cli import main

from support.cli import Result


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch):
    """Rich sizes its tables from COLUMNS: fix it so output does not depend on the terminal;
    LRPC_DEBUG would turn error lines into tracebacks."""
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("LRPC_DEBUG", raising=False)


@pytest.fixture(autouse=True)
def _seeded_inputs(request):
    """Each test draws its random inputs from its own seed (its id): the same numbers
    whichever worker runs it and whatever ran before, so a result never depends on the
    order pytest-xdist happens to choose."""
    import zlib

    import numpy as np

    from support import cases

    cases.RNG = np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def cli(capsys):
    """``cli("compile", path, "-o", out)`` -> :class:`Result`."""

    def invoke(*argv) -> Result:
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return invoke
