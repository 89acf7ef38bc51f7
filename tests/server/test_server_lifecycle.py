"""Server tests that need a server of their own: start-up, queue limit, scheduler death (the
server exits after a grace), SIGTERM."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from minisgl.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from tests.helpers.server_util import (
    Server,
    Streamer,
    kill_mid_stream,
    pid_alive,
    run_server,
    wait_idle,
    wait_until,
)

from minisgl_client import build_stream_request  # isort: skip

GREEDY: dict[str, Any] = {"temperature": 0.0, "ignore_eos": True}

pytestmark = pytest.mark.slow


def _assert_clean_exit(server: Server, pids: dict[str, int]) -> None:
    """No worker process left, and the socket directory is gone from the server's TMPDIR."""
    assert set(pids) == {"tokenizer", "detokenizer", "scheduler"}
    wait_until(lambda: not any(pid_alive(p) for p in pids.values()), 10, "the workers to be gone")
    assert list(server.tmpdir.iterdir()) == []


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One running request at most, two waiting; started without waiting for SERVING."""
    with run_server(
        tmp_path_factory.mktemp("small"),
        "--max-queued-requests",
        "2",
        "--max-running-requests",
        "1",
        "--max-model-len",
        "2048",
        "--max-message-mib",
        "1",
        wait=False,
    ) as server:
        server.wait_serving()
        yield server


def test_not_serving_and_unavailable_until_warm(small_server: Server) -> None:
    seen = small_server.health_seen
    # the port opens first, NOT_SERVING while the workers load, then SERVING
    assert "NOT_SERVING" in seen, seen
    assert seen.index("NOT_SERVING") < seen.index("SERVING"), seen
    assert small_server.probe_while_starting == grpc.StatusCode.UNAVAILABLE
    # SERVING only once every worker is ready
    log = small_server.log()
    order = [
        log.index("listening on"),
        log.index("scheduler ready"),
        log.index("tokenizer ready"),
        log.index("detokenizer ready"),
    ]
    serving = log.index("serving minisgl-demo")
    assert order[0] < min(order[1:]) and max(order) < serving


def test_message_over_the_transport_limit_is_resource_exhausted(small_server: Server) -> None:
    """Past --max-message-mib gRPC itself refuses the message; the server keeps serving."""
    big = generation_pb2.GenerateRequest(prompt=common_pb2.Prompt(text="x" * (2 * 2**20)))
    with small_server.channel() as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(big, timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        ok = stub.Generate(
            generation_pb2.GenerateRequest(
                prompt=common_pb2.Prompt(text="hi"), stopping={"max_new_tokens": 2}
            ),
            timeout=60,
        )
        assert len(ok.token_ids) == 2


def test_queue_limit_is_resource_exhausted(small_server: Server) -> None:
    """One request runs (2000 tokens: seconds of work), so newcomers wait for their first token;
    two may wait (--max-queued-requests 2), the rest are refused at once."""
    n = 24
    with small_server.channel() as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        running = stub.StreamGenerate(
            build_stream_request("runner", max_new_tokens=2000, **GREEDY), timeout=120
        )
        next(running)  # it has its first token: running, no longer waiting
        calls = [
            stub.StreamGenerate(
                build_stream_request(f"queue {i}", max_new_tokens=20, **GREEDY), timeout=60
            )
            for i in range(n)
        ]
        accepted, rejected = [], []
        for call in calls:
            metadata = dict(call.initial_metadata())  # returns once accepted or failed
            if "x-request-id" in metadata:
                accepted.append(call)
            else:
                assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, call.details()
                assert "queue" in (call.details() or "")
                rejected.append(call)
        assert running.is_active(), "the running request finished too early for this test"
        assert (len(accepted), len(rejected)) == (2, n - 2)
        with small_server.client() as client:
            load = client.load()
            assert load.inflight_requests == 3
            assert load.running_requests <= 1
            running.cancel()
            for call in accepted:
                call.cancel()
            wait_idle(client)  # the waiting ones left the scheduler's queue too
            # and the server still serves
            assert client.generate("after", max_new_tokens=3, **GREEDY).completion_tokens == 3


def test_scheduler_death_fails_streams_then_exits_after_the_grace(tmp_path: Path) -> None:
    """In-flight calls fail with INTERNAL, health says NOT_SERVING and new calls get
    UNAVAILABLE for --exit-grace, then the server exits with code 1 (no worker left) so that
    its supervisor restarts it."""
    grace = 4.0
    with run_server(tmp_path, "--max-model-len", "512", "--exit-grace", str(grace)) as server:
        pids = server.worker_pids()
        error = kill_mid_stream(server, "scheduler", max_new_tokens=500, timeout=30)
        died = time.monotonic()  # just after the kill, once the stream failed
        assert "scheduler" in (error.details() or "")
        with server.client(timeout=10) as client:
            t = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                client.generate("anyone there?", max_new_tokens=2)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
            assert time.monotonic() - t < 5
        assert server.proc.poll() is None  # still up during the grace, to say so
        assert server.proc.wait(grace + 20) == 1
        assert time.monotonic() - died >= grace - 1.0, "exited before the grace"
        _assert_clean_exit(server, pids)


def test_sigterm_finishes_streams_then_exits_cleanly(tmp_path: Path) -> None:
    with run_server(tmp_path, "--max-model-len", "512") as server:
        pids = server.worker_pids()
        streams = [
            Streamer(server, f"drain {i}", max_new_tokens=300 + 20 * i, **GREEDY) for i in range(4)
        ]
        for s in streams:
            s.start()
        for s in streams:
            assert s.first.wait(30) and s.deltas, s.error
        server.proc.send_signal(signal.SIGTERM)

        # new calls are refused while the streams drain
        def refused() -> bool:
            with server.client(timeout=10) as client:
                try:
                    client.generate("late", max_new_tokens=1)
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
                    return True
            return False

        wait_until(refused, 10, "new calls to be refused")
        assert any(s.is_alive() for s in streams), "streams ended before the refusal was seen"

        for s in streams:
            s.join(60)
        for i, s in enumerate(streams):
            assert not s.is_alive()
            assert s.error is None, s.error
            assert s.deltas[-1].finish_reason == "length"
            assert s.tokens == 300 + 20 * i
        assert server.proc.wait(60) == 0
        log = server.log()
        assert re.search(r"shutting down: draining [1-4] requests", log), log
        assert "stopped" in log
        _assert_clean_exit(server, pids)


def test_sigterm_while_starting_exits_promptly(tmp_path: Path) -> None:
    with run_server(tmp_path, wait=False) as server:
        wait_until(lambda: server.health() == "NOT_SERVING", 60, "the port to open")
        pids = wait_until(
            lambda: p if len(p := server.worker_pids()) == 3 else None, 30, "the workers to start"
        )
        assert server.health() == "NOT_SERVING"  # still loading
        t = time.monotonic()
        assert server.terminate(timeout=30) == 0
        # workers still loading are not waited for (they cannot hear a shutdown message)
        assert time.monotonic() - t < 8, server.log()
        assert "did not exit" not in server.log()
        _assert_clean_exit(server, pids)
