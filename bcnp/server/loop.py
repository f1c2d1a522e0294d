"""The engine loop: the one thread that runs the `Engine`, and the queues between it and the HTTP handlers.

The Engine is not thread-safe, so every call to it happens here. A handler thread hands in a `Job` and reads
`Delta`s from the job's own queue; the loop never waits for a handler, so a slow or stalled client cannot hold
back the others (its deltas wait in its queue). Between two engine steps the loop takes in new jobs and
cancellations (a client that went away frees its sequences at the next step), then turns the new tokens of every
sequence into text: whole UTF-8 characters, cut before a stop string -- and a sequence that reached a stop
string is cancelled there, before the next step spends a token on it.
"""
import queue
import sys
import threading
from collections import namedtuple

from ..errors import one_line
from ..quant import _quant
from .protocol import ApiError
from .text import ChoiceText

# What a handler reads: new text of choice `index` (maybe ''), its tokens' log-probabilities
# [(token, logprob, [(token, logprob)])] or None, finish_reason once it is done, and its tokens so far.
Delta = namedtuple("Delta", "index text logprobs finish_reason tokens")


class Job:
    """One request inside the engine loop: its `GenerationRequest`, one engine sequence per choice, its queue."""

    def __init__(self, request):
        self.request = request
        self.events = queue.SimpleQueue()       # Delta or ApiError, read by the handler
        self.sequences, self.texts, self.sent, self.reasons = [], [], [], []
        self.cached_tokens = 0                  # prompt tokens the engine took from a cached prefix
        self.closed = False                     # left the loop (finished, cancelled or failed)

    @property
    def finished(self):
        return bool(self.reasons) and all(r is not None for r in self.reasons)


class EngineLoop:
    """Runs `engine` on its own thread. `submit(job)` from any thread: 429 past `capacity` requests (running and
    waiting), 503 once closing; `cancel(job)` when its client is gone; `close()` cancels what is left."""

    def __init__(self, engine, tokenizer, max_waiting=16, log=None):
        self.engine, self.tokenizer = engine, tokenizer
        self.capacity = engine.max_batch + max_waiting
        self.inbox = queue.SimpleQueue()
        self.jobs = []                          # the loop thread's own list
        self.outstanding = 0                    # submitted, not finished (guarded by `lock`)
        self.lock = threading.Lock()
        self.accepting = True
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.thread = threading.Thread(target=self._run, name="bcnp-engine", daemon=True)

    def start(self):
        # From here the kernels run on the loop thread. The OpenMP threads the calling thread kept from loading the
        # model would leave libgomp more threads than cores, and it then stops spinning between parallel loops:
        # every loop of a step waits for its threads to wake (bcnp._quant.release_threads: 52 ms against 36 for
        # serve_bench's decode step of 8).
        _quant.release_threads()
        self.thread.start()
        return self

    # --- from handler threads ---

    def submit(self, job):
        with self.lock:
            if not self.accepting:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if self.outstanding >= self.capacity:
                raise ApiError(429, f"the server is busy ({self.outstanding} requests running or waiting); "
                               "retry shortly", code="queue_full", headers={"Retry-After": "1"})
            self.outstanding += 1
        self.inbox.put(("start", job))

    def cancel(self, job):
        self.inbox.put(("cancel", job))

    def stop_accepting(self):
        with self.lock:
            self.accepting = False

    def busy_requests(self):
        with self.lock:
            return self.outstanding

    def close(self, timeout=10):
        """Refuse new jobs, cancel the running ones (their handlers get a 503), stop the thread."""
        self.stop_accepting()
        self.inbox.put(("close", None))
        self.thread.join(timeout)

    # --- the loop thread ---

    def _run(self):
        while True:
            if not self._take_messages(block=not self.engine.busy):
                return
            if self.engine.busy:
                try:
                    self.engine.step()
                except Exception as e:          # e.g. non-finite logits: those jobs fail, the server stays up
                    self.log(f"engine error: {one_line(e)}")
                    self._fail_all(ApiError(500, f"the engine failed: {e}", code="engine_error"))
            self._deliver()

    def _take_messages(self, block):
        """Take in every waiting message (waiting for one when idle); False once told to close."""
        while True:
            try:
                kind, job = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
            except queue.Empty:
                if block:
                    continue
                return True
            block = False
            if kind == "start":
                self._start(job)
            elif kind == "cancel":
                self._finish(job, cancel=True)
            else:
                self._fail_all(ApiError(503, "the server is shutting down", code="shutting_down"))
                return False

    def _start(self, job):
        request = job.request
        try:
            for seed in request.seeds():
                job.sequences.append(self.engine.submit(request.prompt, seed=seed, top_logprobs=request.top_logprobs,
                                                        **request.settings))
        except ValueError as e:                 # the request was checked; this is a last line of defence
            self._finish(job, cancel=True, error=ApiError(400, str(e)))
            return
        job.texts = [ChoiceText(self.tokenizer, request.stops) for _ in job.sequences]
        job.sent = [0] * len(job.sequences)
        job.reasons = [None] * len(job.sequences)
        self.jobs.append(job)

    def _deliver(self):
        for job in list(self.jobs):
            for i, seq in enumerate(job.sequences):
                if job.reasons[i] is None:
                    self._deliver_choice(job, i, seq)
            if job.finished:
                self._finish(job)

    def _deliver_choice(self, job, i, seq):
        text, entries, choice = [], [] if seq.top_logprobs is not None else None, job.texts[i]
        while job.sent[i] < len(seq.generated) and not choice.stopped:
            n = job.sent[i]
            text.append(choice.put(seq.generated[n]))
            if entries is not None:
                entries.append((seq.generated[n], *seq.logprobs[n]))
            job.sent[i] += 1
        if choice.stopped:
            seq.cancel()                        # a stop string: no more tokens for it
            job.reasons[i] = "stop"
        elif seq.done:
            text.append(choice.end())
            job.reasons[i] = seq.finish_reason
        if i == 0:
            job.cached_tokens = seq.reused
        if text or entries or job.reasons[i]:
            job.events.put(Delta(i, "".join(text), entries, job.reasons[i], job.sent[i]))

    def _finish(self, job, cancel=False, error=None):
        """The job leaves the loop, once: its sequences cancelled if asked, its handler told of an error."""
        if job.closed:
            return
        job.closed = True
        if cancel:
            for seq in job.sequences:
                seq.cancel()
        if job in self.jobs:
            self.jobs.remove(job)
        if error is not None:
            job.events.put(error)
        with self.lock:
            self.outstanding -= 1

    def _fail_all(self, error):
        for job in list(self.jobs):
            self._finish(job, cancel=True, error=error)
