"""The batch builder (`scheduler/batch.py`) on real requests: the flat token, position and slot
lists of a step, and the per-row sampling options, with no engine behind it."""

from __future__ import annotations

from minisgl.sampling_params import SamplingParams
from minisgl.scheduler.batch import build_sampling_plan, build_step_plan
from minisgl.scheduler.request import Req

PAGE = 4
VOCAB = 100


def _req(
    rid: str,
    prompt: list[int],
    *,
    output: list[int] | None = None,
    pages: list[int] | None = None,
    row: int = 0,
    computed: int = 0,
    seed: int = 0,
    stop_ids: frozenset[int] = frozenset(),
    **params: object,
) -> Req:
    sp = SamplingParams(**params)  # type: ignore[arg-type]
    req = Req(
        rid=rid,
        prompt_ids=prompt,
        params=sp,
        seed=seed,
        stop_ids=stop_ids,
        max_new_tokens=sp.max_new_tokens,
    )
    req.output_ids = list(output or [])
    req.pages = list(pages or [])
    req.row = row
    req.num_computed = computed
    return req


def test_a_prefill_chunk_and_a_decode_are_flattened_row_after_row() -> None:
    # a: the first 3 of its 5 prompt tokens; b: 6 prompt tokens computed, its one output is new.
    a = _req("a", [10, 11, 12, 13, 14], pages=[3, 7], row=2)
    b = _req("b", [20, 21, 22, 23, 24, 25], output=[50], pages=[5, 1], row=0, computed=6)
    writes = {(2, 0): 3, (2, 1): 7}
    plan = build_step_plan([(a, 3), (b, 1)], PAGE, VOCAB, writes)
    assert plan.table_writes == writes
    assert plan.input_ids == [10, 11, 12, 50]
    assert plan.positions == [0, 1, 2, 6]
    assert plan.out_slots == [3 * PAGE + 0, 3 * PAGE + 1, 3 * PAGE + 2, 1 * PAGE + 2]
    assert plan.req_rows == [2, 0]
    assert plan.seq_lens == [3, 7]
    assert plan.extend_lens == [3, 1]
    assert plan.sampling.steps == [0, 1]


def test_a_chunk_that_starts_mid_page_crosses_into_the_next_page() -> None:
    a = _req("a", list(range(30, 39)), pages=[9, 2, 6], row=1, computed=3)
    plan = build_step_plan([(a, 4)], PAGE, VOCAB, {})
    assert plan.input_ids == [33, 34, 35, 36]
    assert plan.positions == [3, 4, 5, 6]
    assert plan.out_slots == [9 * PAGE + 3, 2 * PAGE + 0, 2 * PAGE + 1, 2 * PAGE + 2]
    assert plan.seq_lens == [7]


def test_output_ids_not_read_back_yet_go_to_the_engine_as_placeholders() -> None:
    # Overlap scheduling: the newest output is still on the device, at future slot 4.
    a = _req("a", [1, 2, 3], output=[40, -1 - 4], pages=[0, 8], computed=4)
    plan = build_step_plan([(a, 1)], PAGE, VOCAB, {})
    assert plan.input_ids == [-5]
    assert plan.positions == [4]
    assert plan.out_slots == [8 * PAGE + 0]


def test_sampling_options_per_row_and_the_flags_that_skip_work() -> None:
    greedy = _req("g", [1], temperature=0.0, top_k=5, top_p=0.5, min_p=0.2, seed=7)
    sampled = _req("s", [2], temperature=0.8, top_k=0, top_p=0.9, seed=9, logprobs=True)
    capped = _req("c", [3], output=[4, 5], top_k=20, top_logprobs=3)
    plan = build_sampling_plan([greedy, sampled, capped], VOCAB)
    assert plan.temperature == [0.0, 0.8, 1.0]
    assert plan.top_k == [5, VOCAB, 20]  # top_k <= 0 (off) becomes the vocabulary size
    assert plan.top_p == [0.5, 0.9, 1.0]
    assert plan.min_p == [0.2, 0.0, 0.0]
    assert plan.seeds == [7, 9, 0]
    assert plan.steps == [0, 0, 2]
    assert not plan.all_greedy
    # The greedy row's filters do not count: it takes the argmax whatever they are.
    assert plan.use_top_k and plan.use_top_p and not plan.use_min_p
    assert plan.want_logprobs and plan.top_logprobs == 3
    assert plan.penalties is None and plan.banned_ids is None
    assert plan.max_top_k == VOCAB  # a top-p row without top-k may cut anywhere


def test_the_gpu_sampler_takes_as_many_candidates_as_the_largest_top_k() -> None:
    rows = [
        _req("g", [1], temperature=0.0, top_k=500),  # greedy: takes the argmax, needs none
        _req("a", [2], temperature=0.7, top_k=20),
        _req("b", [3], temperature=0.7, top_k=50, top_p=0.9),
        _req("c", [4], temperature=0.7),  # no cut
    ]
    assert build_sampling_plan(rows, VOCAB).max_top_k == 50


def test_an_all_greedy_batch_needs_no_filter() -> None:
    plan = build_sampling_plan([_req("a", [1], temperature=0.0, top_k=3, top_p=0.5)], VOCAB)
    assert plan.all_greedy
    assert not (plan.use_top_k or plan.use_top_p or plan.use_min_p or plan.want_logprobs)
    assert plan.max_top_k == 0


def test_penalty_lists_cover_every_row_once_one_row_has_a_penalty() -> None:
    plain = _req("p", [1, 2], output=[3])
    penalised = _req("q", [4], output=[5, 5], repetition_penalty=1.3, frequency_penalty=0.5)
    plan = build_sampling_plan([plain, penalised], VOCAB)
    assert plan.penalties is not None
    assert plan.penalties.repetition == [1.0, 1.3]
    assert plan.penalties.presence == [0.0, 0.0]
    assert plan.penalties.frequency == [0.0, 0.5]
    assert plan.penalties.seen_ids == [[1, 2, 3], [4, 5, 5]]
    assert plan.penalties.output_ids == [[3], [5, 5]]


def test_stop_ids_are_banned_only_for_rows_short_of_min_new_tokens() -> None:
    early = _req("e", [1], output=[7], stop_ids=frozenset({9, 2}), min_new_tokens=2)
    done = _req("d", [1], output=[7, 8], stop_ids=frozenset({9}), min_new_tokens=2)
    free = _req("f", [1], stop_ids=frozenset({3}))
    plan = build_sampling_plan([early, done, free], VOCAB)
    assert plan.banned_ids == [[2, 9], [], []]
    assert build_sampling_plan([done, free], VOCAB).banned_ids is None
