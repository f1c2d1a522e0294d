"""bcnp's OpenAI-compatible HTTP server: `python -m bcnp.serve` (serve.py) runs it; docs/server.md describes it.

    protocol.py   request bodies checked into a GenerationRequest; response and chunk bodies; ApiError
    text.py       tokens to streamed text: whole characters, stop strings held back and cut
    loop.py       the engine's own thread and the per-request queues to the handlers
    http.py       Server (ThreadingHTTPServer) and its Handler: routing, auth, limits, SSE, logging
"""
from .http import Server
