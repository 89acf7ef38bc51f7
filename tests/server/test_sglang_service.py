"""sglang.grpc.scheduler.SglangScheduler (smg-grpc-proto's stubs) against one real `minisgl
serve` with an API key: every RPC, the refused fields, cancellation, deadlines and drain.
No smg here (tests/server/test_smg.py runs the gateway)."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import threading
import time
import zipfile
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from smg_grpc_proto import sglang_scheduler_pb2 as sgl
from smg_grpc_proto import sglang_scheduler_pb2_grpc as sgl_grpc
from smg_grpc_proto.generated import common_pb2 as smg_common
from tokenizers import Tokenizer

from minisgl.kvcache.allocator import PageAllocator
from minisgl.kvcache.radix import BlocksRemoved, BlocksStored, RadixCache, block_hash
from minisgl.models.source import DEMO_DIR
from tests.helpers.server_util import Server, run_server, wait_until

from minisgl_client import Client  # isort: skip

pytestmark = pytest.mark.slow

KEY = "sglang-key-3f0a9c"
AUTH = (("authorization", f"Bearer {KEY}"),)
CALL_S = 60.0
PROMPT = [275, 575, 291, 300, 301, 302, 303, 304]
LONG_PROMPT = list(range(100, 400))  # 300 tokens: 18 whole pages of 16 to cache


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("sglang"), "--api-key", KEY) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server: Server) -> Iterator[Any]:
    with grpc.insecure_channel(server.target) as ch:
        yield sgl_grpc.SglangSchedulerStub(ch)


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[Client]:
    with Client(server.target, timeout=CALL_S, api_key=KEY) as c:
        yield c


def greedy(
    rid: str = "", ids: list[int] | None = None, max_new_tokens: int = 8, **sampling: Any
) -> sgl.GenerateRequest:
    """A greedy sglang request as smg sends it (every sampling default filled in)."""
    params = sgl.SamplingParams(
        temperature=0.0, top_p=1.0, top_k=-1, repetition_penalty=1.0, n=1, ignore_eos=True
    )
    params.max_new_tokens = max_new_tokens
    for name, value in sampling.items():
        if isinstance(value, list):
            getattr(params, name).extend(value)
        else:
            setattr(params, name, value)
    req = sgl.GenerateRequest(request_id=rid, sampling_params=params, logprob_start_len=-1)
    req.tokenized.input_ids.extend(ids or PROMPT)
    return req


def generate(stub: Any, req: sgl.GenerateRequest, timeout: float = CALL_S) -> list[Any]:
    return list(stub.Generate(req, timeout=timeout, metadata=AUTH))


def code_of(fn: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    err: Any = info.value
    return err.code(), err.details()


def test_generate_unary_and_streaming_match_minisgl(stub: Any, client: Client) -> None:
    want = client.generate(PROMPT, max_new_tokens=8, temperature=0.0, ignore_eos=True)
    [done] = generate(stub, greedy("unary-1"))
    assert done.request_id == "unary-1" and done.WhichOneof("response") == "complete"
    c = done.complete
    assert list(c.output_ids) == want.token_ids and len(want.token_ids) == 8
    assert (c.finish_reason, c.prompt_tokens, c.completion_tokens) == ("length", len(PROMPT), 8)
    req = greedy("stream-1")
    req.stream = True
    msgs = generate(stub, req)
    chunks, last = msgs[:-1], msgs[-1]
    assert all(m.WhichOneof("response") == "chunk" for m in chunks)
    assert [t for m in chunks for t in m.chunk.token_ids] == want.token_ids
    assert [m.chunk.completion_tokens for m in chunks][-1] == 8  # cumulative
    assert last.WhichOneof("response") == "complete"
    assert last.complete.finish_reason == "length" and last.complete.completion_tokens == 8
    assert list(last.complete.output_ids) == []  # streamed: the tokens went in the chunks


def test_n_samples_are_indexed(stub: Any, client: Client) -> None:
    want = client.generate(PROMPT, max_new_tokens=6, temperature=0.0, ignore_eos=True)
    done = generate(stub, greedy("n-2", max_new_tokens=6, n=2))
    assert sorted(m.complete.index for m in done) == [0, 1]
    assert all(list(m.complete.output_ids) == want.token_ids for m in done)
    req = greedy("n-3-stream", max_new_tokens=6, n=3)
    req.stream = True
    msgs = generate(stub, req)
    for i in range(3):
        ids = [
            t for m in msgs if m.HasField("chunk") and m.chunk.index == i for t in m.chunk.token_ids
        ]
        assert ids == want.token_ids
    assert sorted(m.complete.index for m in msgs if m.HasField("complete")) == [0, 1, 2]


def test_stop_token_and_stop_string(stub: Any, client: Client) -> None:
    want = client.generate(PROMPT, max_new_tokens=8, temperature=0.0, ignore_eos=True)
    stop_id = want.token_ids[2]
    [done] = generate(stub, greedy("stop-id", stop_token_ids=[stop_id], ignore_eos=False))
    first = want.token_ids.index(stop_id)
    assert done.complete.finish_reason == "stop"
    assert done.complete.WhichOneof("matched_stop") == "matched_token_id"
    assert done.complete.matched_token_id == stop_id
    assert list(done.complete.output_ids) == want.token_ids[: first + 1]
    text = client.detokenize(want.token_ids)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    [done] = generate(stub, greedy("stop-str", stop=[stop]))
    assert done.complete.finish_reason == "stop"
    assert done.complete.matched_stop_str == stop
    assert done.complete.completion_tokens < 8


def test_logprobs_match_minisgl(stub: Any, client: Client) -> None:
    want = client.generate(
        PROMPT, max_new_tokens=5, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=3
    )
    req = greedy("lp", max_new_tokens=5)
    req.return_logprob, req.top_logprobs_num = True, 3
    [done] = generate(stub, req)
    lp = done.complete.output_logprobs
    assert list(lp.token_ids) == want.token_ids
    assert lp.token_logprobs == pytest.approx([x.chosen.logprob for x in want.logprobs])
    assert [list(t.token_ids) for t in lp.top_logprobs] == [
        [t.token_id for t in x.top] for x in want.logprobs
    ]
    req.stream = True
    msgs = generate(stub, req)
    streamed = [
        v for m in msgs if m.HasField("chunk") for v in m.chunk.output_logprobs.token_logprobs
    ]
    assert streamed == pytest.approx(list(lp.token_logprobs))


def _with(req: sgl.GenerateRequest, path: str, value: Any) -> sgl.GenerateRequest:
    target: Any = req
    *parents, name = path.split(".")
    for p in parents:
        target = getattr(target, p)
    field = getattr(target, name)
    if hasattr(field, "extend"):
        field.extend(value)
    elif hasattr(field, "CopyFrom"):
        field.CopyFrom(value)
    elif hasattr(field, "update"):
        field.update(value)
    else:
        setattr(target, name, value)
    return req


UNSUPPORTED = [
    ("sampling_params.structural_tag", "{}", "sampling_params.structural_tag"),
    ("sampling_params.logit_bias", {"5": 1.0}, "sampling_params.logit_bias"),
    ("mm_inputs", sgl.MultimodalInputs(image_urls=["http://x/y.png"]), "mm_inputs"),
    ("input_embeds", [0.5], "input_embeds"),
    ("return_hidden_states", True, "return_hidden_states"),
    ("lora_id", "adapter-1", "lora_id"),
    ("custom_logit_processor", "x", "custom_logit_processor"),
    ("disaggregated_params", sgl.DisaggregatedParams(bootstrap_host="h"), "disaggregated_params"),
    ("token_ids_logprob", [5], "token_ids_logprob"),
]


@pytest.mark.parametrize(("path", "value", "field"), UNSUPPORTED)
def test_unsupported_fields_are_unimplemented(stub: Any, path: str, value: Any, field: str) -> None:
    req = _with(greedy(), path, value)
    code, details = code_of(lambda: generate(stub, req))
    assert code == grpc.StatusCode.UNIMPLEMENTED and details.startswith(field), details


@pytest.mark.parametrize(
    ("field", "value", "ok"),
    [
        ("regex", "(yes|no)", lambda text: text in ("yes", "no")),
        ("json_schema", '{"type": "object", "properties": {"a": {"type": "integer"}}}', None),
        ("ebnf_grammar", 'root ::= "ab" | "cd"', lambda text: text in ("ab", "cd")),
    ],
)
def test_constraints_shape_the_tokens(stub: Any, field: str, value: str, ok: Any) -> None:
    """sglang's constraint fields map onto minisgl's structured output: the returned tokens
    decode to text the constraint accepts (the demo model's own choice is random)."""
    req = _with(greedy(max_new_tokens=64), f"sampling_params.{field}", value)
    [done] = generate(stub, req)
    assert done.complete.finish_reason == "stop"  # the grammar ended it, not the length
    tok = Tokenizer.from_file(str(DEMO_DIR / "tokenizer.json"))
    text = tok.decode(list(done.complete.output_ids), skip_special_tokens=True)
    if ok is None:
        assert isinstance(json.loads(text), dict), text
    else:
        assert ok(text), text


def test_a_constraint_that_does_not_compile_names_sglangs_field(stub: Any) -> None:
    req = _with(greedy(), "sampling_params.regex", "(unclosed")
    code, details = code_of(lambda: generate(stub, req))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith("sampling_params.regex: "), details


def test_prompt_logprobs_are_unimplemented(stub: Any) -> None:
    req = greedy()
    req.return_logprob, req.logprob_start_len = True, 0
    code, details = code_of(lambda: generate(stub, req))
    assert code == grpc.StatusCode.UNIMPLEMENTED and details.startswith("logprob_start_len")


INVALID = [
    ({"temperature": -1.0}, "sampling_params.temperature"),
    ({"top_p": 0.0}, "sampling_params.top_p"),
    ({"min_p": 2.0}, "sampling_params.min_p"),
    ({"presence_penalty": 5.0}, "sampling_params.presence_penalty"),
    ({"n": 17}, "sampling_params.n"),
    ({"stop": [""]}, "sampling_params.stop"),
    ({"stop_token_ids": [10**6]}, "sampling_params.stop_token_ids"),
    ({"min_new_tokens": 50}, "sampling_params.min_new_tokens"),
]


@pytest.mark.parametrize(("sampling", "field"), INVALID)
def test_invalid_fields_name_the_field(stub: Any, sampling: dict[str, Any], field: str) -> None:
    code, details = code_of(lambda: generate(stub, greedy(**sampling)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field), details


def test_invalid_prompts_and_ids(stub: Any) -> None:
    empty = greedy()
    del empty.tokenized.input_ids[:]
    code, details = code_of(lambda: generate(stub, empty))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("tokenized.input_ids")
    code, details = code_of(lambda: generate(stub, greedy(ids=[1, 10**6])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("tokenized.input_ids")
    code, details = code_of(lambda: generate(stub, greedy(max_new_tokens=2045)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith("sampling_params.max_new_tokens"), details
    code, details = code_of(lambda: generate(stub, greedy(rid="bad id!")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("request_id")
    pinned = greedy()
    pinned.data_parallel_rank = 1
    code, details = code_of(lambda: generate(stub, pinned))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("data_parallel_rank")


def test_malformed_request_names_the_field(server: Server) -> None:
    raw = b"\n\x02\xff\xfe" + greedy().SerializeToString()  # request_id: not UTF-8
    with grpc.insecure_channel(server.target) as ch:
        call = ch.unary_stream("/sglang.grpc.scheduler.SglangScheduler/Generate")
        code, details = code_of(lambda: list(call(raw, metadata=AUTH, timeout=CALL_S)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("request_id"), details


def test_api_key_required(server: Server) -> None:
    with grpc.insecure_channel(server.target) as ch:
        bare = sgl_grpc.SglangSchedulerStub(ch)
        for call in (
            lambda: list(bare.Generate(greedy(), timeout=CALL_S)),
            lambda: bare.GetModelInfo(sgl.GetModelInfoRequest(), timeout=CALL_S),
            lambda: bare.GetLoads(sgl.GetLoadsRequest(), timeout=CALL_S),
        ):
            code, _ = code_of(call)
            assert code == grpc.StatusCode.UNAUTHENTICATED


def _open_stream(stub: Any, rid: str, max_new_tokens: int = 2000, **kw: Any) -> Any:
    req = greedy(rid, max_new_tokens=max_new_tokens)
    req.stream = True
    call = stub.Generate(req, metadata=AUTH, **kw)
    first = next(call)
    assert first.HasField("chunk")
    return call


def _wait_idle(stub: Any) -> None:
    def idle() -> bool:
        load = stub.GetLoads(sgl.GetLoadsRequest(), timeout=CALL_S, metadata=AUTH).loads[0]
        info = stub.GetServerInfo(sgl.GetServerInfoRequest(), timeout=CALL_S, metadata=AUTH)
        return load.num_running_reqs == 0 and info.active_requests == 0

    wait_until(idle, 30, "no request running")


def test_abort_ends_the_stream(stub: Any) -> None:
    call = _open_stream(stub, "to-abort", timeout=CALL_S)
    resp = stub.Abort(sgl.AbortRequest(request_id="to-abort", reason="test"), metadata=AUTH)
    assert resp.success, resp.message
    rest = list(call)
    assert rest[-1].HasField("complete") and rest[-1].complete.finish_reason == "abort"
    assert rest[-1].complete.completion_tokens < 2000
    missing = stub.Abort(sgl.AbortRequest(request_id="to-abort"), metadata=AUTH)
    assert not missing.success
    _wait_idle(stub)


def test_abort_of_n_samples(stub: Any) -> None:
    req = greedy("n-abort", max_new_tokens=2000, n=2)
    req.stream = True
    call = stub.Generate(req, metadata=AUTH, timeout=CALL_S)
    next(call)
    assert stub.Abort(sgl.AbortRequest(request_id="n-abort"), metadata=AUTH).success
    ends = [m.complete for m in call if m.HasField("complete")]
    assert sorted(c.index for c in ends) == [0, 1]
    assert all(c.finish_reason == "abort" for c in ends)
    _wait_idle(stub)


def test_cancel_and_deadline_free_the_request(stub: Any) -> None:
    call = _open_stream(stub, "to-cancel", timeout=CALL_S)
    call.cancel()
    _wait_idle(stub)
    req = greedy("deadline", max_new_tokens=2000, n=2)
    code, _ = code_of(lambda: generate(stub, req, timeout=1.0))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_idle(stub)


def test_health_model_and_server_info(stub: Any, client: Client) -> None:
    health = stub.HealthCheck(sgl.HealthCheckRequest(), timeout=CALL_S, metadata=AUTH)
    assert health.healthy and health.message == "serving"
    mine = client.model_info()
    info = stub.GetModelInfo(sgl.GetModelInfoRequest(), timeout=CALL_S, metadata=AUTH)
    assert info.served_model_name == mine.model and info.is_generation
    assert info.max_context_length == mine.context_length
    assert info.vocab_size == mine.vocab_size
    assert list(info.eos_token_ids) == list(mine.eos_token_ids)
    assert list(info.architectures) == [mine.architecture]
    assert info.tokenizer_path == ""  # smg fetches the tokenizer with GetTokenizer
    server = stub.GetServerInfo(sgl.GetServerInfoRequest(), timeout=CALL_S, metadata=AUTH)
    assert server.server_type == "grpc" and server.sglang_version.startswith("minisgl")
    assert server.max_total_num_tokens == mine.kv_cache_tokens
    assert server.server_args["page_size"] == mine.page_size
    assert server.uptime_seconds > 0 and server.last_receive_timestamp > 0


def test_get_loads_reports_a_running_request(stub: Any) -> None:
    call = _open_stream(stub, "loaded", timeout=CALL_S)
    try:

        def loads() -> Any:  # the scheduler reports its load every 20 ms at most
            resp = stub.GetLoads(
                sgl.GetLoadsRequest(include=["all"]), timeout=CALL_S, metadata=AUTH
            )
            return resp if resp.loads[0].num_running_reqs == 1 else None

        resp = wait_until(loads, 10, "GetLoads to show the running request")
        assert resp.dp_rank_count == 1
        [load] = resp.loads
        assert load.num_running_reqs == 1 and load.num_total_reqs >= 1
        assert 0 < load.num_used_tokens <= load.max_total_num_tokens
        assert load.token_usage == pytest.approx(
            load.num_used_tokens / load.max_total_num_tokens, abs=1e-3
        )
        assert load.memory.token_capacity == load.max_total_num_tokens
        assert resp.aggregate.total_running_reqs == 1
    finally:
        call.cancel()
    code, details = code_of(
        lambda: stub.GetLoads(sgl.GetLoadsRequest(include=["gpu"]), timeout=CALL_S, metadata=AUTH)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("include")
    code, details = code_of(
        lambda: stub.GetLoads(sgl.GetLoadsRequest(dp_rank=2), timeout=CALL_S, metadata=AUTH)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("dp_rank")
    _wait_idle(stub)


def test_get_tokenizer_streams_the_tokenizer(stub: Any, client: Client) -> None:
    chunks = list(
        stub.GetTokenizer(smg_common.GetTokenizerRequest(), timeout=CALL_S, metadata=AUTH)
    )
    data = b"".join(c.data for c in chunks)
    assert [c.sha256 for c in chunks[:-1]] == [""] * (len(chunks) - 1)
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = set(zf.namelist())
        assert {"tokenizer.json", "tokenizer_config.json"} <= names
        tok = Tokenizer.from_str(zf.read("tokenizer.json").decode())
        assert "chat_template" in json.loads(zf.read("tokenizer_config.json"))
    text = "The quick brown fox jumps over the lazy dog"
    assert tok.encode(text).ids == client.tokenize(text)


def test_flush_cache_releases_the_radix_cache(stub: Any) -> None:
    def cached(rid: str) -> int:
        [done] = generate(stub, greedy(rid, ids=LONG_PROMPT, max_new_tokens=1))
        return int(done.complete.cached_tokens)

    cached("warm")
    assert cached("hit") >= 256
    flush = smg_common.FlushCacheRequest(timeout_s=5)
    resp = stub.FlushCache(flush, timeout=CALL_S, metadata=AUTH)
    assert resp.success, resp.message
    assert cached("after-flush") == 0
    call = _open_stream(stub, "busy", timeout=CALL_S)
    try:
        busy = stub.FlushCache(smg_common.FlushCacheRequest(), timeout=CALL_S, metadata=AUTH)
        assert not busy.success and "in flight" in busy.message
    finally:
        call.cancel()
    code, details = code_of(
        lambda: stub.FlushCache(smg_common.FlushCacheRequest(timeout_s=-1), metadata=AUTH)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("timeout_s")
    _wait_idle(stub)


def _stored_blocks(batches: list[Any]) -> list[Any]:
    return [
        b
        for batch in batches
        for e in batch.events
        if e.HasField("stored")
        for b in e.stored.blocks
    ]


def test_subscribe_kv_events_streams_the_radix_cache(stub: Any) -> None:
    """A long prompt's pages arrive as stored blocks (16 tokens each, hashes chained from
    the root), FlushCache's evictions as removed ones; a subscriber can resume."""
    assert stub.FlushCache(smg_common.FlushCacheRequest(timeout_s=5), metadata=AUTH).success
    call = stub.SubscribeKvEvents(
        smg_common.SubscribeKvEventsRequest(), metadata=AUTH, timeout=CALL_S
    )
    try:
        generate(stub, greedy("kv-events", ids=LONG_PROMPT, max_new_tokens=1))
        batches = [next(call)]
        while len(_stored_blocks(batches)) < len(LONG_PROMPT) // 16:
            batches.append(next(call))
        blocks = _stored_blocks(batches)
        first = next(e.stored for b in batches for e in b.events if e.HasField("stored"))
        assert not first.HasField("parent_block_hash")  # from the root
        assert all(b.block_size == 16 for b in blocks)
        assert [t for b in blocks for t in b.token_ids] == LONG_PROMPT[: 16 * len(blocks)]
        parent = None
        for b in blocks:
            assert b.block_hash == block_hash(parent, list(b.token_ids))
            parent = b.block_hash
        assert stub.FlushCache(smg_common.FlushCacheRequest(timeout_s=5), metadata=AUTH).success
        removed: set[int] = set()
        while not {b.block_hash for b in blocks} <= removed:
            batch = next(call)
            removed.update(
                h for e in batch.events if e.HasField("removed") for h in e.removed.block_hashes
            )
    finally:
        call.cancel()
    resumed = stub.SubscribeKvEvents(
        smg_common.SubscribeKvEventsRequest(start_sequence_number=batches[0].sequence_number),
        metadata=AUTH,
        timeout=CALL_S,
    )
    try:
        again = next(resumed)
        assert again.sequence_number == batches[0].sequence_number
        assert list(again.events) == list(batches[0].events)
    finally:
        resumed.cancel()


def test_radix_cache_events_follow_its_pages() -> None:
    """Inserts record each new page once (a split keeps the hashes), evictions free them."""
    alloc = PageAllocator(64)
    cache = RadixCache(4, alloc)
    cache.record_events()
    a = list(range(100, 112))  # 3 pages
    b = [*a[:4], 7, 7, 7, 7]  # shares the first page
    cache.insert(a, alloc.alloc(3))
    [stored] = cache.take_events()
    assert isinstance(stored, BlocksStored) and stored.parent is None
    assert [t for _, t in stored.blocks] == [a[0:4], a[4:8], a[8:12]]
    hashes = [h for h, _ in stored.blocks]
    cache.insert(b, alloc.alloc(2))  # splits a's node after its first page
    [branch] = cache.take_events()
    assert isinstance(branch, BlocksStored) and branch.parent == hashes[0]
    assert branch.blocks == [(block_hash(hashes[0], [7, 7, 7, 7]), [7, 7, 7, 7])]
    cache.check()
    assert cache.take_events() == []
    cache.reset()
    freed = {h for e in cache.take_events() if isinstance(e, BlocksRemoved) for h in e.hashes}
    assert freed == {*hashes, branch.blocks[0][0]}
    assert cache.cached_pages == 0 and alloc.num_free == 64


def test_unimplemented_rpcs(stub: Any) -> None:
    code, _ = code_of(lambda: stub.Embed(sgl.EmbedRequest(), metadata=AUTH))
    assert code == grpc.StatusCode.UNIMPLEMENTED
    code, _ = code_of(lambda: stub.LoadLoRAAdapter(sgl.LoadLoRAAdapterRequest(), metadata=AUTH))
    assert code == grpc.StatusCode.UNIMPLEMENTED
    listed = stub.ListLoadedLoRAAdapters(sgl.ListLoadedLoRAAdaptersRequest(), metadata=AUTH)
    assert list(listed.loaded_adapters) == []


def test_drain_refuses_new_calls_and_finishes_old_ones(server: Server, stub: Any) -> None:
    """Last in this module: SIGTERM the server."""
    req = greedy("draining", max_new_tokens=64)
    req.stream = True
    got: list[Any] = []
    errors: list[grpc.RpcError] = []

    def consume() -> None:
        try:
            got.extend(stub.Generate(req, metadata=AUTH, timeout=CALL_S))
        except grpc.RpcError as e:
            errors.append(e)

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    wait_until(lambda: got, 30, "the first chunk")
    server.proc.send_signal(signal.SIGTERM)

    def unhealthy() -> bool:
        h = stub.HealthCheck(sgl.HealthCheckRequest(), timeout=CALL_S, metadata=AUTH)
        return not h.healthy

    wait_until(unhealthy, 30, "HealthCheck unhealthy while draining")
    code, details = code_of(lambda: generate(stub, greedy("late")))
    assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details
    reader.join(CALL_S)
    assert not errors and got[-1].HasField("complete"), errors
    assert got[-1].complete.finish_reason == "length" and got[-1].complete.completion_tokens == 64
    deadline = time.monotonic() + 60
    while server.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.proc.returncode == 0
