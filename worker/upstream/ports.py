"""Is a vLLM's loopback port free, and if not, which process holds it?

A worker must never take another process's vLLM for its own: one left running by a worker
that was killed would answer the health check of the new one at once, serve its jobs, and
the new vLLM would then die unable to bind. So the port is checked before the spawn, the
way vLLM's uvicorn binds it (SO_REUSEADDR on 127.0.0.1), and the holder named from /proc
(the socket's inode in /proc/net/tcp, then the process whose descriptors hold it; a vLLM
still loading has bound its port without listening, which /proc/net/tcp does not show: then
the process started with `--port <port>`).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _inodes(port: int) -> set[str]:
    """The inodes of the sockets bound to `port` on this machine, IPv4 and IPv6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.add(fields[9])
    return found - {"0"}


def holders(port: int) -> list[tuple[int, str]]:
    """(pid, command line) of each process holding a socket on `port`, else of each started
    with `--port <port>` (only processes this one may look into)."""
    inodes = {f"socket:[{inode}]" for inode in _inodes(port)}
    sockets, by_argv = [], []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            held = inodes and any(os.readlink(f"/proc/{entry}/fd/{fd}") in inodes
                                  for fd in os.listdir(f"/proc/{entry}/fd"))
        except OSError:
            continue
        found = (int(entry), b" ".join(argv).decode(errors="replace").strip())
        if held:
            sockets.append(found)
        elif any(flag == b"--port" and value == str(port).encode()
                 for flag, value in zip(argv, argv[1:], strict=False)):
            by_argv.append(found)
    return sockets or by_argv


def taken(port: int, variable: str = "VLLM_PORT") -> str | None:
    """Why vLLM cannot have 127.0.0.1:`port` (None when it can), in one sentence."""
    if is_free(port):
        return None
    held = holders(port)
    who = ", ".join(f"process {pid} ({command[:120]})" for pid, command in held[:3]) \
        or "another process (not one this worker may look into)"
    return (f"127.0.0.1:{port} ({variable}) is already in use by {who}: stop it (a vLLM left "
            f"by an earlier worker?), or set {variable} to a free port.")
