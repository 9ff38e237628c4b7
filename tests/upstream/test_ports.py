"""Whether vLLM's port is free, and which process holds it when it is not."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from fakes.vllm import free_port
from worker.upstream.ports import is_free, taken


def test_a_free_port_is_free_and_needs_no_sentence() -> None:
    port = free_port()
    assert is_free(port) and taken(port) is None


def test_a_port_held_by_a_process_names_it_and_the_setting_to_change() -> None:
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        why = taken(port)
    assert why is not None
    assert f"127.0.0.1:{port} (VLLM_PORT) is already in use by process {os.getpid()} (" in why
    assert why.endswith("or set VLLM_PORT to a free port.")


def test_a_vllm_that_bound_its_port_but_does_not_listen_yet_is_named_too() -> None:
    """vLLM binds its port long before it listens (while it loads), and /proc/net/tcp does
    not show such a socket: the process started with that `--port` is named instead."""
    port = free_port()
    loading = subprocess.Popen(
        [sys.executable, "-c", "import socket, sys, time\ns = socket.socket()\n"
         "s.bind(('127.0.0.1', int(sys.argv[2])))\nprint('bound', flush=True)\ntime.sleep(60)",
         "--port", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert loading.stdout is not None and loading.stdout.readline() == "bound\n"
        assert not is_free(port)
        assert f"in use by process {loading.pid} (" in (taken(port) or "")
    finally:
        loading.kill()
        loading.wait()
        loading.stdout.close()
