"""minisgl behind smg (the Shepherd Model Gateway): the real `smg launch --backend sglang` in
front of two `minisgl serve` replicas (demo model) over sglang.grpc.scheduler, the official
openai client against smg. Chat and completions against minisgl's own API, cache-aware
routing measured against round robin, and a replica killed mid-run then brought back."""

from __future__ import annotations

import json
import re
import shlex
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tests.helpers.real_model import CHAT, PLAIN, smollm2_gguf
from tests.helpers.server_util import REPO, Server, free_port, wait_until
from tests.helpers.smg_util import (
    Gateway,
    cached_tokens,
    flush,
    run_replicas,
    run_smg,
    shared_prefix_prompts,
    start_replica,
    stop_replica,
    stop_replicas,
    worker_url,
)

from minisgl_client import Client  # isort: skip

pytestmark = pytest.mark.slow

MODEL = "minisgl-demo"
CALL_S = 60.0
PROMPT = "The cat sat on the mat and"
GREEDY: dict[str, Any] = {"temperature": 0.0}
REAL_FLAGS = ("--dtype", "float32", "--num-pages", "256")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("smg")


@pytest.fixture(scope="module")
def real(workdir: Path) -> Iterator[Server]:
    """A replica of the real model (SmolLM2-135M-Instruct, GGUF), started first so that its
    start-up overlaps the demo replicas' and the tests before its own."""
    gguf = smollm2_gguf()
    real_dir = workdir / "real"
    real_dir.mkdir()
    server = start_replica(real_dir, free_port(), "--model", str(gguf), *REAL_FLAGS)
    try:
        yield server
    finally:
        stop_replica(server)


@pytest.fixture(scope="module")
def replicas(workdir: Path, real: Server) -> Iterator[list[Server]]:
    """Two replicas, still starting when this returns (the gateway fixture waits); a test
    may replace one (the list is the fixture's)."""
    with run_replicas(workdir, 2) as servers:
        current = list(servers)
        yield current
        stop_replicas([s for s in current if s not in servers])


@pytest.fixture(scope="module")
def gateway(workdir: Path, replicas: list[Server]) -> Iterator[Gateway]:
    """smg with cache_aware routing, started while the replicas still warm up: it must
    register them once they serve (their HealthCheck answers UNAVAILABLE until then)."""
    with run_smg(workdir, replicas, "--policy", "cache_aware") as gw:
        for r in replicas:
            r.wait_serving()
        yield gw


@pytest.fixture(scope="module")
def oai(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gateway.base_url + "/v1", api_key="unused", timeout=CALL_S, max_retries=0
    )


@pytest.fixture(scope="module")
def minisgl(replicas: list[Server]) -> Iterator[Client]:
    with Client(replicas[0].target, timeout=CALL_S) as c:
        yield c


def test_completions_match_minisgl(oai: openai.OpenAI, minisgl: Client) -> None:
    want = minisgl.generate(PROMPT, max_new_tokens=12, ignore_eos=True, **GREEDY)
    got = oai.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, extra_body={"ignore_eos": True}, **GREEDY
    )
    assert got.choices[0].text == want.text and want.text
    assert got.choices[0].finish_reason == "length"
    assert got.usage is not None
    assert got.usage.prompt_tokens == len(minisgl.tokenize(PROMPT)) == want.prompt_tokens
    assert got.usage.completion_tokens == 12
    stream = oai.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
        **GREEDY,
    )
    parts, usage = [], None
    for event in stream:
        parts.extend(c.text for c in event.choices)
        usage = event.usage or usage
    assert "".join(parts) == want.text
    assert usage is not None and usage.completion_tokens == 12
    assert usage.prompt_tokens == want.prompt_tokens


def test_chat_matches_minisgl(oai: openai.OpenAI, minisgl: Client) -> None:
    """smg renders the chat template itself: the same prompt tokens as minisgl's template and
    the same greedy tokens. The demo model answers a chat with blank lines: smg's
    non-streamed message trims them (to None), its stream carries them with their logprobs."""
    messages = [{"role": "user", "content": "Tell me about the cat on the mat."}]
    want = minisgl.generate(
        messages, max_new_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=2, **GREEDY
    )
    got = oai.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=6,
        extra_body={"ignore_eos": True},
        **GREEDY,
    )
    assert got.usage is not None
    assert got.usage.prompt_tokens == len(minisgl.tokenize(messages)) == want.prompt_tokens
    assert got.usage.completion_tokens == 6
    assert got.choices[0].finish_reason == "length"
    assert (got.choices[0].message.content or "") == want.text.strip()
    stream = oai.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=6,
        logprobs=True,
        top_logprobs=2,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
        **GREEDY,
    )
    text, logprobs, usage = [], [], None
    for event in stream:
        usage = event.usage or usage
        for c in event.choices:
            text.append(c.delta.content or "")
            if c.logprobs is not None and c.logprobs.content is not None:
                logprobs.extend(c.logprobs.content)
    assert "".join(text) == want.text
    assert usage is not None and usage.completion_tokens == 6
    assert [t.logprob for t in logprobs] == pytest.approx(
        [lp.chosen.logprob for lp in want.logprobs], abs=1e-4
    )
    assert [[x.logprob for x in t.top_logprobs] for t in logprobs] == [
        pytest.approx([x.logprob for x in lp.top], abs=1e-4) for lp in want.logprobs
    ]


def test_stop_strings_n_and_max_tokens(oai: openai.OpenAI, minisgl: Client) -> None:
    want = minisgl.generate(PROMPT, max_new_tokens=12, ignore_eos=True, **GREEDY)
    stop = want.text[3:5]
    cut = minisgl.generate(PROMPT, max_new_tokens=12, stop=[stop], **GREEDY)
    got = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, stop=[stop], **GREEDY)
    assert got.choices[0].finish_reason == "stop"
    assert got.choices[0].text == cut.text == want.text[: want.text.index(stop)]
    two = oai.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, n=2, extra_body={"ignore_eos": True}, **GREEDY
    )
    five = minisgl.generate(PROMPT, max_new_tokens=5, ignore_eos=True, **GREEDY)
    assert sorted(c.index for c in two.choices) == [0, 1]
    assert [c.text for c in two.choices] == [five.text, five.text]
    assert two.usage is not None and two.usage.completion_tokens == 10


def _send_all(oai: openai.OpenAI, prompts: list[str]) -> int:
    """Send each prompt in turn (one token each); the cached prompt tokens smg reported."""
    total = 0
    for p in prompts:
        r = oai.completions.create(model=MODEL, prompt=p, max_tokens=1, **GREEDY)
        assert r.usage is not None
        details = r.usage.prompt_tokens_details
        total += (details.cached_tokens or 0) if details is not None else 0
    return total


EVENT_HIT = 'smg_cache_aware_policy_branch_total{branch="event_hit"}'


def test_cache_aware_routing_keeps_prefixes_together(
    workdir: Path, replicas: list[Server], gateway: Gateway, oai: openai.OpenAI, minisgl: Client
) -> None:
    """8 groups of 4 prompts sharing a ~500-token prefix each. cache_aware (fed by the
    replicas' KV events): the two replicas' cached tokens together >= 90% of what one
    replica alone caches for the same workload; round robin splits the groups, so each
    replica misses each prefix once."""
    prompts = shared_prefix_prompts(groups=8, per_group=4, words=200)

    def replicas_cached(send: Callable[[], int]) -> int:
        """The cached tokens the replicas reported on each response of `send`'s workload,
        checked against their own counters (GetServerInfo, updated within ~0.1 s)."""
        for r in replicas:
            flush(r)
        before = sum(cached_tokens(r) for r in replicas)
        total = send()
        wait_until(
            lambda: sum(cached_tokens(r) for r in replicas) - before == total,
            10,
            f"the replicas' counters to show {total} more cached tokens",
        )
        return total

    def alone() -> int:
        return sum(minisgl.generate(p, max_new_tokens=1, **GREEDY).cached_tokens for p in prompts)

    single = replicas_cached(alone)
    hits_before = gateway.metrics().get(EVENT_HIT, 0.0)
    cache_aware = replicas_cached(lambda: _send_all(oai, prompts))
    # smg routed on the replicas' KV events (SubscribeKvEvents): its positional index
    # found the prefixes, for all but each group's first prompt
    hits = gateway.metrics().get(EVENT_HIT, 0.0) - hits_before
    assert hits >= 8 * 3, gateway.metrics()
    with run_smg(workdir, replicas, "--policy", "round_robin") as rr_gw:
        rr = openai.OpenAI(base_url=rr_gw.base_url + "/v1", api_key="unused", max_retries=0)
        round_robin = replicas_cached(lambda: _send_all(rr, prompts))
    print(
        f"\ncached prompt tokens, 8 groups x 4 prompts: one replica alone {single}, "
        f"smg cache_aware over 2 replicas {cache_aware} ({cache_aware / single:.0%}), "
        f"smg round_robin {round_robin} ({round_robin / single:.0%})"
    )
    assert single > 0.7 * len(prompts) * 480  # all but each group's first prompt hit
    assert cache_aware >= 0.9 * single
    assert round_robin <= 0.8 * single


def _long_request(oai: openai.OpenAI, i: int, results: list[Any], stream: bool) -> None:
    """Append (stream, outcome, detail): outcome "ok", an HTTP status, or "stream-error"
    (a stream cut after its first bytes: smg cannot retry what it already sent)."""
    try:
        if stream:
            events = oai.completions.create(
                model=MODEL,
                prompt=f"request {i} is long",
                max_tokens=300,
                stream=True,
                extra_body={"ignore_eos": True},
                **GREEDY,
            )
            text = "".join(c.text for e in events for c in e.choices)
            results.append((True, "ok", text))
        else:
            r = oai.completions.create(
                model=MODEL,
                prompt=f"request {i} is long",
                max_tokens=300,
                extra_body={"ignore_eos": True},
                **GREEDY,
            )
            results.append((False, "ok", r.choices[0].text))
    except openai.APIStatusError as e:
        results.append((stream, e.status_code, e.message))
    except openai.APIError as e:  # a stream cut off after its 200: an error event
        results.append((stream, "stream-error", str(e)))


RETRYABLE = {429, 502, 503, 504}


def test_replica_killed_then_readmitted(
    workdir: Path, replicas: list[Server], gateway: Gateway
) -> None:
    """The last test of the demo replicas. SIGKILL one while both serve long requests: the
    survivor takes every new request, none is lost (the dead one's in-flight calls are
    retried by smg or fail with a retryable status), and the restarted replica gets
    requests again once smg sees it healthy."""
    victim = replicas[1]
    with run_smg(workdir, replicas, "--policy", "round_robin") as gw:
        oai = openai.OpenAI(base_url=gw.base_url + "/v1", api_key="unused", max_retries=0)
        results: list[Any] = []
        threads = [
            threading.Thread(target=_long_request, args=(oai, i, results, i % 3 == 0))
            for i in range(6)
        ]
        for t in threads:
            t.start()
        with Client(victim.target, timeout=CALL_S) as vc:
            wait_until(lambda: vc.load().running_requests > 0, 30, "the victim to run requests")
        victim.kill()
        for t in threads:
            t.join(CALL_S * 2)
        assert len(results) == 6, results
        for stream, outcome, detail in results:
            assert (
                outcome == "ok" or outcome in RETRYABLE or (stream and outcome == "stream-error")
            ), detail
        print(f"\nin-flight at the kill (stream, outcome): {[r[:2] for r in results]}")
        for i in range(8):  # smg has not probed the dead one yet: it must fail over
            r = oai.completions.create(model=MODEL, prompt=f"after {i}", max_tokens=2, **GREEDY)
            assert r.choices[0].text is not None
        wait_until(
            lambda: gw.healthy_workers() == {worker_url(replicas[0])}, 30, "the victim unhealthy"
        )
        back = start_replica(workdir / "replica1", victim.port)
        replicas[1] = back
        back.wait_serving()
        gw.wait_workers([worker_url(r) for r in replicas], timeout=30)
        for i in range(6):
            oai.completions.create(model=MODEL, prompt=f"back {i}", max_tokens=2, **GREEDY)
        served = [line for line in back.log().splitlines() if "request cmpl-" in line]
        assert served, "the restarted replica got no request from smg"


def test_deploy_files_give_smg_real_flags() -> None:
    """docker/compose.smg.yaml and docker/k8s/smg.yaml: smg's own parser takes their
    arguments, and the ports, URLs and selector agree with the replicas they front."""
    from smg.launch_router import parse_router_args

    docker = REPO / "docker"
    entry = json.loads(
        re.findall(r"^ENTRYPOINT\s+(.+)$", (docker / "Dockerfile").read_text(), re.M)[-1]
    )
    grpc_port = int(entry[entry.index("--port") + 1])

    compose = yaml.safe_load((docker / "compose.smg.yaml").read_text())
    smg = compose["services"]["smg"]
    assert smg["command"][:2] == ["smg", "launch"]
    args = parse_router_args(smg["command"][2:])
    assert args.policy == "cache_aware"
    replicas = sorted(n for n in compose["services"] if n.startswith("minisgl-"))
    assert len(replicas) == 2
    assert sorted(args.worker_urls) == [f"grpc://{n}:{grpc_port}" for n in replicas]
    assert f"{args.port}:{args.port}" in smg["ports"]
    assert f":{args.port}/readiness" in " ".join(smg["healthcheck"]["test"])
    assert all(smg["depends_on"][n]["condition"] == "service_healthy" for n in replicas)

    docs = {d["kind"]: d for d in yaml.safe_load_all((docker / "k8s" / "smg.yaml").read_text())}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    words = shlex.split(container["args"][0])
    argv = words[words.index("launch") + 1 :]
    args = parse_router_args(argv)
    assert args.service_discovery and args.policy == "cache_aware"
    minisgl = next(
        d
        for d in yaml.safe_load_all((docker / "k8s" / "minisgl.yaml").read_text())
        if d["kind"] == "Deployment"
    )
    assert args.selector == minisgl["spec"]["template"]["metadata"]["labels"]
    assert args.service_discovery_port == grpc_port
    assert {p["containerPort"] for p in container["ports"]} >= {args.port}
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == args.port
    [rule] = docs["Role"]["rules"]
    assert rule["resources"] == ["pods"] and {"list", "watch"} <= set(rule["verbs"])
    assert docs["RoleBinding"]["subjects"][0]["name"] == pod["serviceAccountName"]
    assert docs["RoleBinding"]["roleRef"]["name"] == docs["Role"]["metadata"]["name"]


def test_real_model_chat_through_smg(workdir: Path, real: Server) -> None:
    """The real model behind smg: smg renders the model's own chat template (from the
    tokenizer files GetTokenizer rebuilt out of the .gguf) and gets minisgl's greedy answers,
    token for token, with the same prompt token counts."""
    real.wait_serving()
    with (
        run_smg(workdir, [real], "--policy", "cache_aware") as gw,
        Client(real.target, timeout=CALL_S) as mine,
    ):
        oai = openai.OpenAI(base_url=gw.base_url + "/v1", api_key="unused", max_retries=0)
        model = mine.model_info().model

        def first_answer() -> bool:  # smg registers the tokenizer in the background
            try:
                oai.completions.create(model=model, prompt="Hi", max_tokens=1, **GREEDY)
            except openai.APIStatusError as e:
                assert "tokenizer" in e.message.lower(), e.message
                return False
            return True

        wait_until(first_answer, 120, "smg to load the tokenizer from GetTokenizer", 0.5)
        for chat in CHAT:
            want = mine.generate(chat, max_new_tokens=24, **GREEDY)
            got = oai.chat.completions.create(
                model=model,
                messages=chat,  # type: ignore[arg-type]
                max_tokens=24,
                **GREEDY,
            )
            assert got.usage is not None and got.usage.prompt_tokens == want.prompt_tokens
            assert got.choices[0].message.content == want.text.strip(), chat
            assert got.usage.completion_tokens == want.completion_tokens
        for text in PLAIN[:2]:
            want = mine.generate(text, max_new_tokens=16, **GREEDY)
            done = oai.completions.create(model=model, prompt=text, max_tokens=16, **GREEDY)
            assert done.choices[0].text == want.text
