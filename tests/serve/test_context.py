"""The serve context: a vLLM death ends the worker, a stop signal drains within one grace
period, and signal handlers chain to a library's without leaking into forked helpers.

The children here are plain processes (`sleep`) in vLLM's place: what is tested is what
the Service does when they end or when it is told to stop, not vLLM's protocol. The
process is never really ended: `exit_process` records the code instead.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from worker.serve.context import Service, State, make_proxy, serving
from worker.settings.loader import load
from worker.upstream.child import VllmChild, group_members
from worker.upstream.supervisor import Upstream
from worker.upstream.target import Target


class Exits:
    """Stands in for ending the process: records the code and wakes the test."""

    def __init__(self) -> None:
        self.codes: list[int] = []
        self.done = threading.Event()

    def __call__(self, code: int) -> None:
        self.codes.append(code)
        self.done.set()

    def wait(self) -> int:
        assert self.done.wait(30), "the service never ended"
        return self.codes[-1]


@pytest.fixture
def make_service() -> Iterator[Callable[..., tuple[Service, Exits]]]:
    """A ready Service around `sleep` children, its exits recorded; children killed after."""
    made: list[Service] = []

    def make(children: int = 1, **env: str) -> tuple[Service, Exits]:
        exits = Exits()
        service = Service(load({"SHUTDOWN_GRACE_PERIOD": "0.3", **env}), {}, exits)
        for index in range(children):
            child = VllmChild(["sleep", "60"])
            child.start()
            service.upstreams.append(Upstream(Target(f"m{index}", "http://127.0.0.1:9"), child))
        service.proxy = make_proxy(service.settings, service.upstreams)
        service.state = State.READY
        made.append(service)
        return service, exits

    yield make
    for service in made:
        for upstream in service.upstreams:
            upstream.stop(grace=1)


def test_a_vllm_dying_while_serving_refuses_jobs_stops_the_rest_and_exits_1(
        make_service: Callable[..., tuple[Service, Exits]],
        caplog: pytest.LogCaptureFixture) -> None:
    service, exits = make_service(children=2)
    service.supervise()
    dead, alive = service.upstreams
    assert dead.child is not None and alive.child is not None

    os.killpg(dead.child.pid, signal.SIGKILL)

    assert exits.wait() == 1
    assert service.stopping
    assert service.proxy is not None and service.proxy.refusal == (
        "vLLM for m0 killed by SIGKILL; the worker is restarting")
    assert group_members(alive.child.pid) == [], "the healthy vLLM is stopped too"
    assert "vLLM for m0 killed by SIGKILL while serving" in caplog.text


def test_a_stop_signal_waits_for_work_in_flight_then_exits_0(
        make_service: Callable[..., tuple[Service, Exits]],
        caplog: pytest.LogCaptureFixture) -> None:
    service, exits = make_service(SHUTDOWN_GRACE_PERIOD="30")
    busy = threading.Event()
    busy.set()
    service.in_flight = lambda: int(busy.is_set())

    service.on_signal(signal.SIGTERM)
    assert service.stopping and not exits.done.is_set()
    busy.clear()

    assert exits.wait() == 0
    assert service.proxy is not None and service.proxy.refusal is None, "nothing was cut"
    assert "still running" not in caplog.text
    child = service.upstreams[0].child
    assert child is not None and group_members(child.pid) == []


def test_work_still_running_at_the_grace_periods_end_is_cut_with_a_reason(
        make_service: Callable[..., tuple[Service, Exits]],
        caplog: pytest.LogCaptureFixture) -> None:
    service, exits = make_service(SHUTDOWN_GRACE_PERIOD="0.3")
    service.in_flight = lambda: 1
    caplog.set_level(logging.INFO)

    service.on_signal(signal.SIGTERM)
    service.on_signal(signal.SIGTERM)  # a second signal starts no second drain

    assert exits.wait() == 0 and exits.codes == [0]
    assert "1 job(s) still running after 0.3 s: stopping anyway" in caplog.text
    assert service.proxy is not None and service.proxy.refusal is not None
    assert "grace period" in service.proxy.refusal


@pytest.fixture
def saved_handlers() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.usefixtures("saved_handlers")
def test_stop_signals_chain_to_a_librarys_handler_once(
        make_service: Callable[..., tuple[Service, Exits]]) -> None:
    service, exits = make_service()
    library: list[int] = []
    signal.signal(signal.SIGTERM, lambda sig, frame: library.append(sig))

    service.handle_signals()
    service.handle_signals()  # idempotent: the SDK's hook calls it on every loop turn
    signal.raise_signal(signal.SIGTERM)

    assert exits.wait() == 0
    assert library == [signal.SIGTERM], "the library's handler ran, once"


@pytest.mark.usefixtures("saved_handlers")
def test_a_helper_forked_after_the_handlers_ends_on_sigterm_as_by_default(
        make_service: Callable[..., tuple[Service, Exits]]) -> None:
    """The Runpod SDK forks its heartbeat process after start-up: terminating it must end it,
    not start a second drain in the helper (which would outlive the worker)."""
    service, exits = make_service()
    service.handle_signals()
    context = multiprocessing.get_context("fork")
    running = context.Event()
    helper = context.Process(target=_helper, args=(running,))
    helper.start()
    # A signal that lands between fork() and Python's own after-fork bookkeeping is dropped
    # by Python: terminate once the helper runs, as the SDK's heartbeat is long running.
    assert running.wait(10)

    helper.terminate()
    helper.join(10)

    assert helper.exitcode == -signal.SIGTERM
    assert not exits.done.is_set(), "the worker itself was not told to stop"


def _helper(running: Any) -> None:
    running.set()
    threading.Event().wait(60)


@pytest.fixture
def saved_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("saved_handlers", "saved_logging")
def test_the_serve_context_exits_2_on_an_invalid_setting_and_1_on_a_failed_start() -> None:
    with pytest.raises(SystemExit) as invalid, serving({"GPU_MEMORY_UTILIZATION": "2"}):
        pass
    assert invalid.value.code == 2
    with pytest.raises(SystemExit) as failed, serving({"MODEL_PATH": "/nonexistent/model"}):
        pass
    assert failed.value.code == 1
