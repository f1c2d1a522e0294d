"""The HTTP side: `Server` (the standard library's ThreadingHTTPServer) and its request `Handler`.

One thread per connection parses, checks and answers; the model runs on the engine loop's thread (loop.py).
A handler blocks only on its own socket and its own job's queue: a stalled client times out its own thread
(`io_timeout` on the socket, reads and writes alike) and its sequences are cancelled. Every error a client can
cause is an OpenAI-style JSON error; anything unexpected is logged here as one line and answered with a 500,
never a traceback.
"""
import hmac
import json
import queue
import select
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from ..engine import PREFILL_CHUNK, Engine
from ..errors import one_line
from .loop import EngineLoop, Job
from .protocol import (ApiError, chunk_body, completion_body, new_id, parse_body, parse_chat, parse_completion,
                       usage)
from .text import token_text

ROUTES = {"/health": {"GET": "health"}, "/v1/models": {"GET": "models"},
          "/v1/chat/completions": {"POST": "chat"}, "/v1/completions": {"POST": "completion"}}


class ClientGone(Exception):
    pass


class Server(ThreadingHTTPServer):
    """The OpenAI-compatible server over one model. `serve_forever()` to run, `close()` to stop cleanly."""

    daemon_threads = True                 # an idle keep-alive connection must not hold up the exit
    allow_reuse_address = True

    def __init__(self, address, model, *, model_name="bcnp", api_key=None, cors_origin=None,
                 max_body_bytes=2**20, io_timeout=30.0, keepalive_seconds=5.0, max_batch=8, max_waiting=16,
                 prefill_chunk=PREFILL_CHUNK, log=None):
        if model.tokenizer is None:
            raise ValueError(f"{model.path or 'the model'}: no tokenizer.model (the server needs the tokenizer)")
        super().__init__(address, Handler)
        self.model, self.model_name, self.api_key, self.cors_origin = model, model_name, api_key, cors_origin
        self.max_body_bytes, self.io_timeout, self.keepalive_seconds = max_body_bytes, io_timeout, keepalive_seconds
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.created = int(time.time())
        self.loop = EngineLoop(Engine(model, max_batch=max_batch, prefill_chunk=prefill_chunk), model.tokenizer,
                               max_waiting, self.log).start()
        self.in_flight = 0                # generation requests being answered (guarded by `idle`)
        self.idle = threading.Condition()

    @property
    def port(self):
        return self.server_address[1]

    def close(self, grace=0.0):
        """Stop accepting; give in-flight requests `grace` seconds to finish, then cancel the rest (their
        clients get a 503 or a final error event); wait for their handlers to answer."""
        self.shutdown()                   # serve_forever returns: no new connections
        self.loop.stop_accepting()        # requests on open connections get a 503
        self._wait_idle(grace)
        self.loop.close()
        self._wait_idle(5.0)
        self.server_close()

    def _wait_idle(self, seconds):
        deadline = time.monotonic() + seconds
        with self.idle:
            while self.in_flight and time.monotonic() < deadline:
                self.idle.wait(max(0.0, deadline - time.monotonic()))

    def handle_error(self, request, client_address):       # socketserver would print a traceback
        self.log(f"{client_address[0]} connection error: {one_line(sys.exc_info()[1])}")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"         # keep-alive for JSON answers; streams close their connection
    default_request_version = "HTTP/1.1"  # so that the answer to an unparsable request line has a status line
    server_version = "bcnp"
    sys_version = ""

    def setup(self):
        self.timeout = self.server.io_timeout      # socket timeout for every read and write on this connection
        super().setup()

    # --- dispatch ---

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_OPTIONS(self):
        self._dispatch("OPTIONS")

    def _dispatch(self, method):
        self.started, self.status, self.tokens = time.perf_counter(), None, None
        self.headers_sent, self.body_read = False, False
        path = urlsplit(self.path).path
        try:
            route = ROUTES.get(path.rstrip("/") or "/")
            if route is None:
                raise ApiError(404, f"no such endpoint: {method} {path}", code="not_found")
            if method == "OPTIONS" and self.server.cors_origin:
                return self._preflight(route)
            if method not in route:
                raise ApiError(405, f"{path} takes {', '.join(route)}, not {method}", code="method_not_allowed",
                               headers={"Allow": ", ".join(route)})
            if path != "/health":
                self._check_key()
            getattr(self, "_" + route[method])()
        except ApiError as e:
            self._send_error(e)
        except ClientGone:
            self.status, self.close_connection = self.status or "gone", True
        except (ConnectionError, TimeoutError, socket.timeout) as e:
            self.status, self.close_connection = f"{self.status or ''} gone ({type(e).__name__})".strip(), True
        except Exception as e:            # a bug: one line in the log, a plain 500 to the client
            self.server.log(f"internal error on {method} {path}: {type(e).__name__}: {one_line(e)}")
            self._send_error(ApiError(500, "internal server error", code="internal_error"))
        finally:
            self._log_request(method, path)

    def _check_key(self):
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), f"Bearer {key}".encode("utf-8")):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def _preflight(self, route):
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", ", ".join([*route, "OPTIONS"]))
        self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
        self.send_header("Access-Control-Max-Age", "600")
        self._end_headers(204)

    # --- reading and writing ---

    def _read_body(self):
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "a Content-Length header is required", code="length_required")
        if not length.isdigit():
            raise ApiError(400, f"Content-Length is not a number: {length!r:.40}")
        if int(length) > self.server.max_body_bytes:
            raise ApiError(413, f"the request body is {int(length)} bytes; the limit is {self.server.max_body_bytes}",
                           code="body_too_large")
        data = self.rfile.read(int(length))
        if len(data) != int(length):
            raise ClientGone()
        self.body_read = True
        return data

    def _end_headers(self, status):
        if self.server.cors_origin:
            self.send_header("Access-Control-Allow-Origin", self.server.cors_origin)
        self.end_headers()
        self.status, self.headers_sent = status, True

    def _send_json(self, status, obj, headers=None):
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self._end_headers(status)
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_error(self, error):
        if self.headers_sent:             # mid-stream: the stream's own error event was the answer
            self.close_connection = True
            return
        if not self.body_read and self.headers.get("Content-Length", "0") != "0":
            self.close_connection = True  # the unread body would be taken for the next request
        try:
            self._send_json(error.status, error.body(), error.headers)
        except (ConnectionError, TimeoutError, socket.timeout):
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """The base class's errors (a malformed request line, an oversized header) as JSON too, not HTML."""
        self.close_connection = True
        self.headers_sent = getattr(self, "headers_sent", False)
        self._send_json(code, ApiError(code, message or self.responses.get(code, ("error",))[0]).body())

    def log_request(self, code="-", size="-"):    # BaseHTTPRequestHandler's own line: replaced by _log_request
        pass

    def log_message(self, format, *args):
        self.server.log(f"{self.client_address[0]} {one_line(format % args)}")

    def _log_request(self, method, path):
        tokens = "" if self.tokens is None else f" prompt={self.tokens[0]} completion={self.tokens[1]}"
        self.server.log(f"{self.client_address[0]} {method} {one_line(path, 200)} {self.status}{tokens} "
                        f"{time.perf_counter() - self.started:.3f}s")

    def _client_gone(self):
        """True once the client closed its end (seen without reading what it may have sent next)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # --- the endpoints ---

    def _health(self):
        self._send_json(200, {"status": "ok", "requests": self.server.loop.busy_requests()})

    def _models(self):
        self._send_json(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                          "created": self.server.created, "owned_by": "bcnp"}]})

    def _chat(self):
        self._generate(parse_chat)

    def _completion(self):
        self._generate(parse_completion)

    def _generate(self, parse):
        request = parse(parse_body(self._read_body()), self.server.model)
        job = Job(request)
        self.server.loop.submit(job)
        with self.server.idle:
            self.server.in_flight += 1
        try:
            answer = Answer(self, job)
            self._stream(answer) if request.stream else self._respond(answer)
        finally:
            self.server.loop.cancel(job)  # no-op when it finished; frees the sequences of a client that left
            with self.server.idle:
                self.server.in_flight -= 1
                self.server.idle.notify_all()

    def _respond(self, answer):
        for delta in answer.deltas():
            if delta is None and self._client_gone():
                raise ClientGone()
        self._send_json(200, answer.whole())

    def _stream(self, answer):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")       # the stream ends with the connection (no chunked coding)
        self.close_connection = True
        self._end_headers(200)
        self._write_event(answer.first_chunk())
        try:
            for delta in answer.deltas():
                if delta is None:                     # nothing new for a while (a long prefill, a queue)
                    if self._client_gone():
                        raise ClientGone()
                    self.wfile.write(b": keep-alive\n\n")
                else:
                    for chunk in answer.chunks(delta):
                        self._write_event(chunk)
        except ApiError as e:                         # failed mid-stream: an error event, then the end
            self._write_event(e.body())
            self.status = f"200+{e.status}"
        else:
            if answer.request.include_usage:
                self._write_event(answer.usage_chunk())
        self.wfile.write(b"data: [DONE]\n\n")

    def _write_event(self, obj):
        self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n")


class Answer:
    """A job's deltas as they arrive, gathered into OpenAI's response or its stream of chunks."""

    def __init__(self, handler, job):
        self.handler, self.job, self.request = handler, job, job.request
        self.id, self.created, self.model_name = new_id(self.request.kind), int(time.time()), handler.server.model_name
        n = self.request.n
        self.texts, self.reasons, self.tokens = [[] for _ in range(n)], [None] * n, [0] * n
        self.logprobs = [None if self.request.top_logprobs is None else [] for _ in range(n)]

    def deltas(self):
        """Each Delta, updating the totals; None after `keepalive_seconds` without one; an ApiError raised."""
        while not all(self.reasons):
            try:
                event = self.job.events.get(timeout=self.handler.server.keepalive_seconds)
            except queue.Empty:
                yield None
                continue
            if isinstance(event, ApiError):
                raise event
            i = event.index
            self.texts[i].append(event.text)
            self.reasons[i], self.tokens[i] = event.finish_reason, event.tokens
            if event.logprobs is not None:
                self.logprobs[i] += event.logprobs
            self.handler.tokens = (len(self.request.prompt), sum(self.tokens))
            yield event

    def _entries(self, raw):
        if raw is None:
            return None
        tokenizer = self.handler.server.model.tokenizer
        return [(token_text(tokenizer, t), lp, [(token_text(tokenizer, tt), tlp) for tt, tlp in top])
                for t, lp, top in raw]

    def _usage(self):
        return usage(len(self.request.prompt), sum(self.tokens), self.job.cached_tokens)

    def whole(self):
        choices = [("".join(t), r, self._entries(lp)) for t, r, lp in zip(self.texts, self.reasons, self.logprobs)]
        return completion_body(self.request, self.id, self.created, self.model_name, choices, self._usage())

    def _chunk(self, choices, usage_value=None):
        return chunk_body(self.request, self.id, self.created, self.model_name, choices, usage_value)

    def first_chunk(self):
        """Chat: {"role": "assistant"} for every choice; completions: an empty text (headers and all, at once)."""
        first = {"role": "assistant", "content": ""} if self.request.kind == "chat" else ""
        return self._chunk([(i, first, None, None) for i in range(self.request.n)])

    def chunks(self, delta):
        """The content chunk (text, log-probabilities) of a delta, then its finish chunk when it has one."""
        chat = self.request.kind == "chat"
        out = []
        if delta.text or delta.logprobs:
            content = {"content": delta.text} if chat else delta.text
            out.append(self._chunk([(delta.index, content, None, self._entries(delta.logprobs))]))
        if delta.finish_reason:
            out.append(self._chunk([(delta.index, {} if chat else "", delta.finish_reason, None)]))
        return out

    def usage_chunk(self):
        body = self._chunk([], self._usage())
        return body
