"""Structured output through the offline engine (the random-weight demo model): every output
that finished with reason "stop" matches its constraint, with and without overlap scheduling,
greedy and sampled, penalties included; unconstrained rows of a mixed batch are unchanged."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator

import jsonschema
import pytest

from minisgl import LLM, SamplingParams
from minisgl.llm import RequestOutput
from tests.helpers.engine_util import assert_idle
from tests.helpers.real_model import smollm2_gguf
from tests.helpers.schemas import random_object

PROMPTS = ["Give me JSON:", "hello", "The answer is", "x y z"]
NUM_SCHEMAS = 50


@pytest.fixture(scope="module", params=["off", "on"], ids=["sync", "overlap"])
def llm(request: pytest.FixtureRequest) -> Iterator[LLM]:
    engine = LLM(progress=False, num_pages=1024, overlap_schedule=request.param)
    yield engine
    engine.close()


def _stopped(outs: list[RequestOutput]) -> list[RequestOutput]:
    assert all(o.finish_reason in ("stop", "length") for o in outs), [o.finish_reason for o in outs]
    return [o for o in outs if o.finish_reason == "stop"]


def _sampling(i: int) -> dict[str, float | int]:
    """Greedy, plain sampling, top-k / top-p / min-p, and penalties, in turn."""
    return [
        {"temperature": 0.0},
        {"temperature": 1.0, "seed": i},
        {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "min_p": 0.05, "seed": i},
        {"temperature": 1.0, "repetition_penalty": 1.3, "frequency_penalty": 0.5, "seed": i},
    ][i % 4]


def test_random_json_schemas_give_valid_json(llm: LLM) -> None:
    rng = random.Random(7)
    schemas = [random_object(rng) for _ in range(NUM_SCHEMAS)]
    # Each schema twice: under two of the sampling modes (seeds differ).
    cases = [(s, i + k * NUM_SCHEMAS) for k in range(2) for i, s in enumerate(schemas)]
    params = [
        SamplingParams(max_new_tokens=160, json_schema=json.dumps(s), **_sampling(i + i // 4))  # type: ignore[arg-type]
        for s, i in cases
    ]
    outs = llm.generate([PROMPTS[i % 4] for _, i in cases], params)
    stopped = _stopped(outs)
    assert len(stopped) >= len(cases) * 0.8, [o.text for o in outs if o.finish_reason != "stop"]
    for out, (schema, _) in zip(outs, cases, strict=True):
        if out.finish_reason == "stop":
            assert out.text is not None
            jsonschema.validate(json.loads(out.text), schema)
    assert_idle(llm)


def test_json_object_regex_grammar_and_choice(llm: LLM) -> None:
    regexes = [r"[a-z]{2,6}@(foo|bar)\.(com|org)", r"\d{3}-\d{4}", r"(yes|no)( indeed)?"]
    grammar = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    choice = ["Paris", "Lyon", "Marseille"]
    cases: list[tuple[SamplingParams, Callable[[str], bool]]] = []
    for seed in range(4):
        samp = _sampling(seed)
        cases.append(
            (
                SamplingParams(max_new_tokens=120, json_object=True, **samp),  # type: ignore[arg-type]
                lambda t: isinstance(json.loads(t), dict),
            )
        )
        for rx in regexes:
            cases.append(
                (
                    SamplingParams(max_new_tokens=40, regex=rx, **samp),  # type: ignore[arg-type]
                    lambda t, rx=rx: re.fullmatch(rx, t) is not None,  # type: ignore[misc]
                )
            )
        cases.append(
            (
                SamplingParams(max_new_tokens=40, grammar=grammar, **samp),  # type: ignore[arg-type]
                lambda t: re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", t) is not None,
            )
        )
        cases.append(
            (
                SamplingParams(max_new_tokens=20, choice=choice, **samp),  # type: ignore[arg-type]
                lambda t: t in choice,
            )
        )
    outs = llm.generate([PROMPTS[i % 4] for i in range(len(cases))], [p for p, _ in cases])
    stopped = 0
    for out, (_, valid) in zip(outs, cases, strict=True):
        assert out.finish_reason in ("stop", "length")
        if out.finish_reason == "stop":
            stopped += 1
            assert out.text is not None and valid(out.text), out.text
    assert stopped >= len(cases) * 0.7
    # A choice always completes (the longest takes a few tokens).
    assert all(o.finish_reason == "stop" for o, (p, _) in zip(outs, cases, strict=True) if p.choice)
    assert_idle(llm)


def test_unconstrained_rows_of_a_mixed_batch_are_unchanged(llm: LLM) -> None:
    plain = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)
    alone = llm.generate(PROMPTS, plain)
    schema = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})
    mixed_params = [
        plain,
        SamplingParams(temperature=0.0, max_new_tokens=24, json_schema=schema),
        plain,
        SamplingParams(temperature=0.7, seed=3, max_new_tokens=24, regex="[ab]+c"),
        plain,
        SamplingParams(temperature=0.0, max_new_tokens=24, choice=["x", "yy"]),
        plain,
    ]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[2], PROMPTS[2], PROMPTS[3], PROMPTS[3]]
    mixed = llm.generate(prompts, mixed_params)
    assert [mixed[i].token_ids for i in (0, 2, 4, 6)] == [o.token_ids for o in alone]
    assert mixed[5].finish_reason == "stop" and mixed[5].text in ("x", "yy")
    assert_idle(llm)


def test_length_finish_keeps_the_prefix_valid(llm: LLM) -> None:
    """At max_new_tokens the output may be incomplete, but it is a prefix the regex allows."""
    out = llm.generate("hi", SamplingParams(temperature=0.0, max_new_tokens=3, regex="a{10}"))[0]
    assert out.finish_reason == "length" and out.text == "a" * len(out.text)


def test_bad_constraints_are_value_errors_naming_the_field(llm: LLM) -> None:
    bad = [
        (SamplingParams(regex="(ab"), "regex: does not compile: .*parenthesis"),
        (SamplingParams(json_schema='{"type": "nope"}'), "json_schema: does not compile"),
        (SamplingParams(json_schema="{"), "json_schema: not valid JSON"),
        (SamplingParams(json_schema="[1]"), "json_schema: must be a JSON object"),
        (SamplingParams(grammar="root ::= undefined_rule"), "grammar: does not compile"),
        (SamplingParams(choice=[]), "choice: must be a non-empty list"),
        (SamplingParams(regex="a", choice=["a"]), "choice: only one constraint"),
        (SamplingParams(regex="a", min_new_tokens=2), "min_new_tokens: must be 0"),
    ]
    for params, message in bad:
        with pytest.raises(ValueError, match=message):
            llm.generate("hi", params)
    assert_idle(llm)
    # The engine still serves constrained requests afterwards.
    out = llm.generate("hi", SamplingParams(temperature=0.0, choice=["ok"]))[0]
    assert out.text == "ok" and out.finish_reason == "stop"


def test_compiled_grammars_are_cached_by_constraint(llm: LLM) -> None:
    grammars = llm.scheduler.grammars
    params = SamplingParams(regex="[0-9]{4}-cached")
    before = grammars.compiles
    for _ in range(3):
        llm.generate("hi", params)
    assert grammars.compiles == before + 1


def test_real_model_answers_the_capital_of_france_as_valid_json() -> None:
    schema = {
        "type": "object",
        "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
        "required": ["country", "capital"],
    }
    prompt = [
        {
            "role": "user",
            "content": "Give me a JSON object with the capital of France, with the keys "
            '"country" and "capital".',
        }
    ]
    llm = LLM(str(smollm2_gguf()), dtype="float32", num_pages=128, progress=False)
    params = SamplingParams(temperature=0.0, max_new_tokens=64, json_schema=json.dumps(schema))
    out = llm.generate([prompt], params)[0]
    print("SmolLM2 under the schema:", out.text)
    assert out.finish_reason == "stop" and out.text is not None
    answer = json.loads(out.text)
    jsonschema.validate(answer, schema)
    assert "Paris" in answer["capital"]
