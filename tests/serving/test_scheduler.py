"""The continuous-batching engine (glmkit.serving.scheduler) driven directly from an event loop: staggered arrivals
get exactly the greedy tokens each request gets alone through core.generate, for every chat family (ChatGLM-6B's 2D
positions, ChatGLM2/3 and GLM-4's grouped KV heads, a P-tuning prefix); per-request settings (seeded sampling,
penalties) inside one batch; preemption and recompute give the same tokens; chunked prefill lets running rows decode
while a long prompt is prefilled; cancellation frees KV blocks."""

from __future__ import annotations

import asyncio
import copy
import time

import pytest
import torch

from glmkit.adapters.ptuning import attach_prefix
from glmkit.core import paged_cache
from glmkit.core.generate import generate
from glmkit.core.paged_cache import BlockPool, bytes_per_block
from glmkit.core.chat import stop_token_ids
from glmkit.serving.jobs import Job
from glmkit.serving.protocol import ChatFormat, SamplingParams
from glmkit.serving.scheduler import ContinuousEngine
from tests.helpers.chat_models import build_tiny_chat_model, build_tiny_glm4_model

QUERIES = ["hello", "the cat runs fast", "dog", "model answer question light", "你好 世界", "river stone"]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """family -> (model, tokenizer): tiny endless models (answers run to max_tokens) with a 64-token context."""
    from glmkit import load_model, load_tokenizer

    root = tmp_path_factory.mktemp("sched")
    out = {}
    for family in ("chatglm", "chatglm2", "chatglm3"):
        folder = build_tiny_chat_model(root / family, family, endless=True, max_seq_len=64)
        out[family] = (load_model(folder, dtype="float32").eval(), load_tokenizer(folder))
    folder = build_tiny_glm4_model(root / "glm4", max_seq_len=64)
    out["glm4"] = (load_model(folder, dtype="float32").eval(), load_tokenizer(folder))
    return out


def alone(model, tok, ids: list[int], params: SamplingParams) -> list[int]:
    """What core.generate gives this request on its own (the family's stop tokens end it, as in the engine). Run it
    before the engine starts: the engine's thread owns the model's cache."""
    eos = set(stop_token_ids(model, tok))
    out = generate(model, torch.tensor([ids]), max_new_tokens=params.max_new_tokens, do_sample=params.do_sample,
                   temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, seed=params.seed,
                   presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                   eos_token_id=sorted(eos))[0].tolist()
    tokens = []
    for t in out:
        if t in eos:
            break
        tokens.append(t)
    return tokens


def run(engine: ContinuousEngine, requests: list[tuple[list[int], SamplingParams]], delays: list[float | None]):
    """Starts the engine, submits request i after delays[i] seconds; returns [(tokens, finish, token production
    times, submission time)] and the jobs. Token times are taken in the engine's thread when it emits each token,
    so a busy event loop (a loaded machine) cannot bunch them up."""
    jobs: list[Job] = []
    times_of: dict[int, list[float]] = {}
    emit = engine._emit

    def timed_emit(job, kind, value):  # token production times, in the engine's thread
        if kind == "token":
            times_of.setdefault(id(job), []).append(time.monotonic())
        emit(job, kind, value)

    engine._emit = timed_emit
    if not engine.alive():
        engine.start()

    async def main():
        loop = asyncio.get_running_loop()
        first_token = asyncio.Event()  # a delay of None: submit once request 0 has its first token

        async def one(i):
            if delays[i] is None:
                await first_token.wait()
            else:
                await asyncio.sleep(delays[i])
            job = Job(requests[i][0], requests[i][1], loop)
            times = times_of.setdefault(id(job), [])
            jobs.append(job)
            sent = time.monotonic()
            engine.submit(job)
            tokens = []
            while True:
                kind, value = await asyncio.wait_for(job.events.get(), 60)
                if kind == "token":
                    tokens.append(value[0])
                    if i == 0:
                        first_token.set()
                elif kind == "error":
                    raise value
                else:
                    return tokens, value, times, sent

        return await asyncio.gather(*(one(i) for i in range(len(requests))))

    return asyncio.run(main()), jobs


@pytest.fixture()
def make_engine():
    made = []

    def make(model, tok, **kwargs):
        engine = ContinuousEngine(model, tok, **kwargs)  # started by run() (after the references are computed)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


def prompts(model, tok) -> list[list[int]]:
    fmt = ChatFormat(tok, model.config.max_seq_len)
    return [fmt.prompt_ids(q, [], None) for q in QUERIES]


@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "chatglm3", "glm4", "chatglm2+ptuning", "chatglm+grouped",
                                    "chatglm2+ptuning+grouped"])
def test_staggered_arrivals_get_their_greedy_tokens_alone(families, family, make_engine, monkeypatch):
    model, tok = families[family.split("+")[0]]
    if family.endswith("grouped"):  # decode attention in length groups at every step with rows of unequal length
        monkeypatch.setattr(paged_cache, "GROUP_COST_BYTES", 0)
        groups = []
        bind = BlockPool.bind

        def counting_bind(pool, write, read, lengths=None):
            bind(pool, write, read, lengths)
            groups.append(len(pool.groups or [None]))

        monkeypatch.setattr(BlockPool, "bind", counting_bind)
    if "ptuning" in family:
        model = copy.deepcopy(model)
        attach_prefix(model, 4)
        with torch.no_grad():
            model.prefix_encoder.embedding.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
        model.eval()  # the new prefix encoder too
    engine = make_engine(model, tok, max_batch_size=4, block_size=4, prefill_chunk=5)
    sizes = [5, 17, 9, 30, 12, 25]
    requests = [(ids, SamplingParams(max_new_tokens=n)) for ids, n in zip(prompts(model, tok), sizes)]
    expected = [alone(model, tok, ids, p) for ids, p in requests]
    results, _ = run(engine, requests, [0.0, 0.005, 0.01, 0.03, 0.06, 0.1])
    assert [r[0] for r in results] == expected
    assert any(len(e) == n for e, n in zip(expected, sizes)), "the model stopped every answer early"
    assert engine.stats["largest_batch"] > 1, "arrivals never shared a decode step"
    assert engine.kv_blocks()[0] == 0
    if family.endswith("grouped"):
        assert max(groups) > 1, "no decode step split its rows into length groups"


def test_each_request_keeps_its_own_settings_in_one_batch(families, make_engine):
    model, tok = families["chatglm3"]
    engine = make_engine(model, tok, max_batch_size=8, block_size=4)
    ids = prompts(model, tok)
    settings = [SamplingParams(max_new_tokens=20),
                SamplingParams(max_new_tokens=20, do_sample=True, temperature=0.8, top_p=0.9, top_k=50, seed=7),
                SamplingParams(max_new_tokens=14, presence_penalty=1.5, frequency_penalty=0.5),
                SamplingParams(max_new_tokens=20, do_sample=True, temperature=1.3, top_p=1.0, seed=123),
                SamplingParams(max_new_tokens=9, do_sample=True, temperature=0.5, top_k=5, seed=99,
                               presence_penalty=0.7)]
    requests = list(zip(ids, settings))
    expected = [alone(model, tok, i, p) for i, p in requests]
    results, _ = run(engine, requests, [0.0] * len(requests))
    assert [r[0] for r in results] == expected
    assert engine.stats["largest_batch"] > 1


@pytest.mark.parametrize("family", ["chatglm", "chatglm3"])
def test_preemption_and_recompute_give_the_same_tokens(families, family, make_engine):
    model, tok = families[family]
    memory = 17 * bytes_per_block(model.config, 4, model.dtype)  # 68 tokens: one context, not six answers
    engine = make_engine(model, tok, max_batch_size=6, block_size=4, prefill_chunk=8, kv_cache_memory=memory)
    requests = [(ids, SamplingParams(max_new_tokens=64 - len(ids) - 1)) for ids in prompts(model, tok)]
    expected = [alone(model, tok, ids, p) for ids, p in requests]
    results, _ = run(engine, requests, [0.0] * len(requests))
    assert [r[0] for r in results] == expected
    assert engine.stats["preempted"] > 0, "the pool never ran out: nothing was preempted"
    assert engine.kv_blocks() == (0, 17)


def test_kv_cache_smaller_than_one_context_is_refused(families):
    model, tok = families["chatglm2"]
    with pytest.raises(ValueError, match="one full context"):
        ContinuousEngine(model, tok, kv_cache_memory=1000, block_size=4)


def test_chunked_prefill_does_not_stall_running_rows(families, make_engine):
    model, tok = families["chatglm2"]
    engine = make_engine(model, tok, max_batch_size=4, block_size=4, prefill_chunk=2, prefix_caching=False)
    fmt = ChatFormat(tok, model.config.max_seq_len)
    short = fmt.prompt_ids("hi", [], None)
    long = fmt.prompt_ids("the cat runs fast " * 6, [], None)
    assert len(long) > 30
    requests = [(short, SamplingParams(max_new_tokens=60 - len(short))), (long, SamplingParams(max_new_tokens=3))]
    expected = [alone(model, tok, ids, p) for ids, p in requests]
    (first, second), _ = run(engine, requests, [0.0, None])  # the long prompt arrives while the short one decodes
    assert [first[0], second[0]] == expected
    # while the long prompt was prefilled 2 tokens a step, the running row kept getting a token a step; a prefill in
    # one piece would give it at most one
    during = [t for t in first[2] if second[3] < t < second[2][0]]
    assert len(during) >= len(long) // 2 - 2, f"only {len(during)} tokens while a {len(long)}-token prompt prefilled"


def test_step_token_budget_leaves_the_decode_rows_their_share(families, make_engine):
    """max_batched_tokens: each step's prefill takes at most the budget less the rows decoding in it (at least a
    block), and the answers stay those each request gets alone."""
    model, tok = families["chatglm2"]
    engine = make_engine(model, tok, max_batch_size=4, block_size=4, prefill_chunk=512, max_batched_tokens=7,
                         prefix_caching=False)
    fmt = ChatFormat(tok, model.config.max_seq_len)
    short = [fmt.prompt_ids(q, [], None) for q in ("hi", "hello")]
    long = fmt.prompt_ids("the cat runs fast " * 6, [], None)
    requests = [(ids, SamplingParams(max_new_tokens=60 - len(ids))) for ids in short] + [
        (long, SamplingParams(max_new_tokens=3))]
    expected = [alone(model, tok, ids, p) for ids, p in requests]
    steps = []  # (rows decoding when the step's prefill began, tokens it prefilled)
    prefill, forward = engine._prefill, engine._forward

    def counted_prefill():
        steps.append([sum(s.cached == len(s.tokens) - 1 for s in engine._running), 0])
        prefill()

    def counted_forward(rows, start=None, end=None):
        if start is not None:
            steps[-1][1] += end - start
        return forward(rows, start, end)

    engine._prefill, engine._forward = counted_prefill, counted_forward
    results, _ = run(engine, requests, [0.0, 0.0, None])  # the long prompt arrives while both short ones decode
    assert [r[0] for r in results] == expected
    assert all(done <= max(7 - decoding, 4) for decoding, done in steps), steps
    # the long prompt was prefilled beside two decode rows: 5 tokens a step, not all at once
    assert any(decoding == 2 and done == 5 for decoding, done in steps), steps
    with pytest.raises(ValueError, match="max_batched_tokens"):
        ContinuousEngine(model, tok, max_batched_tokens=0)


def test_cancellation_frees_kv_blocks(families, make_engine):
    model, tok = families["chatglm3"]
    engine = make_engine(model, tok, max_batch_size=4, block_size=4)
    engine.start()

    async def main():
        loop = asyncio.get_running_loop()
        jobs = [Job(ids, SamplingParams(max_new_tokens=40), loop) for ids in prompts(model, tok)[:3]]
        for job in jobs:
            engine.submit(job)
        for job in jobs:  # each has started decoding
            assert (await asyncio.wait_for(job.events.get(), 30))[0] == "token"
        assert engine.kv_blocks()[0] > 0
        for job in jobs:
            job.cancel()
        ends = []
        for job in jobs:
            while (event := await asyncio.wait_for(job.events.get(), 30))[0] == "token":
                pass
            ends.append(event)
        return ends

    assert asyncio.run(main()) == [("end", "cancelled")] * 3
    assert engine.kv_blocks()[0] == 0 and engine.active == 0


def test_shared_prefixes_are_prefilled_once_and_change_nothing(families, make_engine):
    model, tok = families["chatglm3"]
    fmt = ChatFormat(tok, model.config.max_seq_len)
    system = "the model answer question hello world river stone light"
    requests = [(fmt.prompt_ids(q, [], system), SamplingParams(max_new_tokens=8)) for q in QUERIES[:4]]
    assert len(requests[0][0]) > 12
    expected = [alone(model, tok, ids, p) for ids, p in requests]
    engine = make_engine(model, tok, max_batch_size=4, block_size=4)
    results, _ = run(engine, requests, [0.0, 0.3, 0.35, 0.4])  # the first one's prompt is cached by then
    assert [r[0] for r in results] == expected
    assert engine.stats["cached_tokens"] >= 3 * 8, engine.stats
    assert engine.kv_blocks()[0] == 0
    again, _ = run(engine, requests[:1], [0.0])  # the whole prompt but its last token comes from the cache
    assert again[0][0] == expected[0]
