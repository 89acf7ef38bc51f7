"""Faults that must stay with one request or end in a clean status: chat templates that raise,
unexpected errors inside a worker, request ids reused after a cancel, a worker that dies while
calls are pending (then the server exits so that its supervisor restarts it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import pytest

from minisgl.ipc.messages import (
    AbortReq,
    GenerateReq,
    NewReq,
    ReqError,
    StepOut,
    TokenizeCall,
    TokenizeResult,
    TokenOut,
)
from minisgl.llm import LLM
from minisgl.models.source import DEMO_DIR
from minisgl.sampling_params import SamplingParams
from minisgl.scheduler.process import add_request
from minisgl.tokenizer.tokenizer import IncrementalDetokenizer, load_tokenizer
from minisgl.tokenizer.worker import detokenize_step, tokenizer_reply
from minisgl.v1 import common_pb2, generation_pb2, generation_pb2_grpc, model_pb2, model_pb2_grpc
from tests.helpers.server_util import Server, Streamer, pid_alive, run_server, wait_idle, wait_until

from minisgl_client import Client, build_request  # isort: skip

GREEDY: dict[str, Any] = {"temperature": 0.0, "ignore_eos": True}
ALTERNATE = "Conversation roles must alternate user/assistant/user/assistant/..."
# Like Mistral-Instruct's: two turns of the same role in a row are refused. A message whose
# content is "divide by zero" makes the template fail in a way no code expects.
TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.index0 > 0 and message['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('" + ALTERNATE + "') }}{% endif %}"
    "{% if message['content'] == 'divide by zero' %}{{ loop.index // 0 }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TWO_USERS = [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]
DIVIDE = [{"role": "user", "content": "divide by zero"}]
FINE = [{"role": "user", "content": "hi"}]


def strict_checkpoint(out: Path) -> Path:
    """The demo model with a chat template that raises (see TEMPLATE)."""
    shutil.copytree(DEMO_DIR, out)
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = TEMPLATE
    path.write_text(json.dumps(config))
    return out


def _chat_pb(messages: list[dict[str, str]]) -> common_pb2.Prompt:
    return common_pb2.Prompt(
        chat=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(**m) for m in messages])
    )


# ----- the workers' per-request guards, called directly ------------------------------------


def test_tokenizer_maps_template_refusal_and_survives_unexpected_errors(tmp_path: Path) -> None:
    tok = load_tokenizer(strict_checkpoint(tmp_path / "strict"))
    params = SamplingParams(max_new_tokens=4)

    def generate(chat: list[dict[str, str]]) -> Any:
        return tokenizer_reply(tok, GenerateReq("7", None, None, chat, params, False), 2048, 512)

    refused = generate(TWO_USERS)
    assert isinstance(refused, ReqError), refused
    assert (refused.rid, refused.code) == ("7", "invalid_argument")
    assert refused.message.startswith("prompt.chat: ") and ALTERNATE in refused.message
    broken = generate(DIVIDE)
    assert isinstance(broken, ReqError), broken
    assert broken.code == "internal" and "ZeroDivisionError" in broken.message
    assert isinstance(generate(FINE), NewReq)
    call = tokenizer_reply(tok, TokenizeCall(3, chat=DIVIDE), 2048, 512)
    assert isinstance(call, TokenizeResult) and (call.call_id, call.code) == (3, "internal")
    call = tokenizer_reply(tok, TokenizeCall(4, chat=TWO_USERS), 2048, 512)
    assert isinstance(call, TokenizeResult) and call.code == "invalid_argument", call
    assert call.error is not None and call.error.startswith("prompt.chat: ")


def test_detokenizer_error_fails_only_its_request() -> None:
    tok = load_tokenizer(DEMO_DIR)
    states: dict[str, IncrementalDetokenizer | None] = {}
    p = SamplingParams(max_new_tokens=4)
    # An id the tokenizer cannot even look up (it overflows the tokenizer's integer type).
    step = StepOut(
        [
            TokenOut("a", 100, None, None, None, None, 3, 0, p),
            TokenOut("b", 2**40, None, None, None, None, 3, 0, p),
            TokenOut("c", 101, None, None, None, None, 3, 0, p),
        ]
    )
    deltas, errors, aborts = detokenize_step(tok, states, step)
    assert [d.rid for d in deltas] == ["a", "c"]
    assert [(e.rid, e.code) for e in errors] == [("b", "internal")]
    assert "OverflowError" in errors[0].message
    assert aborts == [AbortReq("b")]  # the scheduler stops generating for it
    # b's later outputs (until the abort lands) are dropped; the others go on
    later = StepOut([TokenOut(r, 102, None, None, None, None, 3, 0) for r in "abc"])
    deltas, errors, aborts = detokenize_step(tok, states, later)
    assert [d.rid for d in deltas] == ["a", "c"] and not errors and not aborts


def test_scheduler_add_request_error_fails_only_its_request() -> None:
    llm = LLM(progress=False, num_pages=64)
    sched = llm.scheduler
    p = SamplingParams(max_new_tokens=2)
    bad = add_request(sched, NewReq("x", [1, 2, "3"], p))  # type: ignore[list-item]
    assert isinstance(bad, ReqError) and bad.code == "internal", bad
    assert "TypeError" in bad.message
    too_big = [1] * (64 * 16 + 1)  # more than the 64-page pool, less than the context
    invalid = add_request(sched, NewReq("y", too_big, p))
    assert isinstance(invalid, ReqError) and invalid.code == "invalid_argument", invalid
    assert "KV cache" in invalid.message
    assert not sched.waiting and not sched.running  # nothing of them was queued
    assert add_request(sched, NewReq("z", [1, 2, 3], p)) is None
    while sched.has_work():
        sched.step()
    sched.check_invariants()


# ----- end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("strict")
    model = strict_checkpoint(root / "model")
    with run_server(root, "--model", str(model), "--max-model-len", "512") as server:
        yield server


def _assert_serving(server: Server, client: Client, pids: dict[str, int]) -> None:
    result = client.generate(FINE, max_new_tokens=3, **GREEDY)
    assert result.completion_tokens == 3 and result.finish_reason == "length"
    assert server.health() == "SERVING"
    assert server.worker_pids() == pids and all(pid_alive(p) for p in pids.values())


@pytest.mark.slow
def test_chat_template_refusal_is_invalid_argument(strict_server: Server) -> None:
    pids = strict_server.worker_pids()
    with strict_server.channel() as ch, strict_server.client() as client:
        gen = generation_pb2_grpc.GenerationServiceStub(ch)
        model = model_pb2_grpc.ModelServiceStub(ch)
        calls = {
            "Generate": lambda: gen.Generate(
                generation_pb2.GenerateRequest(prompt=_chat_pb(TWO_USERS)), timeout=30
            ),
            "StreamGenerate": lambda: list(
                gen.StreamGenerate(
                    generation_pb2.StreamGenerateRequest(prompt=_chat_pb(TWO_USERS)), timeout=30
                )
            ),
            "Tokenize": lambda: model.Tokenize(
                model_pb2.TokenizeRequest(prompt=_chat_pb(TWO_USERS)), timeout=30
            ),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.value)
            details = err.value.details() or ""
            assert details.startswith("prompt.chat: ") and ALTERNATE in details, (name, details)
            _assert_serving(strict_server, client, pids)


@pytest.mark.slow
def test_unexpected_worker_error_fails_the_request_alone(strict_server: Server) -> None:
    pids = strict_server.worker_pids()
    with strict_server.client() as client:
        for call in (
            lambda: client.generate(DIVIDE, max_new_tokens=3),
            lambda: client.tokenize(DIVIDE),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.INTERNAL, err.value.details()
            assert "ZeroDivisionError" in (err.value.details() or "")
            _assert_serving(strict_server, client, pids)
    log = strict_server.log()
    assert "unexpected error in the tokenizer" in log and "Traceback" in log, log


@pytest.mark.slow
def test_request_id_reused_after_cancel_gets_only_its_own_output(strict_server: Server) -> None:
    """Cancel a stream called "r", at once send a new call "r": it must see its own tokens."""
    with strict_server.client(timeout=60) as client:
        mine = client.generate("mine", max_new_tokens=8, **GREEDY).token_ids
        theirs = client.generate("theirs, a longer prompt", max_new_tokens=8, **GREEDY).token_ids
        assert mine != theirs
        for i in range(12):
            old = client.stream(
                "theirs, a longer prompt", request_id="r", max_new_tokens=400, **GREEDY
            )
            assert next(old).request_id == "r"
            old.close()  # cancels the call
            if i % 2:
                result = client.generate("mine", request_id="r", max_new_tokens=8, **GREEDY)
                got = (result.request_id, result.token_ids, result.finish_reason)
            else:
                deltas = list(client.stream("mine", request_id="r", max_new_tokens=8, **GREEDY))
                ids = {d.request_id for d in deltas}
                assert ids == {"r"}, ids
                got = ("r", [t for d in deltas for t in d.token_ids], deltas[-1].finish_reason)
            assert got == ("r", mine, "length"), f"try {i}: {got}"
        wait_idle(client)


# ----- a worker that dies -------------------------------------------------------------------


def _wait_exit(server: Server, timeout: float) -> int:
    t = time.monotonic()
    while server.proc.poll() is None:
        assert time.monotonic() - t < timeout, f"the server did not exit:\n{server.log()}"
        time.sleep(0.05)
    return server.proc.returncode


@pytest.mark.slow
def test_pending_calls_fail_promptly_when_the_tokenizer_dies(tmp_path: Path) -> None:
    """Calls of every kind wait on a frozen tokenizer; it dies: all fail at once with INTERNAL,
    new ones get UNAVAILABLE, and after --exit-grace the server exits with code 1."""
    grace = 3.0
    with run_server(tmp_path, "--max-model-len", "512", "--exit-grace", str(grace)) as server:
        pids = server.worker_pids()
        tokenizer = pids["tokenizer"]
        os.kill(tokenizer, signal.SIGSTOP)
        stream = Streamer(server, "frozen", max_new_tokens=4)
        with server.channel() as ch:
            gen = generation_pb2_grpc.GenerationServiceStub(ch)
            model = model_pb2_grpc.ModelServiceStub(ch)
            pending: dict[str, Future[Any]] = {
                "Tokenize": model.Tokenize.future(
                    model_pb2.TokenizeRequest(prompt=common_pb2.Prompt(text="hi")), timeout=60
                ),
                "Detokenize": model.Detokenize.future(
                    model_pb2.DetokenizeRequest(token_ids=[5, 6]), timeout=60
                ),
                "Generate": gen.Generate.future(
                    build_request("frozen", max_new_tokens=4), timeout=60
                ),
            }
            stream.start()
            time.sleep(1.0)
            assert not any(f.done() for f in pending.values()), "the tokenizer is not frozen"
            assert stream.is_alive()
            os.kill(tokenizer, signal.SIGKILL)
            t = time.monotonic()
            for name, fut in pending.items():
                err = fut.exception(timeout=10)
                assert isinstance(err, grpc.RpcError), (name, err)
                assert err.code() == grpc.StatusCode.INTERNAL, (name, err.details())
                assert "tokenizer" in (err.details() or ""), (name, err.details())
            stream.join(10)
            assert stream.error is not None and stream.error.code() == grpc.StatusCode.INTERNAL
            assert time.monotonic() - t < 3, "pending calls failed too late"
            assert server.health() == "NOT_SERVING"
            with server.client(timeout=10) as client, pytest.raises(grpc.RpcError) as err:
                client.tokenize("late")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert _wait_exit(server, grace + 15) == 1
        assert time.monotonic() - t >= grace - 0.5, "exited before the grace"
        wait_until(lambda: not any(pid_alive(p) for p in pids.values()), 10, "workers gone")
        assert list(server.tmpdir.iterdir()) == []
