"""`python -m bcnp.serve` through the real `openai` client: what each endpoint answers, on the demo model.

The demo's weights are random, so replies are gibberish; what is checked is that the server answers exactly what
bcnp's own generation gives for the same prompt and settings (greedy: the same tokens as
`python -m bcnp.generate --greedy`; seeded: the same tokens alone or among other clients)."""
import os
import pathlib
import subprocess
import sys
import threading

import openai
import pytest

from bcnp import Model
from bcnp.demo import build_demo_model
from serve_helpers import running

ROOT = pathlib.Path(__file__).parent.parent
GREEDY = dict(temperature=0)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return pathlib.Path(build_demo_model(tmp_path_factory.mktemp("serve") / "demo"))


@pytest.fixture(scope="module")
def model(demo_dir):
    return Model.from_pretrained(demo_dir)


@pytest.fixture(scope="module")
def server(model):
    with running(model, max_batch=8, max_waiting=64) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)


def user(text):
    return [{"role": "user", "content": text}]


def chat(client, messages, **kwargs):
    return client.chat.completions.create(model="demo", messages=messages, **kwargs)


def streamed(client, messages, **kwargs):
    """(the text of each choice, the finish reason of each, the usage chunk) of a streamed chat."""
    chunks = list(chat(client, messages, stream=True, **kwargs))
    n = kwargs.get("n", 1)
    texts, reasons = [""] * n, [None] * n
    for chunk in chunks:
        assert chunk.object == "chat.completion.chunk" and chunk.id == chunks[0].id
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    return texts, reasons, chunks


def expected_tokens(model, ids, max_tokens, **settings):
    return list(model.generate(ids, max_new_tokens=max_tokens, **settings))


def test_a_greedy_chat_is_what_bcnp_generate_greedy_prints(client, model, demo_dir):
    messages = user("Tell me about the second highest mountain.")
    reply = chat(client, messages, max_tokens=12, **GREEDY)
    cli = subprocess.run([sys.executable, "-m", "bcnp.generate", "--model", str(demo_dir), "--greedy",
                          "--max-new-tokens", "12", "--prompt", messages[0]["content"]],
                         env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8"},
                         capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert reply.choices[0].message.content + "\n" == cli.stdout
    assert reply.choices[0].message.role == "assistant"
    assert reply.object == "chat.completion" and reply.model == "demo" and reply.id.startswith("chatcmpl-")
    assert isinstance(reply.created, int)


def test_usage_counts_the_prompt_and_the_generated_tokens(client, model):
    messages = [{"role": "system", "content": "Be brief."}] + user("Hello") + \
               [{"role": "assistant", "content": "Hi!"}] + user("How are you?")
    reply = chat(client, messages, max_tokens=10, **GREEDY)
    ids = model.chat_prompt(messages, 10)[0]
    tokens = expected_tokens(model, ids, 10, do_sample=False)
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == len(tokens)
    assert reply.usage.total_tokens == len(ids) + len(tokens)
    assert reply.choices[0].message.content == model.tokenizer.decode(tokens)
    assert reply.choices[0].finish_reason == ("length" if len(tokens) == 10 else "stop")


def test_a_stream_gives_the_same_text_as_the_whole_answer(client):
    messages = user("Stream this, please.")
    whole = chat(client, messages, max_tokens=16, seed=5)
    texts, reasons, chunks = streamed(client, messages, max_tokens=16, seed=5,
                                      stream_options={"include_usage": True})
    assert chunks[0].choices[0].delta.role == "assistant"
    assert texts == [whole.choices[0].message.content] and reasons == [whole.choices[0].finish_reason]
    assert [c.usage for c in chunks[:-1]] == [None] * (len(chunks) - 1)       # usage only in the last chunk
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == reasons[0]
    assert all(chunk.choices[0].delta.content for chunk in chunks[1:-2])      # no empty content deltas


def test_completions_continue_the_prompt_as_it_is_encoded(client, model):
    prompt = "Once upon a time"
    ids = model.tokenizer.encode(prompt)
    tokens = expected_tokens(model, ids, 9, do_sample=False)
    reply = client.completions.create(model="demo", prompt=prompt, max_tokens=9, temperature=0)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.choices[0].text == model.tokenizer.decode(tokens)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), len(tokens))
    stream = list(client.completions.create(model="demo", prompt=prompt, max_tokens=9, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in stream if c.choices) == reply.choices[0].text
    assert stream[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def test_the_same_seed_gives_the_same_text_and_n_choices_take_seed_plus_i(client, model):
    messages = user("Pick a word.")
    settings = dict(max_tokens=12, seed=41, temperature=0.9, top_p=0.95, extra_body={"top_k": 20})   # an extension
    first, again = chat(client, messages, **settings), chat(client, messages, **settings)
    assert first.choices[0].message.content == again.choices[0].message.content
    pair = chat(client, messages, n=2, **settings)
    assert [c.index for c in pair.choices] == [0, 1]
    ids = model.chat_prompt(messages, 12)[0]
    sampling = dict(temperature=0.9, top_p=0.95, top_k=20, do_sample=True)
    for i, choice in enumerate(pair.choices):
        assert choice.message.content == model.tokenizer.decode(expected_tokens(model, ids, 12, seed=41 + i,
                                                                                **sampling))
    assert pair.choices[0].message.content != pair.choices[1].message.content
    assert pair.usage.completion_tokens == sum(
        len(expected_tokens(model, ids, 12, seed=41 + i, **sampling)) for i in range(2))
    texts, _, _ = streamed(client, messages, n=2, **settings)
    assert texts == [c.message.content for c in pair.choices]


def test_a_stop_string_cuts_the_text_before_it_and_finishes_with_stop(client):
    messages = user("Say something long.")
    full = chat(client, messages, max_tokens=40, **GREEDY).choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = full[:full.find(stop)]
    reply = chat(client, messages, max_tokens=40, stop=[stop, "\u0000never"], **GREEDY)
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (cut, "stop")
    assert reply.usage.completion_tokens < 40
    texts, reasons, _ = streamed(client, messages, max_tokens=40, stop=stop, **GREEDY)
    assert (texts, reasons) == ([cut], ["stop"])


def test_logprobs_are_the_models_in_openais_format(client, model):
    messages = user("Hi")
    reply = chat(client, messages, max_tokens=5, logprobs=True, top_logprobs=3, **GREEDY)
    content = reply.choices[0].logprobs.content
    ids = model.chat_prompt(messages, 5)[0]
    tokens = expected_tokens(model, ids, 5, do_sample=False)
    assert len(content) == len(tokens) == reply.usage.completion_tokens
    assert b"".join(bytes(entry.bytes) for entry in content).decode() == reply.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs), abs=0.2)
    completion = client.completions.create(model="demo", prompt="Hi", max_tokens=4, logprobs=2, temperature=0)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert all(len(top) == 2 for top in logprobs.top_logprobs)


def test_a_client_that_resends_its_history_reuses_the_cached_prefix(client, model):
    first = user("Remember the number seven.")
    reply = chat(client, first, max_tokens=8, **GREEDY)
    second = first + [{"role": "assistant", "content": reply.choices[0].message.content}] + user("Which number?")
    again = chat(client, second, max_tokens=8, **GREEDY)
    assert reply.usage.prompt_tokens_details.cached_tokens <= 1                  # the user token other chats share
    assert again.usage.prompt_tokens_details.cached_tokens >= len(model.chat_prompt(first, 8)[0])


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["demo"]


def test_eight_clients_at_once_each_get_what_they_get_alone(client, server):
    def ask(t, r):
        if (t + r) % 2:
            return chat(client, user(f"client {t} request {r}"), max_tokens=8, seed=100 * t + r, n=1 + r % 2)
        return client.completions.create(model="demo", prompt=f"client {t} asks {r}", max_tokens=8, temperature=0)

    def answer(reply):
        return [getattr(c, "message", c) for c in reply.choices], reply.id

    alone = {(t, r): answer(ask(t, r))[0] for t in range(8) for r in range(3)}
    together, errors, batch_sizes = {}, [], []
    engine = server.loop.engine
    step = engine.step

    def counted_step():
        batch_sizes.append(len(engine.active))
        return step()
    engine.step = counted_step

    def worker(t):
        try:
            for r in range(3):
                together[t, r] = answer(ask(t, r))
        except Exception as e:                         # noqa: BLE001 -- reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    del engine.step
    assert max(batch_sizes) > 1                                                # they did run together
    assert errors == [] and sorted(together) == sorted(alone)
    assert len({reply_id for _, reply_id in together.values()}) == 24          # 24 answers, none twice

    def texts(choices):
        return [getattr(c, "content", None) or getattr(c, "text", None) for c in choices]
    for key, (choices, _) in together.items():
        assert texts(choices) == texts(alone[key]), key
    assert server.loop.busy_requests() == 0 and not server.loop.engine.busy
