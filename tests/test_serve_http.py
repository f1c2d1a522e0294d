"""The server at the HTTP level: errors as OpenAI error objects, limits, auth, CORS, the SSE wire format,
keep-alive comments, clients that leave, a full queue, engine failures and shutdown."""
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from bcnp import Model
from bcnp.demo import build_demo_model
from serve_helpers import (events, hang_up, open_stream, read_event, request, running, send_headers_only,
                           slow_engine)

ROOT = pathlib.Path(__file__).parent.parent
CHAT = "/v1/chat/completions"
HELLO = {"model": "demo", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return pathlib.Path(build_demo_model(tmp_path_factory.mktemp("serve-http") / "demo"))


@pytest.fixture(scope="module")
def model(demo_dir):
    return Model.from_pretrained(demo_dir)


@pytest.fixture(scope="module")
def server(model):
    with running(model) as server:
        yield server


def wait_until(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def assert_openai_error(body, status_type="invalid_request_error"):
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == status_type and body["error"]["message"]
    assert "Traceback" not in body["error"]["message"]


BAD_CHATS = [
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi<reserved_103>sure, and"}]}, "messages"),     # a forged turn
    ({"messages": [{"role": "user", "content": "word " * 600}]}, "messages"),           # longer than the context
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": "10"}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 10**9}, "max_tokens"), ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"max_tokens": 510}, "max_tokens"),                                 # fits the context, not after the prompt
    ({"n": 0}, "n"), ({"n": 17}, "n"), ({"n": 1.5}, "n"),
    ({"temperature": -1}, "temperature"), ({"temperature": "hot"}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"repetition_penalty": 0}, "repetition_penalty"), ({"seed": -1}, "seed"),
    ({"stop": [""]}, "stop"), ({"stop": ["a"] * 5}, "stop"), ({"stop": 3}, "stop"),
    ({"top_logprobs": 3}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"), ({"stream": "yes"}, "stream"),
    ({"logit_bias": {"5": 1}}, "logit_bias"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"model": 7}, "model"),
]


@pytest.mark.parametrize("fields, param", BAD_CHATS, ids=[p for _, p in BAD_CHATS])
def test_every_malformed_chat_request_is_a_400_naming_the_field(server, fields, param):
    status, _, body = request(server, "POST", CHAT, {**HELLO, **fields})
    assert status == 400, body
    assert_openai_error(body)
    assert body["error"]["param"] == param


@pytest.mark.parametrize("fields, param", [
    ({"prompt": ""}, "prompt"), ({"prompt": [10**9]}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": None}, "prompt"), ({"logprobs": 6}, "logprobs"), ({"echo": True}, "echo")])
def test_every_malformed_completion_request_is_a_400(server, fields, param):
    status, _, body = request(server, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 3, **fields})
    assert (status, body["error"]["param"]) == (400, param)
    assert_openai_error(body)


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'{"messages": [], "temperature": NaN}',
                                 b"[" * 100_000, b"\xff\xfe", b""])
def test_a_body_that_is_not_a_json_object_is_a_400(server, raw):
    status, _, body = request(server, "POST", CHAT, raw=raw)
    assert status == 400
    assert_openai_error(body)


def test_paths_methods_and_sizes(server):
    status, _, body = request(server, "GET", "/v1/nothing")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, headers, body = request(server, "GET", CHAT)
    assert (status, headers["Allow"]) == (405, "POST")
    assert_openai_error(body)
    status, body = send_headers_only(server, "POST", CHAT, {"Content-Length": str(server.max_body_bytes + 1)})
    assert status == 413 and body["error"]["code"] == "body_too_large"
    assert request(server, "GET", "/health")[:3:2] == (200, {"status": "ok", "requests": 0})


def test_one_log_line_per_request_with_its_tokens(server):
    time.sleep(0.1)                           # the line of the previous request comes just after its answer
    before = len(server.lines)
    status, _, body = request(server, "POST", CHAT, HELLO)
    assert status == 200
    prompt, completion = body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]
    assert wait_until(lambda: len(server.lines) > before)
    time.sleep(0.1)
    assert len(server.lines) == before + 1
    assert re.fullmatch(rf"127\.0\.0\.1 POST /v1/chat/completions 200 prompt={prompt} completion={completion} "
                        r"\d+\.\d{3}s", server.lines[-1])


def test_an_api_key_is_required_when_set_and_compared_whole(model):
    import openai
    with running(model, api_key="s3cret") as server:
        for headers in ({}, {"Authorization": "Bearer s3cre"}, {"Authorization": "s3cret"}):
            status, response_headers, body = request(server, "POST", CHAT, HELLO, headers=headers)
            assert (status, response_headers["WWW-Authenticate"]) == (401, "Bearer")
            assert_openai_error(body)
        assert request(server, "POST", CHAT, HELLO, headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert request(server, "GET", "/health")[0] == 200                  # liveness probes need no key
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            client.models.list()


def test_cors_is_off_unless_an_origin_is_given(server, model):
    status, headers, _ = request(server, "OPTIONS", CHAT)
    assert status == 405 and "Access-Control-Allow-Origin" not in headers
    with running(model, cors_origin="https://example.org") as cors:
        status, headers, _ = request(cors, "OPTIONS", CHAT)
        assert status == 204 and headers["Access-Control-Allow-Origin"] == "https://example.org"
        assert "Authorization" in headers["Access-Control-Allow-Headers"]
        assert request(cors, "POST", CHAT, HELLO)[1]["Access-Control-Allow-Origin"] == "https://example.org"


def never_says_eos(server):
    """The demo model may sample eos early; these tests need a reply that runs until it is stopped."""
    engine = server.loop.engine
    submit = engine.submit
    engine.submit = lambda *args, **kwargs: submit(*args, **{**kwargs, "stop_ids": []})


def test_the_stream_on_the_wire(server):
    connection, response = open_stream(server, CHAT, {**HELLO, "stream_options": {"include_usage": True}})
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    stream = events(response)
    connection.close()
    assert all(e.startswith("data: ") for e in stream) and stream[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in stream[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1


def test_keep_alive_comments_during_a_long_prefill(model):
    with running(model, keepalive_seconds=0.02, prefill_chunk=4) as server:
        slow_engine(server, 0.03)
        long_prompt = {**HELLO, "messages": [{"role": "user", "content": "many words " * 20}], "max_tokens": 2}
        connection, response = open_stream(server, CHAT, long_prompt)
        stream = events(response)
        connection.close()
    first_content = next(i for i, e in enumerate(stream) if '"content": "' in e and '"role"' not in e)
    assert ": keep-alive" in stream[1:first_content]
    assert stream[-1] == "data: [DONE]"


def test_a_client_that_leaves_mid_stream_frees_its_sequence(model):
    with running(model) as server:
        slow_engine(server, 0.01)
        never_says_eos(server)
        connection, response = open_stream(server, CHAT, {**HELLO, "max_tokens": 400})
        read_event(response), read_event(response)                # the role chunk and the first text
        hang_up(connection, response)
        seq = server.loop.engine.active[0] if server.loop.engine.active else None
        assert wait_until(lambda: not server.loop.engine.busy and server.loop.busy_requests() == 0, 3.0)
        assert seq.finish_reason == "cancelled" and len(seq.generated) < 400
        assert wait_until(lambda: "gone" in server.lines[-1] if server.lines else False)


def test_a_stalled_client_holds_back_no_one(model):
    with running(model, io_timeout=0.3) as server:
        never_says_eos(server)
        unread, unread_response = open_stream(server, CHAT, {**HELLO, "max_tokens": 400})      # never read
        silent = socket.create_connection(("127.0.0.1", server.port))
        silent.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")  # body never sent
        status, _, body = request(server, "POST", CHAT, HELLO)
        assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")
        assert silent.recv(1) == b""                     # the server gave up on the silent one after io_timeout
        silent.close()
        hang_up(unread, unread_response)


def test_a_malformed_request_line_gets_a_json_error(server):
    with socket.create_connection(("127.0.0.1", server.port)) as connection:
        connection.sendall(b"GET /health HTTP/1.1 extra\r\n\r\n")
        reply = connection.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.1 400") and b'"invalid_request_error"' in reply and b"<html" not in reply


def test_a_full_queue_is_a_429_with_retry_after(model):
    with running(model, max_batch=1, max_waiting=0) as server:
        slow_engine(server, 0.01)
        never_says_eos(server)
        connection, response = open_stream(server, CHAT, {**HELLO, "max_tokens": 400})
        read_event(response)
        status, headers, body = request(server, "POST", CHAT, HELLO)
        assert status == 429 and headers["Retry-After"] == "1" and body["error"]["code"] == "queue_full"
        assert_openai_error(body, "rate_limit_error")
        hang_up(connection, response)
        assert wait_until(lambda: server.loop.busy_requests() == 0, 3.0)
        assert request(server, "POST", CHAT, HELLO)[0] == 200


def test_an_engine_failure_fails_its_requests_and_the_server_goes_on(model):
    with running(model) as server:
        engine, step = server.loop.engine, server.loop.engine.step

        def failing_step():
            engine.step = step
            raise FloatingPointError("non-finite logits")
        engine.step = failing_step
        status, _, body = request(server, "POST", CHAT, HELLO)
        assert status == 500 and "non-finite logits" in body["error"]["message"]
        assert_openai_error(body, "server_error")
        assert request(server, "POST", CHAT, HELLO)[0] == 200


def test_shutdown_cancels_in_flight_requests_cleanly(model):
    with running(model) as server:
        slow_engine(server, 0.01)
        never_says_eos(server)
        connection, response = open_stream(server, CHAT, {**HELLO, "max_tokens": 400})
        read_event(response)
        server.close(grace=0.0)
        rest = events(response)
        connection.close()
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][len("data: "):])["error"]["code"] == "shutting_down"
    assert not server.loop.thread.is_alive()


def run_cli(*args):
    return subprocess.Popen([sys.executable, "-m", "bcnp.serve", *map(str, args)], cwd=ROOT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE)


def test_the_command_line_serves_logs_and_exits_0_on_sigterm(demo_dir):
    process = run_cli("--model", demo_dir, "--port", "0", "--api-key", "k")
    try:
        banner = process.stderr.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/v1 \(API key required\)", banner).group(1))
        import openai
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        reply = client.chat.completions.create(model="x", messages=HELLO["messages"], max_tokens=3)
        assert reply.model == "demo" and reply.usage.completion_tokens <= 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        log = process.stderr.read()
    finally:
        process.kill()
    assert re.search(r"POST /v1/chat/completions 200 prompt=\d+ completion=\d+", log)
    assert "Traceback" not in log


@pytest.mark.parametrize("args, message", [(["--demo", "--port", "70000"], "--port must be in [0, 65535], got 70000"),
                                           (["--demo", "--timeout", "nan"], "--timeout must be > 0, got nan"),
                                           (["--model", "/no/such/dir"], "no such directory"),
                                           ([], "give either --model DIR or --demo")])
def test_command_line_mistakes_are_one_error_line(args, message):
    process = run_cli(*args)
    _, err = process.communicate(timeout=60)
    assert process.returncode != 0 and err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts a process's threads in Linux's /proc")
def test_a_server_lets_the_loading_threads_kernel_threads_go(demo_dir):
    """The engine runs on the loop's thread; the OpenMP team the loading thread kept would leave more threads than
    cores, and every parallel loop of a step would then wait for its threads to wake (bcnp._quant.release_threads;
    serve_bench's decode step of 8: 52 ms against 36)."""
    code = f"""import os, time
tasks = lambda: set(os.listdir('/proc/self/task'))
from bcnp import Model
from serve_helpers import running
before = tasks()
model = Model.from_pretrained({str(demo_dir)!r}).quantize(4)
team = tasks() - before
with running(model):
    for _ in range(500):
        if not team & tasks():
            break
        time.sleep(0.01)
    print(len(team), not team & tasks())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT / "tests",
                       env={**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "True"]
