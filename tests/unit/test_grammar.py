"""minisgl.grammar: compiling constraints with xgrammar for the demo tokenizer, the bitmask,
the sampler applying it, and overlap scheduling planning a constrained request on every step
while its newest token is in flight (tests/engine/test_structured_overlap.py has the rest)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch

from minisgl import LLM, SamplingParams
from minisgl.engine.sampler import SampleOutput, SamplingBatch, sample
from minisgl.engine.step import LaunchedStep
from minisgl.grammar import (
    GrammarCompiler,
    GrammarSource,
    bitmask_words,
    choice_grammar,
    fill_bitmask,
)
from minisgl.models.source import resolve_model
from minisgl.scheduler.postprocess import Launched, complete
from minisgl.scheduler.request import Req
from minisgl.tokenizer.tokenizer import tokenizer_for

VOCAB = 2048


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    tok = tokenizer_for(resolve_model(None, False))
    return GrammarCompiler(tok, VOCAB, [2])


def _allowed(bitmask: torch.Tensor, row: int) -> set[int]:
    bits = ((bitmask[row, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()
    return {i for i in range(VOCAB) if bits[i]}


def test_cache_key_is_the_constraint(compiler: GrammarCompiler) -> None:
    a = compiler.compile(SamplingParams(regex="[0-9]+"))
    n = compiler.compiles
    assert compiler.compile(SamplingParams(regex="[0-9]+", temperature=0.3)) is a
    assert compiler.compiles == n
    assert compiler.compile(SamplingParams(choice=["[0-9]+"])) is not a  # same text, other field
    assert compiler.compile(SamplingParams()) is None


def test_errors_name_the_field_without_the_cpp_location(compiler: GrammarCompiler) -> None:
    with pytest.raises(ValueError) as e:
        compiler.compile(SamplingParams(regex="a)("))
    assert str(e.value).startswith("regex: does not compile: ")
    assert ".cc:" not in str(e.value) and "[" not in str(e.value).split(":", 2)[2][:3]
    with pytest.raises(ValueError, match=r"^json_schema: does not compile: .*Unsupported type"):
        compiler.compile(SamplingParams(json_schema='{"type": "tuple"}'))
    no_tokenizer = GrammarCompiler(None, VOCAB, [2])
    with pytest.raises(ValueError, match=r"^choice: constraints need the model's tokenizer"):
        no_tokenizer.compile(SamplingParams(choice=["a"]))


def test_choice_grammar_escapes_quotes_and_unicode(compiler: GrammarCompiler) -> None:
    choice = ['say "hi"', "back\\slash", "café", "new\nline"]
    assert choice_grammar(choice).startswith("root ::= ")
    matcher = compiler.matcher(SamplingParams(choice=choice))
    assert matcher is not None
    for text in choice:
        m = compiler.matcher(SamplingParams(choice=choice))
        assert m is not None and m.accept_string(text) and m.is_completed()


def test_length_bounded_json_strings_refuse_control_characters(compiler: GrammarCompiler) -> None:
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 5}}}
    params = SamplingParams(json_schema=json.dumps(schema))
    m = compiler.matcher(params)
    assert m is not None and m.accept_string('{"s": "ab')
    assert not m.accept_string("\x10")
    assert m.accept_string('c"}') and m.is_completed()


def test_bitmask_rows_and_sampler(compiler: GrammarCompiler) -> None:
    matcher = compiler.matcher(SamplingParams(choice=["yes", "no"]))
    assert fill_bitmask([None, None], VOCAB) is None
    bitmask = fill_bitmask([None, matcher], VOCAB)
    assert bitmask is not None and bitmask.shape == (2, bitmask_words(VOCAB))
    assert _allowed(bitmask, 0) == set(range(VOCAB))
    allowed = _allowed(bitmask, 1)
    assert 0 < len(allowed) < 50
    other = compiler.matcher(SamplingParams(regex="[0-9]+x"))
    rows = [matcher, None, other, matcher]
    threaded = fill_bitmask(rows, VOCAB, compiler.batch)
    assert threaded is not None and torch.equal(threaded, fill_bitmask(rows, VOCAB))
    # The sampler takes only allowed tokens, greedy and sampled, however the logits lean.
    logits = torch.randn(2, VOCAB)
    logits[1, sorted(set(range(VOCAB)) - allowed)] += 100.0
    for temperature in (0.0, 1.0):
        sb = SamplingBatch(
            temperature=torch.full((2,), temperature),
            top_k=torch.full((2,), VOCAB),
            top_p=torch.ones(2),
            min_p=torch.zeros(2),
            seeds=torch.tensor([1, 2]),
            steps=torch.zeros(2, dtype=torch.int64),
            all_greedy=temperature == 0.0,
            use_top_k=False,
            use_top_p=False,
            use_min_p=False,
            penalties=None,
            banned_ids=None,
            want_logprobs=False,
            top_logprobs=0,
            grammar_bitmask=bitmask,
        )
        ids = sample(logits, sb).token_ids.tolist()
        assert ids[0] == int(logits[0].argmax()) or temperature > 0
        assert ids[1] in allowed


@pytest.mark.parametrize("threaded", [False, True], ids=["one-by-one", "batched"])
def test_read_back_tokens_advance_the_matchers(compiler: GrammarCompiler, threaded: bool) -> None:
    """postprocess.complete feeds each constrained row's token to its matcher (on xgrammar's
    threads when batched): a token it allows moves it on, one it forbids aborts the request."""
    params = SamplingParams(choice=["yes", "no"], max_new_tokens=8)
    reqs = [Req(rid, [5, 6], params, 0, frozenset(), 8) for rid in ("a", "b", "c")]
    for r in reqs:
        r.matcher = compiler.matcher(params)
        r.output_ids = [-1]  # the placeholder of the token read back below
        r.num_computed = 2
    bitmask = fill_bitmask([reqs[0].matcher], VOCAB)
    assert bitmask is not None
    allowed = _allowed(bitmask, 0)
    good, bad = min(allowed), min(set(range(VOCAB)) - allowed)
    ids = torch.tensor([good, bad, good])
    step = LaunchedStep(0, SampleOutput(ids, None, None, None), None)
    launched = Launched([(r, 1) for r in reqs], [0, 0, 0], step, constrained=True)
    done = complete(launched, 64, compiler.batch if threaded else None)
    assert done.token_ids == ids.tolist() and [o.rid for o in done.outputs] == ["a", "b", "c"]
    assert reqs[1].finish_reason == "abort" and reqs[1] in done.finished
    for r in (reqs[0], reqs[2]):  # accepted; a choice ends only at the stop token after it
        assert r.finish_reason is None and r.output_ids == [good]
        assert r.matcher is not None and not r.matcher.is_terminated()
        after = fill_bitmask([r.matcher], VOCAB)
        assert after is not None and _allowed(after, 0) != allowed  # it moved on


@pytest.fixture(scope="module")
def overlapped() -> Iterator[LLM]:
    llm = LLM(progress=False, num_pages=256, overlap_schedule="on")
    yield llm
    llm.close()


def test_overlap_plans_a_constrained_request_on_every_step(overlapped: LLM) -> None:
    plain = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    constrained = SamplingParams(temperature=0.0, max_new_tokens=8, regex="a{8}")
    rid_plain = overlapped.submit("hello", plain)
    rid_con = overlapped.submit("hello", constrained)
    sched = overlapped.scheduler
    planned: list[set[str]] = []
    while overlapped.has_unfinished():
        # What the next step plans, seen from the requests' state before it.
        before = {r.rid: r.num_computed for r in sched.running}
        overlapped.step()
        planned.append({r.rid for r in sched.running if r.num_computed != before.get(r.rid)})
    con_steps = [i for i, p in enumerate(planned) if rid_con in p]
    plain_steps = [i for i, p in enumerate(planned) if rid_plain in p]
    # Both decode on consecutive steps, the constrained one with its newest token in flight.
    assert plain_steps == list(range(plain_steps[0], plain_steps[0] + len(plain_steps)))
    assert len(con_steps) >= 3
    assert con_steps == list(range(con_steps[0], con_steps[0] + len(con_steps)))


def test_grammars_prepared_on_a_thread_serve_the_first_request(overlapped: LLM) -> None:
    sched = overlapped.scheduler
    # As in the server's scheduler process: no tokenizer given, loaded on a thread.
    sched.grammar_source = GrammarSource(
        sched._load_tokenizer, sched.vocab_size, sorted(sched.eos_ids)
    )
    sched.grammar_source.prepare()
    assert sched.grammar_source.loading
    out = overlapped.generate("hi", SamplingParams(temperature=0.0, choice=["threaded"]))[0]
    assert out.text == "threaded" and not sched.grammar_source.loading
    assert sched.grammars.tokenizer is not None
