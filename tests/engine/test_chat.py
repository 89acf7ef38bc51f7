"""`LLM.stream` and the `minisgl chat` shell (a real subprocess on the demo model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from minisgl import LLM, SamplingParams
from tests.helpers.engine_util import assert_idle

ROOT = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)
# The demo model's greedy replies are mostly newlines; seeded sampling tells turns apart.
SEEDED = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=12, seed=7)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(None, progress=False)


def test_stream_pieces_join_to_the_generated_text(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)
    want = llm.generate("Once upon a time", params)[0].text
    pieces = list(llm.stream("Once upon a time", params))
    assert len(pieces) > 1 and "".join(pieces) == want
    assert_idle(llm)


def test_closing_a_stream_early_aborts_its_request(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_new_tokens=200, ignore_eos=True)
    it = llm.stream("Tell me everything", params)
    next(it)
    it.close()
    assert not llm.has_unfinished()
    assert_idle(llm)


def test_stream_needs_an_otherwise_idle_engine(llm: LLM) -> None:
    rid = llm.submit("busy", GREEDY)
    with pytest.raises(RuntimeError, match="unfinished"):
        next(llm.stream("hello", GREEDY))
    llm.abort(rid)
    assert_idle(llm)


def _chat(stdin: str, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-m", "minisgl.cli", "chat", "--no-progress", "--log-level", "WARNING",
         "--temperature", "1", "--sampling-seed", "7", "--max-new-tokens", "12", *flags],
        input=stdin, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )  # fmt: skip


def test_chat_keeps_the_conversation_and_resets_it(llm: LLM) -> None:
    proc = _chat("hello there\nand then?\n/reset\nand then?\n/exit\n", "--system", "Be brief.")
    assert proc.returncode == 0, proc.stderr
    banner, *turns = proc.stdout.split(">>> ")
    assert "Chatting with minisgl-demo" in banner
    replies = [t.removesuffix("\n") for t in turns[:2] + turns[3:4]]
    assert turns[2] == "(conversation cleared)\n"

    def reply(*messages: dict[str, Any]) -> str:
        text = llm.generate([list(messages)], SEEDED)[0].text
        assert text is not None
        return text

    system = {"role": "system", "content": "Be brief."}
    first = reply(system, {"role": "user", "content": "hello there"})
    second = reply(
        system,
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "and then?"},
    )
    fresh = reply(system, {"role": "user", "content": "and then?"})
    assert replies == [first, second, fresh]
    assert second != fresh, "pick prompts whose replies differ with and without history"


def test_chat_ends_at_end_of_input() -> None:
    proc = _chat("hi\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(">>> ") == 2


def test_ctrl_c_at_the_prompt_quits_cleanly() -> None:
    import signal

    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "minisgl.cli", "chat", "--no-progress", "--log-level", "WARNING"]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        cwd=ROOT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    banner = proc.stdout.readline()  # the engine is up once the banner is out
    assert "Chatting with" in banner
    time.sleep(0.5)  # let it reach input()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_chat_json_mode_constrains_replies_and_reports_bad_schema_files(
    llm: LLM, tmp_path: Path
) -> None:
    """--json starts with JSON-object replies; /json FILE takes a schema (a missing file, bad
    JSON or a schema that does not compile is one error line, the mode unchanged); a reply the
    token limit cut is marked; /json off is free text again."""
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 10},
            "n": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["city", "n"],
    }
    files = {
        "schema.json": json.dumps(schema),
        "long.json": json.dumps(
            {
                "type": "object",
                "properties": {"s": {"type": "string", "minLength": 200}},
                "required": ["s"],
            }
        ),
        "bad.json": "{not json",
        "badschema.json": '{"type": "nope"}',
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    p = {name: str(tmp_path / name) for name in files}
    missing = str(tmp_path / "missing.json")
    script = [
        "hi",
        f"/json {missing}",
        f"/json {p['bad.json']}",
        f"/json {p['badschema.json']}",
        "/reset",
        f"/json {p['schema.json']}",
        "hi",
        f"/json {p['long.json']}",
        "/reset",
        "hi",
        "/json off",
        "/reset",
        "hi",
        "/help",
        "/exit",
    ]
    proc = _chat(
        "\n".join(script) + "\n", "--json", "--sampling-seed", "3", "--max-new-tokens", "32"
    )
    assert proc.returncode == 0, proc.stderr
    banner, *turns = proc.stdout.split(">>> ")
    assert "/json" in banner and banner.endswith("(replies are JSON objects)\n")
    assert turns[1:4] == ["", "", ""]  # the errors go to stderr, one line each
    errors = proc.stderr.splitlines()
    assert errors[0] == f"error: /json: cannot read {missing}: No such file or directory"
    assert errors[1].startswith(f"error: /json: {p['bad.json']} is not valid JSON: ")
    assert errors[2].startswith(
        f"error: /json: {p['badschema.json']}: json_schema: does not compile"
    )
    assert len(errors) == 3, proc.stderr
    assert turns[5] == f"(replies follow the JSON schema in {p['schema.json']})\n"
    assert turns[7] == f"(replies follow the JSON schema in {p['long.json']})\n"
    assert turns[10] == "(free text)\n" and "/json" in turns[13]

    def reply(**constraint: Any) -> tuple[str, str]:
        params = SamplingParams(
            temperature=1.0, top_p=0.95, max_new_tokens=32, seed=3, **constraint
        )
        out = llm.generate([[{"role": "user", "content": "hi"}]], params)[0]
        assert out.text is not None
        return out.text, out.finish_reason

    # Each reply is what the engine gives the same conversation under the same constraint.
    as_object, reason = reply(json_object=True)
    assert reason == "stop" and turns[0] == as_object + "\n"
    assert isinstance(json.loads(turns[0]), dict)
    as_schema, reason = reply(json_schema=files["schema.json"])
    assert reason == "stop" and turns[6] == as_schema + "\n"
    jsonschema.validate(json.loads(turns[6]), schema)
    cut, reason = reply(json_schema=files["long.json"])
    assert reason == "length" and turns[9] == cut + "\n(cut at --max-new-tokens 32: incomplete)\n"
    free, _ = reply()
    assert turns[12] == free + "\n"
