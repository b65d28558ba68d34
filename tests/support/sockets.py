"""Listening TCP sockets as /proc/net shows them: what tests check servers bind to."""

from __future__ import annotations

import os
from pathlib import Path

#: local addresses of the loopback, in /proc/net's hex: 127.0.0.1, ::ffff:127.0.0.1, ::1
LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def listening(ports=None, pids=None) -> list[str]:
    """Local addresses (hex) of the LISTEN sockets on one of ``ports``, or held by one of
    the processes ``pids``."""
    inodes = set()
    for pid in pids or ():
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and (int(port, 16) in (ports or ()) or fields[9] in inodes):  # 0A: LISTEN
                found.append(address)
    return found
