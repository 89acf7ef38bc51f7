"""Prometheus metrics (--metrics-port), request and throughput log lines (--log-format json),
against one real server with the demo model; and the Docker scrape configuration."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from openai import OpenAI
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from minisgl.gateway.metrics import GatewayMetrics
from tests.helpers.server_util import REPO, Server, Streamer, free_port, run_server, wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
PROMPT_SECRET = "zebra quokka marmalade"  # must never reach the log at info level
GENERATE = "/minisgl.v1.GenerationService/Generate"
README = (REPO / "README.md").read_text()


def scrape(port: int) -> Samples:
    """Every sample of http://127.0.0.1:port/metrics, by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "pid"))
            out[(s.name, labels)] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, int]]:
    metrics_port = free_port()
    flags = ("--metrics-port", str(metrics_port), "--log-format", "json")
    with run_server(
        tmp_path_factory.mktemp("metrics"), *flags, "--log-stats-interval", "0.2"
    ) as server:
        yield server, metrics_port


def settled(port: int, before: Samples, name: str, expected: float) -> Samples:
    """Scrape until `name` grew by `expected` (the scheduler refreshes its counters every
    20 ms): the scrape that shows it."""
    seen: list[Samples] = []

    def done() -> bool:
        seen.append(scrape(port))
        return delta(seen[-1], before, name) >= expected

    wait_until(done, 10.0, f"{name} to grow by {expected}")
    return seen[-1]


def test_counters_and_histograms_match_the_requests(served: tuple[Server, int]) -> None:
    server, port = served
    n, new_tokens = 4, 6
    prompt = list(range(3, 3 + 40))  # the same 40 ids every time: the repeats hit the cache
    before = scrape(port)
    with server.client() as client:
        results = [
            client.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True) for _ in range(n)
        ]
        with pytest.raises(grpc.RpcError) as bad:
            client.generate(prompt, temperature=-1.0)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert all(len(r.token_ids) == new_tokens for r in results)
    cached = sum(r.cached_tokens for r in results)
    assert cached > 0  # the later ones reused the first one's pages
    after = settled(port, before, "minisgl:cached_tokens_total", cached)

    def idle() -> Samples | None:  # the gauges are refreshed every 20 ms, like the counters
        now = scrape(port)
        running = value(now, "minisgl:num_requests_running")
        return now if running == 0 and value(now, "minisgl:num_requests_waiting") == 0 else None

    after = wait_until(idle, 10.0, "the running and waiting gauges to drop to 0")

    # Engine counters (the scheduler's), exactly what the requests predict.
    assert delta(after, before, "minisgl:prompt_tokens_total") == n * len(prompt)
    assert delta(after, before, "minisgl:cached_tokens_total") == cached
    assert delta(after, before, "minisgl:generation_tokens_total") == n * new_tokens
    assert delta(after, before, "minisgl:request_queue_time_seconds_count") == n
    assert delta(after, before, "minisgl:batch_size_sum") == n * new_tokens  # one-by-one calls
    steps = delta(after, before, "minisgl:prefill_step_time_seconds_count") + delta(
        after, before, "minisgl:decode_step_time_seconds_count"
    )
    assert steps == n * new_tokens  # each call: one prefill step, then one step per token
    assert delta(after, before, "minisgl:prefill_step_time_seconds_count") == n
    # The hit rate is the counters' (both count from the end of the warm-up).
    hits = value(after, "minisgl:cached_tokens_total") / value(after, "minisgl:prompt_tokens_total")
    assert 0 < value(after, "minisgl:cache_hit_rate") == pytest.approx(hits)
    with server.client() as client:  # GetLoad's rate too (its Load is refreshed every 20 ms)
        wait_until(
            lambda: client.load().cache_hit_rate == pytest.approx(hits), 5, "GetLoad's hit rate"
        )
    assert value(after, "minisgl:num_requests_running") == 0
    assert value(after, "minisgl:num_requests_waiting") == 0
    # The frontend's: calls by status, requests by finish reason, client-side latencies.
    assert delta(after, before, "minisgl:grpc_requests_total", method=GENERATE, code="OK") == n
    invalid = delta(
        after, before, "minisgl:grpc_requests_total", method=GENERATE, code="INVALID_ARGUMENT"
    )
    assert invalid == 1
    assert delta(after, before, "minisgl:request_success_total", finished_reason="length") == n
    assert delta(after, before, "minisgl:time_to_first_token_seconds_count") == n
    assert delta(after, before, "minisgl:e2e_request_latency_seconds_count") == n
    assert delta(after, before, "minisgl:inter_token_latency_seconds_count") == n * (new_tokens - 1)


def test_requests_done_in_their_first_step_count_their_queue_time(
    served: tuple[Server, int],
) -> None:
    """A request admitted and finished in one step (one token) leaves the running batch
    before the step returns: it is counted from the step's outputs."""
    server, port = served
    n = 3
    before = scrape(port)
    with server.client() as client:
        for i in range(n):  # the scheduler records a step before it sends the step's tokens
            assert len(client.generate([7 + i, 8, 9], max_new_tokens=1).token_ids) == 1
    after = scrape(port)
    assert delta(after, before, "minisgl:generation_tokens_total") == n
    assert delta(after, before, "minisgl:request_queue_time_seconds_count") == n
    assert delta(after, before, "minisgl:prefill_step_time_seconds_count") == n


def test_a_failed_request_has_its_duration_as_e2e_latency(served: tuple[Server, int]) -> None:
    """A call that ends without a token (here: a token id outside the vocabulary, refused by
    the tokenizer worker) observes the time it took, not 0."""
    server, port = served
    before = scrape(port)
    with server.client() as client:
        vocab = client.model_info().vocab_size
        with pytest.raises(grpc.RpcError) as bad:
            client.generate([1, vocab + 5], max_new_tokens=2)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = scrape(port)
    e2e = "minisgl:e2e_request_latency_seconds"
    assert delta(after, before, e2e + "_count") == 1
    assert 0 < delta(after, before, e2e + "_sum") < 30
    assert delta(after, before, "minisgl:time_to_first_token_seconds_count") == 0
    assert delta(after, before, "minisgl:request_success_total", finished_reason="abort") == 1


def readme_metrics() -> dict[str, str]:
    """The README's metrics table: each metric's name (as scraped, without labels) -> type."""
    rows = re.findall(r"^\| `(minisgl:[\w:]+)(?:\{[\w,]*\})?` \| (\w+) \|", README, re.M)
    assert rows, "no metrics table in README.md"
    return dict(rows)


def families(text: str) -> dict[str, str]:
    """The minisgl: metric families of a /metrics text -> type, named as the README names
    them (a counter with its _total; not the _created timestamps of the frontend's)."""
    found = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("minisgl:") and not family.name.endswith("_created"):
            found[family.name + ("_total" if family.type == "counter" else "")] = family.type
    return found


def test_every_metric_is_in_the_readme(served: tuple[Server, int]) -> None:
    server, port = served
    with server.client() as client:  # labelled metrics appear once they have a value
        client.generate("hi", max_new_tokens=2)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        scraped = families(resp.read().decode())
    gateway = GatewayMetrics()
    gateway.requests.labels("/health", "GET", "200").inc()
    gateway.latency.labels("/health").observe(0.1)
    scraped |= families(generate_latest(gateway.registry).decode())
    assert scraped == readme_metrics()


def test_gauges_during_a_stream(served: tuple[Server, int]) -> None:
    server, port = served
    streamer = Streamer(server, "a long one", max_new_tokens=200, ignore_eos=True)
    streamer.start()
    try:
        running: list[float] = []

        def seen_running() -> bool:
            s = scrape(port)
            running.append(value(s, "minisgl:num_requests_running"))
            return running[-1] == 1 and value(s, "minisgl:kv_cache_usage_perc") > 0

        wait_until(seen_running, 30.0, f"one running request (saw {running[-5:]})")
    finally:
        streamer.join(120)
    assert not streamer.is_alive() and streamer.error is None
    wait_until(
        lambda: value(scrape(port), "minisgl:num_requests_running") == 0, 10.0, "none running"
    )


def test_online_benchmark_agrees_with_the_metrics(
    served: tuple[Server, int], tmp_path: Path
) -> None:
    server, port = served
    before = scrape(port)
    out = tmp_path / "online.json"
    cmd = [
        sys.executable, "-m", "minisgl.bench.online", "--target", server.target,
        "--num-prompts", "6", "--rate", "inf", "--input-len", "5,30", "--output-len", "3,9",
        "--json", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["completed"] == 6
    after = settled(port, before, "minisgl:generation_tokens_total", r["output_tokens"])
    assert delta(after, before, "minisgl:generation_tokens_total") == r["output_tokens"]
    assert delta(after, before, "minisgl:request_success_total", finished_reason="length") == 6
    assert delta(after, before, "minisgl:time_to_first_token_seconds_count") == 6
    assert delta(after, before, "minisgl:inter_token_latency_seconds_count") == r["itl_samples"]
    method = "/minisgl.v1.GenerationService/StreamGenerate"
    assert delta(after, before, "minisgl:grpc_requests_total", method=method, code="OK") == 6


def test_json_log_lines_parse_and_hold_no_prompt_text(served: tuple[Server, int]) -> None:
    server, _ = served
    with server.client() as client:
        result = client.generate(
            f"Tell me about the {PROMPT_SECRET}.",
            request_id="log-me",
            max_new_tokens=5,
            ignore_eos=True,
        )

    def logged() -> list[dict[str, object]]:
        lines = [line for line in server.log().splitlines() if line.strip()]
        return [json.loads(line) for line in lines]  # every line is one JSON object

    wait_until(lambda: any(e.get("request_id") == "log-me" for e in logged()), 10.0, "its log line")
    records = logged()
    mine = [e for e in records if e.get("request_id") == "log-me"]
    assert len(mine) == 1
    line = mine[0]
    assert line["level"] == "INFO" and line["process"] == "MainProcess"
    assert line["prompt_tokens"] == result.prompt_tokens
    assert line["cached_tokens"] == result.cached_tokens
    assert line["generated_tokens"] == 5
    assert line["finish_reason"] == "length" and line["status"] == "OK"
    ttft, duration = line["ttft_s"], line["duration_s"]
    assert isinstance(ttft, float) and isinstance(duration, float) and 0 < ttft <= duration
    throughput = [e for e in records if str(e["message"]).startswith("throughput:")]
    assert throughput and throughput[-1]["process"] == "scheduler"
    assert all(isinstance(e["generation_tokens_per_s"], float) for e in throughput)
    assert any("KV cache:" in str(e["message"]) for e in records)  # what start-up sized
    assert PROMPT_SECRET not in server.log()
    assert result.text and result.text not in server.log()


def http_status(url: str, data: bytes | None = None) -> int | None:
    """The HTTP status of a GET (or, with `data`, a POST) of `url`; None if nothing answers."""
    try:
        with urllib.request.urlopen(url, data=data, timeout=30) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return None


def test_gateway_metrics(served: tuple[Server, int], tmp_path: Path) -> None:
    server, _ = served
    port, metrics_port = free_port(), free_port()
    cmd = [
        sys.executable, "-m", "minisgl.cli", "gateway", "--target", server.target,
        "--port", str(port), "--metrics-port", str(metrics_port),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with (tmp_path / "gateway.log").open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_status(url + "/health") == 200, 60, "the gateway")
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        for _ in range(2):
            client.completions.create(model="minisgl-demo", prompt="hi", max_tokens=3)
        assert http_status(url + "/v1/nothing-here") == 404
        assert http_status(url + "/v1/completions", data=b"{not json") == 400
        disconnect_mid_stream(port)
        requests = "minisgl:gateway_http_requests_total"
        route = "/v1/completions"
        gone = {"route": route, "method": "POST", "status": "499"}

        def counted() -> Samples | None:
            now = scrape(metrics_port)
            return now if value(now, requests, **gone) else None

        s = wait_until(counted, 30, "the disconnected stream to be counted")
    finally:
        proc.terminate()
        proc.wait(20)
    assert value(s, requests, route=route, method="POST", status="200") == 2
    assert value(s, requests, route=route, method="POST", status="400") == 1
    assert value(s, requests, **gone) == 1  # the client went away: not a server error (500)
    assert value(s, requests, route=route, method="POST", status="500") == 0
    assert value(s, requests, route="unmatched", method="GET", status="404") == 1
    assert value(s, requests, route="/health", method="GET", status="200") >= 1
    latency = "minisgl:gateway_http_request_duration_seconds_count"
    assert value(s, latency, route=route) == 4


def disconnect_mid_stream(port: int) -> None:
    """Start a long streamed completion on the gateway, read its first event, hang up."""
    body = json.dumps(
        {"prompt": "hi", "max_tokens": 400, "stream": True, "ignore_eos": True}
    ).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.readline().startswith(b"data: ")
    finally:
        conn.close()


def test_prometheus_scrapes_both_replicas_metrics_ports() -> None:
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    scrape_cfg = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
    targets = {
        t
        for job in scrape_cfg["scrape_configs"]
        for sc in job["static_configs"]
        for t in sc["targets"]
    }
    replicas = [name for name in compose["services"] if name.startswith("minisgl-")]
    assert len(replicas) == 2
    for name in replicas:
        command = compose["services"][name]["command"]
        port = command[command.index("--metrics-port") + 1]
        assert f"{name}:{port}" in targets
    assert "9400" in (REPO / "docker" / "Dockerfile").read_text().split("EXPOSE", 1)[1].split()[:3]
    prom = compose["services"]["prometheus"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
