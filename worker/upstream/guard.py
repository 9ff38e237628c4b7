"""The parent of one vLLM process: it follows the worker into death, whatever killed it.

    python guard.py FD GRACE vllm-argv...   (run by child.py; standard library only)

vLLM gets no signal when the worker dies (a SIGKILL, an OOM kill outside a container), and
its API server, engine core and workers would go on holding the GPU and the port. The
guard starts vLLM as its own child, in the process group the worker made for it, and
blocks reading FD, a pipe whose only writer is the worker: the read ends when the worker
is gone, for any reason. Then the guard signals the whole group: SIGTERM, GRACE seconds
for vLLM to leave, then SIGKILL (itself included). Otherwise it stays out of the way: it
ignores SIGTERM (the worker's own stop signals the whole group, vLLM included) and exits
as vLLM did, with its code or by its signal, so the worker reads vLLM's own exit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time


def follow_the_worker(fd: int, grace: float, vllm: subprocess.Popen[bytes],
                      orphaned: threading.Event) -> None:
    """Block until the worker's end of the pipe is closed, then end the whole group."""
    while os.read(fd, 1):
        pass
    orphaned.set()
    os.killpg(0, signal.SIGTERM)  # the guard ignores it, vLLM's processes get it
    deadline = time.monotonic() + grace
    while vllm.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(0, signal.SIGKILL)  # what is left of vLLM, and the guard


def main(argv: list[str]) -> None:
    fd, grace, command = int(argv[0]), float(argv[1]), argv[2:]
    vllm = subprocess.Popen(command, stdin=subprocess.DEVNULL)  # not given the pipe
    # Ignored only once vLLM runs: an ignored signal would stay ignored in it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    orphaned = threading.Event()
    follower = threading.Thread(target=follow_the_worker, args=(fd, grace, vllm, orphaned),
                                daemon=True)
    follower.start()
    code = vllm.wait()
    if orphaned.is_set():  # what is left of vLLM is the follower's to end, the guard with it
        follower.join()
    if code < 0:  # killed by a signal: die of it too, so the worker reads the same
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # the two no handler can catch
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
