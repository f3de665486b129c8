"""Generation functions: a causal LM registered with task="text-generation" answers each SQL row with
what the same model's in-process ``generate`` gives that prompt with the same settings and seed,
continuously batched in real Ray workers, under per-row parameters, bad rows and a worker's SIGKILL.
The model is a small Llama with random weights (sql_magics/front/text_data.py): nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import numpy as np
import pytest

pytest.importorskip("transformers")

import torch
import transformers

from sql_magics import ExecutionError
from sql_magics.front.text_data import TINY_CHAT, save_chat_model, stdlib_texts
from udf_engine.models.continuous import LENGTH, STOP, ContinuousBatcher, Sampling, Sequence
from udf_engine.models.generation import row_seed

from conftest import WORKER_CPUS, numbered_table, registered

VERSION_HEADER = "x-rayudf-version"

ONE = f'workers="1" and num_cpus="{WORKER_CPUS}"'
USAGE = "STRUCT(text VARCHAR, prompt_tokens INT, completion_tokens INT, finish_reason VARCHAR)"


@pytest.fixture(scope="module")
def chat_path(tmp_path_factory):
    return save_chat_model(tmp_path_factory.mktemp("llm"), TINY_CHAT)


@pytest.fixture(scope="module")
def local(chat_path):
    """The same model and tokenizer, in this process."""
    model = transformers.AutoModelForCausalLM.from_pretrained(chat_path).eval()
    return model, transformers.AutoTokenizer.from_pretrained(chat_path)


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    """Prompts of mixed length, two of them twice (equal prompts are seeded apart)."""
    lines = stdlib_texts()
    rng = np.random.default_rng(5)
    made = [" ".join(lines[i : i + int(n)])[:300] for i, n in zip(rng.integers(0, len(lines) - 5, 24), rng.integers(1, 4, 24), strict=True)]
    return [*made, made[0], made[3]]


@pytest.fixture(scope="module")
def prompt_table(session, prompts):
    return numbered_table(session, "prompt_rows", "p", [*prompts, None])


def answers(session, expression: str, table: str = "prompt_rows") -> list:
    return [y for _, y in session.con.execute(f"select i, {expression} as y from {table} order by i").fetchall()]


def generated(
    local, text: str, *, max_new_tokens: int, seed: int | None = None, template: bool = False, **sampling
) -> tuple[str, int, int]:
    """The in-process answer: Transformers' ``generate`` on one prompt (sampling seeded as the function seeds the row)."""
    model, tokenizer = local
    ids = torch.tensor([tokenizer(text, add_special_tokens=not template).input_ids])
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=seed is not None,
        **({"top_k": 0, **sampling} if seed is not None else {}),
    )
    new = out[0, ids.shape[1] :].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), ids.shape[1], len([t for t in new if t != tokenizer.eos_token_id])


def test_greedy_answers_equal_generate_row_by_row_with_usage(session, chat_path, local, prompts, prompt_table):
    statement = f"register transformers.`{chat_path}` as chat where max_new_tokens='12' and returns='{USAGE}' and {ONE}"
    with registered(session, statement, "chat"):
        got = answers(session, "chat(p)")
        assert got[-1] is None  # NULL prompt, NULL answer
        for prompt, row in zip(prompts, got, strict=False):
            text, prompt_tokens, completion_tokens = generated(local, prompt, max_new_tokens=12)
            assert row == {
                "text": text, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "finish_reason": LENGTH if completion_tokens == 12 else STOP,
            }
        workers = session.sql("!workers").query("function == 'chat'")
        assert workers["generated_tokens"].sum() >= sum(r["completion_tokens"] for r in got[:-1])
        assert session.sql("!models").set_index("function").loc["chat", "returns"] == USAGE


def test_sampling_is_seeded_per_row_as_generate_with_that_seed(session, chat_path, local, prompts, prompt_table):
    statement = f"register transformers.`{chat_path}` as sampled where temperature='0.9' and top_p='0.8' and seed='11' and " \
                f"max_new_tokens='10' and {ONE}"
    with registered(session, statement, "sampled"):
        got = answers(session, "sampled(p)")
        again = answers(session, "sampled(p)")
    assert got == again  # the same query gives the same text
    occurrences: dict[str, int] = {}
    for prompt, text in zip(prompts, got, strict=False):
        seen = occurrences.get(prompt, 0)
        occurrences[prompt] = seen + 1
        want, _, _ = generated(local, prompt, max_new_tokens=10, seed=row_seed(11, prompt, seen), temperature=0.9, top_p=0.8)
        assert text == want
    assert got[0] != got[len(prompts) - 2]  # the same prompt twice: sampled apart


def test_per_row_parameters_system_prompt_messages_and_stop(session, chat_path, local, prompts, prompt_table):
    model, tokenizer = local
    with registered(session, f"register transformers.`{chat_path}` as tune where max_new_tokens='6' and {ONE}", "tune"):
        json_rows = answers(session, "tune(p, '{\"max_new_tokens\": ' || (i % 3 + 2) || '}')")
        struct_rows = answers(session, "tune(p, {'max_new_tokens': i % 3 + 2, 'seed': NULL})")
        none_rows = answers(session, "tune(p, NULL::VARCHAR)")
        for i, prompt in enumerate(prompts):
            assert json_rows[i] == struct_rows[i] == generated(local, prompt, max_new_tokens=i % 3 + 2)[0]
            assert none_rows[i] == generated(local, prompt, max_new_tokens=6)[0]  # NULL parameters: the options

        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompts[1]}]
        templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        want = generated(local, templated, max_new_tokens=6, template=True)[0]
        (by_option,), = session.con.execute("select tune(?, '{\"system\": \"Be brief.\"}')", [prompts[1]]).fetchall()
        (by_messages,), = session.con.execute(
            "select tune([{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': ?}])", [prompts[1]]
        ).fetchall()
        assert by_option == by_messages == want

        full = generated(local, prompts[2], max_new_tokens=6)[0]
        stop = full[3:5]
        (cut,), = session.con.execute("select tune(?, {'stop': ?})", [prompts[2], stop]).fetchall()
        assert cut == full[: full.index(stop)]


def test_bad_rows_are_named_or_left_null_and_the_others_exact(session, chat_path, local, prompts, prompt_table):
    long = " ".join(stdlib_texts()[:200])  # past the model's 256 positions
    session.con.execute("create or replace table with_long as select * from prompt_rows union all select 100, ?", [long])
    with registered(session, f"register transformers.`{chat_path}` as strict where max_new_tokens='4' and {ONE}", "strict"):
        with pytest.raises(ExecutionError, match=r"(?s)do not fit the model's 256 positions.*row"):
            session.sql("select strict(p) as y from with_long as output")
        with pytest.raises(ExecutionError, match=r"unknown parameter\(s\) temprature"):
            session.sql("select strict('hi', '{\"temprature\": 1}') as y as output")
        with pytest.raises(ExecutionError, match="a generation model takes a prompt"):
            session.sql("select strict(1.5) as y as output")
    statement = f"register transformers.`{chat_path}` as lenient where max_new_tokens='4' and on_error='null' and {ONE}"
    with registered(session, statement, "lenient"):
        got = answers(session, "lenient(p)", "with_long")
    assert got[-1] is None and got[-2] is None  # the long prompt and the NULL one
    assert got[:-2] == [generated(local, p, max_new_tokens=4)[0] for p in prompts]


def test_a_worker_killed_mid_query_gives_the_very_same_sampled_text(session, chat_path, prompts):
    two = f'workers="2" and num_cpus="{WORKER_CPUS}" and batch_size="8"'
    statement = f"register transformers.`{chat_path}` as steady where temperature='1.0' and max_new_tokens='24' and {two}"
    many = prompts * 12
    numbered_table(session, "many_prompts", "p", many)
    with registered(session, statement, "steady"):
        want = answers(session, "steady(p)", "many_prompts")
        udf = session.functions["steady"].udf
        before = sum(s["batches"] for s in udf.stats())
        killed: list[int] = []

        def kill_when_busy() -> None:
            deadline = time.monotonic() + 60
            while sum(s["batches"] for s in udf.stats()) < before + 4 and time.monotonic() < deadline:
                time.sleep(0.02)
            pid = udf.stats()[0]["pid"]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

        killer = threading.Thread(target=kill_when_busy)
        killer.start()
        got = answers(session, "steady(p)", "many_prompts")
        killer.join()
    assert killed and got == want and len(got) == len(many)


def test_a_long_answer_does_not_hold_short_ones_and_the_budget_bounds_the_batch(local, prompts):
    model, tokenizer = local
    batcher = ContinuousBatcher(model, tokenizer, device="cpu", max_batch_tokens=10_000)
    # a prompt whose greedy answer runs to its 80 tokens (no end-of-sequence token on the way)
    long_prompt = next(p for p in prompts if generated(local, p, max_new_tokens=80)[2] == 80)
    long = Sequence(tokenizer(long_prompt).input_ids, Sampling(max_new_tokens=80))
    batcher.submit([long])
    while not long.generated:
        time.sleep(0.001)
    short = [Sequence(tokenizer(p).input_ids, Sampling(max_new_tokens=3)) for p in prompts[:6]]
    batcher.submit(short)
    for seq in short:
        seq.wait(timeout=60)
    assert not long.done  # the short ones joined the running batch and left it while the long one went on
    assert long.wait(timeout=60).finish_reason == LENGTH
    assert [s.text for s in short] == [generated(local, p, max_new_tokens=3)[0] for p in prompts[:6]]

    ids = tokenizer(prompts[1]).input_ids
    tight = ContinuousBatcher(model, tokenizer, device="cpu", max_batch_tokens=2 * (len(ids) + 4))  # room for two at once
    seqs = [Sequence(ids, Sampling(max_new_tokens=4, temperature=1.0, seed=seed)) for seed in range(8)]
    tight.submit(seqs)
    want = [generated(local, prompts[1], max_new_tokens=4, seed=seed, temperature=1.0)[0] for seed in range(8)]
    assert [s.wait(timeout=60).text for s in seqs] == want
    assert 1 < tight.counts()["occupancy"] <= 2


def test_a_streamed_answer_comes_in_pieces_that_join_to_the_answer_and_hold_back_a_stop(local, prompts):
    model, tokenizer = local
    batcher = ContinuousBatcher(model, tokenizer, device="cpu", max_batch_tokens=10_000)
    full = generated(local, prompts[4], max_new_tokens=20)[0]
    stop = full[8:11]
    pieces: list = []
    seq = Sequence(tokenizer(prompts[4]).input_ids, Sampling(max_new_tokens=20, stop=(stop,)), on_text=pieces.append)
    batcher.submit([seq])
    assert seq.wait(timeout=60).finish_reason == STOP
    assert pieces[-1] is None and len(pieces) > 2
    assert "".join(pieces[:-1]) == seq.text == full[: full.index(stop)]


# -- OpenAI's API on `rayudf serve` ------------------------------------------------------------------

TOKEN = "llm-token"


@pytest.fixture(scope="module")
def encoder_path(tmp_path_factory):
    from sql_magics.front.text_data import TINY, save_text_models

    return save_text_models(tmp_path_factory.mktemp("encoder"), TINY)["encoder"]


@pytest.fixture(scope="module")
def server(session, chat_path, encoder_path):
    from conftest import free_port

    session.sql(f"register transformers.`{chat_path}` as chat where max_new_tokens='16' and {ONE}")
    session.sql(f"register transformers.`{encoder_path}` as embed where task='feature-extraction' and normalize='true' and {ONE}")
    port = free_port()
    url = session.sql(f"!serve port={port} token={TOKEN}")["url"][0]
    yield url
    session.sql("!serve stop")
    for name in ("chat", "embed"):
        if name in session.functions:
            session.unregister(name)


@pytest.fixture
def openai_client(server):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=f"{server}/v1", api_key=TOKEN, max_retries=0, timeout=60) as client:
        yield client


def chat_text(local, messages: list[dict], max_new_tokens: int) -> tuple[str, int, int]:
    templated = local[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return generated(local, templated, max_new_tokens=max_new_tokens, template=True)


def test_the_openai_client_chats_completes_and_embeds_as_the_models_do_in_process(session, server, openai_client, local, prompts):
    assert {m.id for m in openai_client.models.list().data} == {"chat", "embed"}

    messages = [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": prompts[5]}]
    answer = openai_client.chat.completions.create(model="chat", messages=messages, max_tokens=10)
    text, prompt_tokens, completion_tokens = chat_text(local, messages, 10)
    assert answer.choices[0].message.content == text and answer.choices[0].message.role == "assistant"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert answer.choices[0].finish_reason == ("length" if completion_tokens == 10 else "stop")

    done = openai_client.completions.create(model="chat", prompt=prompts[:3], max_tokens=6)
    assert [c.text for c in done.choices] == [generated(local, p, max_new_tokens=6)[0] for p in prompts[:3]]

    sampled = [openai_client.completions.create(model="chat", prompt=prompts[0], max_tokens=8, temperature=0.9, seed=4).choices[0].text
               for _ in range(2)]
    assert sampled[0] == sampled[1] == generated(local, prompts[0], max_new_tokens=8, seed=row_seed(4, prompts[0], 0), temperature=0.9)[0]
    unseeded = [openai_client.completions.create(model="chat", prompt=prompts[0], max_tokens=8, temperature=0.9).choices[0].text
                for _ in range(2)]
    assert unseeded[0] != unseeded[1]  # no seed: sampled afresh, as OpenAI does

    vectors = openai_client.embeddings.create(model="embed", input=prompts[:4]).data
    in_sql = [y for (y,) in session.con.execute("select embed(p) from (select unnest(?) as p, generate_subscripts(?, 1) as i) order by i",
                                               [prompts[:4], prompts[:4]]).fetchall()]
    np.testing.assert_allclose([v.embedding for v in vectors], in_sql, atol=1e-5)


def test_a_streamed_chat_comes_token_by_token_and_joins_to_the_answer(server, openai_client, local, prompts):
    messages = [{"role": "user", "content": prompts[7]}]
    pieces, reasons, usages = [], [], []
    stream = openai_client.chat.completions.create(
        model="chat", messages=messages, max_tokens=14, stream=True, stream_options={"include_usage": True}
    )
    for part in stream:
        if part.usage is not None:
            usages.append(part.usage)
        for choice in part.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    text, prompt_tokens, completion_tokens = chat_text(local, messages, 14)
    assert "".join(pieces) == text and len(pieces) > 3 and len(reasons) == 1
    assert [(u.prompt_tokens, u.completion_tokens) for u in usages] == [(prompt_tokens, completion_tokens)]


def test_openai_errors_come_in_openais_shape(server, openai_client):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()
    with pytest.raises(openai.NotFoundError, match="no function named 'gpt-4o'"):
        openai_client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="not a generation function"):
        openai_client.chat.completions.create(model="embed", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="n: one answer"):
        openai_client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], n=2)
    too_long = " ".join(stdlib_texts()[:200])
    for stream in (False, True):
        with pytest.raises(openai.UnprocessableEntityError, match="do not fit the model's 256 positions"):
            openai_client.completions.create(model="chat", prompt=too_long, max_tokens=4, stream=stream)
    answer = httpx_post(server, "/v1/chat/completions", {"model": "chat", "messages": "hi"})
    assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="at most 256 prompts"):
        openai_client.completions.create(model="chat", prompt=["x"] * 257, max_tokens=1)
    with pytest.raises(openai.UnprocessableEntityError, match="stop takes at most 16 strings"):
        openai_client.completions.create(model="chat", prompt="x", max_tokens=1, stop=[str(i) for i in range(17)])


def httpx_post(server: str, path: str, body: dict, **headers: str):
    import httpx

    return httpx.post(f"{server}{path}", json=body, headers={"Authorization": f"Bearer {TOKEN}", **headers}, timeout=60)


def test_byzer_predict_and_v1_functions_call_a_generation_function(server, local, prompts):
    ask = {"dataType": "string", "data": json.dumps(prompts[:2]), "sql": "select upper(chat(feature)) as a"}
    answer = httpx_post(server, "/model/predict", ask)
    assert answer.status_code == 200, answer.text
    assert [row["a"] for row in answer.json()] == [generated(local, p, max_new_tokens=16)[0].upper() for p in prompts[:2]]
    answer = httpx_post(server, "/v1/functions/chat", {"inputs": [[prompts[3], '{"max_new_tokens": 3}'], [None, None]]})
    assert answer.json()["outputs"] == [generated(local, prompts[3], max_new_tokens=3)[0], None]


def test_metrics_show_time_to_first_token_tokens_and_sequences(server, openai_client):
    openai_client.completions.create(model="chat", prompt="The value", max_tokens=5)
    text = httpx_get(server, "/metrics")
    assert re.search(r'rayudf_time_to_first_token_seconds_count\{function="chat"\} [1-9]', text)
    assert re.search(r'rayudf_generated_tokens_total\{function="chat"\} [1-9]', text)
    assert 'rayudf_sequences_running{function="chat"} 0' in text and 'rayudf_sequences_waiting{function="chat"} 0' in text


def httpx_get(server: str, path: str) -> str:
    import httpx

    return httpx.get(f"{server}{path}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60).text


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """A wider chat model, and it in this process: 200 tokens take it seconds, so a stream stays open that long."""
    from sql_magics.front.text_data import Shape

    path = save_chat_model(tmp_path_factory.mktemp("slow"), Shape(hidden=512, layers=6, heads=8, intermediate=1024, max_length=256,
                                                                  vocab=2000), seed=9)
    return path, (transformers.AutoModelForCausalLM.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(path))


def streamed_text(lines) -> str:
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]
    return "".join(e["choices"][0]["text"] for e in events if e["choices"])


def test_a_worker_killed_mid_stream_gives_the_rest_of_the_same_answer(session, server, slow):
    import httpx

    path, slow_local = slow
    session.sql(f"register transformers.`{path}` as killed where max_new_tokens='200' and {ONE}")
    try:
        pid = session.functions["killed"].udf.stats()[0]["pid"]
        body = {"model": "killed", "prompt": "The", "max_tokens": 200, "stream": True, "temperature": 0.8, "seed": 3}
        with httpx.stream("POST", f"{server}/v1/completions", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as r:
            lines = r.iter_lines()
            first = [next(line for line in lines if line.startswith("data: "))]
            os.kill(pid, signal.SIGKILL)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        want = generated(slow_local, "The", max_new_tokens=200, seed=row_seed(3, "The", 0), temperature=0.8)[0]
        assert streamed_text([*first, *rest]) == want
        assert session.functions["killed"].udf.stats()[0]["pid"] != pid
    finally:
        session.unregister("killed")


def test_a_stream_open_across_a_swap_finishes_on_its_version(session, server, slow):
    path, slow_local = slow
    session.sql(f"register transformers.`{path}` as swapped where max_new_tokens='200' and {ONE}")
    try:
        import httpx

        body = {"model": "swapped", "prompt": "The", "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{server}/v1/completions", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            session.sql(f"register transformers.`{chat_path_of(session)}` as swapped where max_new_tokens='200' and {ONE}")
            rest = [line for line in lines if line.startswith("data: ")]
            version = r.headers[VERSION_HEADER]
        assert version == "swapped=1" and rest[-1] == "data: [DONE]"
        assert streamed_text([first, *rest]) == generated(slow_local, "The", max_new_tokens=200)[0]
        after = httpx_post(server, "/v1/completions", {"model": "swapped", "prompt": "The", "max_tokens": 5})
        assert after.headers[VERSION_HEADER] == "swapped=2"
    finally:
        session.unregister("swapped")


def chat_path_of(session) -> str:
    return session.functions["chat"].path


def test_a_failure_while_prompts_join_fails_every_sequence_and_none_hangs(local, prompts):
    model, tokenizer = local
    batcher = ContinuousBatcher(model, tokenizer, device="cpu", max_batch_tokens=100_000)
    prefill, calls = batcher._prefill, []

    def second_group_fails(group):
        calls.append(len(group))
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        prefill(group)

    batcher._prefill = second_group_fails
    seqs = [Sequence([7] * length, Sampling(max_new_tokens=4)) for length in (1500, 1500, 10, 10)]  # two prefill groups
    batcher.submit(seqs)
    for seq in seqs:
        with pytest.raises(RuntimeError, match="out of memory"):
            seq.wait(timeout=60)
    assert len(calls) == 2
