"""Helpers of the server tests: the demo model, a server on a free port in this process, raw HTTP and SSE."""
import contextlib
import http.client
import json
import threading
import time

from bcnp.server import Server


@contextlib.contextmanager
def running(model, **options):
    """A Server on 127.0.0.1:<free port> in a thread; its log lines collect in `server.lines`."""
    lines = []
    server = Server(("127.0.0.1", 0), model, model_name="demo", log=lines.append, **options)
    server.lines = lines
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.close()
        thread.join(5)


def slow_engine(server, seconds):
    """Every engine step takes at least `seconds`: time to act while a request is being answered."""
    engine = server.loop.engine
    step = engine.step

    def slow_step():
        time.sleep(seconds)
        return step()
    engine.step = slow_step


def request(server, method, path, body=None, headers=None, raw=None):
    """(status, headers, parsed JSON body or the raw bytes) of one request on a fresh connection."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    try:
        payload = json.loads(payload)
    except ValueError:
        pass
    return response.status, dict(response.getheaders()), payload


def open_stream(server, path, body, headers=None):
    """The response of a streamed request, its body not yet read."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("POST", path, body=json.dumps({**body, "stream": True}).encode(),
                       headers={"Content-Type": "application/json", **(headers or {})})
    return connection, connection.getresponse()


def hang_up(connection, response):
    """Close the client's end for real (the response holds its own reference to the socket)."""
    response.close()
    connection.close()


def send_headers_only(server, method, path, headers):
    """(status, parsed body) of a request whose body is announced but never sent."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.putrequest(method, path)
    for name, value in headers.items():
        connection.putheader(name, value)
    connection.endheaders()
    response = connection.getresponse()
    body = json.loads(response.read())
    hang_up(connection, response)
    return response.status, body


def read_event(response):
    """The next SSE event of a response: its lines up to the blank line, joined."""
    lines = []
    while True:
        line = response.fp.readline()
        if not line:
            return None
        if line == b"\n":
            return b"".join(lines).decode("utf-8").rstrip("\n")
        lines.append(line)


def events(response):
    """Every event of a stream, to its end."""
    out = []
    while (event := read_event(response)) is not None:
        out.append(event)
    return out
