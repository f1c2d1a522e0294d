"""OpenAI's request and response bodies: every field checked into a `GenerationRequest`, or one `ApiError`.

A request names what it wants in OpenAI's terms; bcnp's engine takes token ids and sampling settings. Unset
fields come from the checkpoint's generation_config.json; `temperature: 0` means greedy, as in OpenAI's API.
Fields bcnp cannot honour (`logit_bias`, `tools`, presence/frequency penalties) are refused rather than ignored.
"""
import json
import math
import secrets
from dataclasses import dataclass, field

from ..errors import one_line
from ..chat import PromptTooLong, content_tokens

MAX_N = 16                  # choices per request; each one is a sequence in the engine
MAX_STOPS = 4               # as OpenAI's API
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20       # the engine's limit (chat); completions allow 5, as OpenAI's API
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 411: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}
REFUSED_FIELDS = {"logit_bias": "logit_bias is not supported", "tools": "tool calls are not supported",
                  "functions": "function calls are not supported",
                  "presence_penalty": "presence_penalty is not supported; use repetition_penalty",
                  "frequency_penalty": "frequency_penalty is not supported; use repetition_penalty"}


class ApiError(Exception):
    """An HTTP error with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.param, self.code, self.headers = status, param, code, dict(headers or {})

    def body(self):
        return {"error": {"message": one_line(self), "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad(param, message, code=None):
    return ApiError(400, message, param=param, code=code)


@dataclass
class GenerationRequest:
    """What the engine runs for one request: the prompt's ids, n choices, their settings, how to answer."""
    kind: str                       # "chat" or "completion"
    prompt: list
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    stops: tuple = ()
    top_logprobs: int = None        # None: no log-probabilities
    settings: dict = field(default_factory=dict)     # Engine.submit keywords (without seed)
    seed: int = None                # choice i gets seed + i

    def seeds(self):
        return [None if self.seed is None else self.seed + i for i in range(self.n)]


# --- the body --------------------------------------------------------------------------------------------------------

def _no_constants(name):
    raise ValueError(f"{name} is not JSON")


def parse_body(data):
    """The JSON object of a request body (bytes)."""
    try:
        body = json.loads(data.decode("utf-8"), parse_constant=_no_constants)
    except UnicodeDecodeError as e:
        raise bad(None, f"the request body is not UTF-8 (byte {e.start})") from None
    except RecursionError:
        raise bad(None, "the request body is nested too deeply") from None
    except ValueError as e:
        raise bad(None, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise bad(None, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_text(v):
    if not isinstance(v, str):
        return False
    try:
        v.encode("utf-8")                  # a lone surrogate ("\ud800" in JSON) is no text to tokenize
    except UnicodeEncodeError:
        return False
    return True


def get(body, name, check, expected):
    """body[name] when it is set (not null) and passes `check`; None when unset; else a 400 naming the field."""
    value = body.get(name)
    if value is not None and not check(value):
        raise bad(name, f"'{name}' must be {expected}, got {json.dumps(value, ensure_ascii=True)[:80]}")
    return value


def refuse_unsupported(body):
    for name, message in REFUSED_FIELDS.items():
        value = body.get(name)
        if value not in (None, 0, 0.0, {}, []):
            raise bad(name, message)


# --- fields shared by both endpoints -----------------------------------------------------------------------------------

def sampling_settings(body):
    """Engine.submit's sampling keywords; None where the request leaves it to generation_config.json."""
    temperature = get(body, "temperature", lambda v: is_number(v) and v >= 0, "a number >= 0")
    top_p = get(body, "top_p", lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]")
    top_k = get(body, "top_k", lambda v: is_int(v) and v >= 0, "an integer >= 0 (0 = off)")
    penalty = get(body, "repetition_penalty", lambda v: is_number(v) and v > 0, "a number > 0 (1.0 = off)")
    do_sample = None if temperature is None else temperature > 0
    return dict(temperature=temperature or None, top_p=top_p, top_k=top_k, repetition_penalty=penalty,
                do_sample=do_sample)


def requested_max_tokens(body, context, names):
    for name in names:                     # the first one set wins (max_completion_tokens replaces max_tokens)
        value = get(body, name, lambda v: is_int(v) and 1 <= v < context,
                    f"an integer in [1, {context - 1}] (the context holds {context} tokens)")
        if value is not None:
            return value
    return None


def reply_budget(max_tokens, model, prompt):
    """max_new_tokens for the engine: the request's, which must fit after the prompt, else what is left of
    generation_config's."""
    context = model.config.max_position
    if len(prompt) >= context:
        raise bad("messages", f"the prompt is {len(prompt)} tokens; the context holds {context} tokens, prompt and "
                  "reply together", code="context_length_exceeded")
    if max_tokens is None:
        return min(model.generation_config.max_new_tokens, context - len(prompt))
    if len(prompt) + max_tokens > context:
        raise bad("max_tokens", f"the prompt is {len(prompt)} tokens and max_tokens is {max_tokens}; the context "
                  f"holds {context} tokens", code="context_length_exceeded")
    return max_tokens


def stop_strings(body):
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOPS
            or not all(is_text(s) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise bad("stop", f"'stop' must be a non-empty string or a list of 1 to {MAX_STOPS} of them "
                  f"(at most {MAX_STOP_CHARS} characters each)")
    return tuple(stops)


def common_fields(body, kind, prompt, max_tokens, model, top_logprobs):
    refuse_unsupported(body)
    get(body, "model", is_text, "a string")
    n = get(body, "n", lambda v: is_int(v) and 1 <= v <= MAX_N, f"an integer in [1, {MAX_N}]") or 1
    stream = get(body, "stream", lambda v: isinstance(v, bool), "true or false") or False
    options = get(body, "stream_options", lambda v: isinstance(v, dict), "an object")
    if options is not None and not stream:
        raise bad("stream_options", "'stream_options' is only allowed with 'stream': true")
    include_usage = get(options or {}, "include_usage", lambda v: isinstance(v, bool), "true or false") or False
    seed = get(body, "seed", lambda v: is_int(v) and 0 <= v < 2**63, "an integer in [0, 2**63)")
    settings = sampling_settings(body)
    settings["max_new_tokens"] = reply_budget(max_tokens, model, prompt)
    return GenerationRequest(kind, prompt, n, stream, include_usage, stop_strings(body), top_logprobs, settings, seed)


# --- the two endpoints ---------------------------------------------------------------------------------------------------

CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def message_content(content, i):
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if is_text(content):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and is_text(p.get("text"))
                                         for p in content):
        return "".join(p["text"] for p in content)
    raise bad("messages", f"messages[{i}].content must be a string or a list of text parts")


def chat_messages(body):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad("messages", f"messages[{i}] must be an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise bad("messages", f"messages[{i}].role must be one of system, user, assistant; got "
                      f"{json.dumps(role, ensure_ascii=True)[:40]}")
        if CHAT_ROLES[role] == "system" and i != 0:
            raise bad("messages", f"messages[{i}]: a system message may only come first")
        out.append({"role": CHAT_ROLES[role], "content": message_content(message.get("content"), i)})
    return out


def refuse_role_tokens(model, messages):
    """Content that encodes to a role token would forge a turn (bcnp.chat.content_tokens): a 400 naming it."""
    g = model.generation_config
    for i, message in enumerate(messages):
        try:
            content_tokens(model.tokenizer, message["content"], (g.user_token_id, g.assistant_token_id))
        except ValueError as e:
            raise bad("messages", f"messages[{i}].content: {e}") from None


def parse_chat(body, model):
    """POST /v1/chat/completions: messages through Baichuan's chat template (role tokens joined as ids)."""
    context = model.config.max_position
    max_tokens = requested_max_tokens(body, context, ("max_completion_tokens", "max_tokens"))
    messages = chat_messages(body)
    refuse_role_tokens(model, messages)
    logprobs = get(body, "logprobs", lambda v: isinstance(v, bool), "true or false")
    top = get(body, "top_logprobs", lambda v: is_int(v) and 0 <= v <= MAX_TOP_LOGPROBS,
              f"an integer in [0, {MAX_TOP_LOGPROBS}]")
    if top is not None and not logprobs:
        raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    try:
        prompt, _ = model.chat_prompt(messages, max_tokens)
    except PromptTooLong as e:
        raise bad("messages", str(e), code="context_length_exceeded") from None
    return common_fields(body, "chat", prompt, max_tokens, model, (top or 0) if logprobs else None)


def parse_completion(body, model):
    """POST /v1/completions: a prompt string (encoded as it is: no bos, as Baichuan's tokenizer) or token ids."""
    context = model.config.max_position
    max_tokens = requested_max_tokens(body, context, ("max_tokens",))
    prompt = body.get("prompt")
    if is_text(prompt):
        ids = model.tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        ids = prompt
        if not all(0 <= t < model.config.vocab_size for t in ids):
            raise bad("prompt", f"token ids in 'prompt' must be in [0, {model.config.vocab_size})")
    else:
        raise bad("prompt", "'prompt' must be a string or a list of token ids (one prompt per request)")
    if not ids:
        raise bad("prompt", "'prompt' is empty: there is nothing to continue")
    top = get(body, "logprobs", lambda v: is_int(v) and 0 <= v <= 5, "an integer in [0, 5]")
    if get(body, "echo", lambda v: isinstance(v, bool), "true or false"):
        raise bad("echo", "echo is not supported")
    return common_fields(body, "completion", list(ids), max_tokens, model, top)


# --- responses -------------------------------------------------------------------------------------------------------

def new_id(kind):
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens, completion_tokens, cached_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def chat_logprobs(entries):
    """OpenAI's chat format: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    def one(token, logprob):
        return {"token": token.text, "logprob": logprob, "bytes": list(token.data)}
    return {"content": [{**one(t, lp), "top_logprobs": [one(tt, tlp) for tt, tlp in top]} for t, lp, top in entries]}


def completion_logprobs(entries):
    """The completions format: parallel lists, top_logprobs as {token: logprob} per position."""
    return {"tokens": [t.text for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{tt.text: tlp for tt, tlp in top} for _, _, top in entries]}


def format_logprobs(kind, entries):
    return chat_logprobs(entries) if kind == "chat" else completion_logprobs(entries)


def completion_body(request, rid, created, model_name, choices, prompt_usage):
    """The whole (non-streamed) response; `choices` are (text, finish_reason, logprob entries or None)."""
    out = []
    for i, (text, reason, entries) in enumerate(choices):
        logprobs = None if entries is None else format_logprobs(request.kind, entries)
        if request.kind == "chat":
            out.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                        "finish_reason": reason})
        else:
            out.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason})
    return {"id": rid, "object": "chat.completion" if request.kind == "chat" else "text_completion",
            "created": created, "model": model_name, "choices": out, "usage": prompt_usage}


def chunk_body(request, rid, created, model_name, choices, usage_value=None):
    """One streamed event; `choices` are (index, delta or text, finish_reason, logprob entries or None)."""
    out = []
    for index, content, reason, entries in choices:
        logprobs = None if entries is None else format_logprobs(request.kind, entries)
        key = "delta" if request.kind == "chat" else "text"
        out.append({"index": index, key: content, "logprobs": logprobs, "finish_reason": reason})
    body = {"id": rid, "object": "chat.completion.chunk" if request.kind == "chat" else "text_completion",
            "created": created, "model": model_name, "choices": out}
    if request.include_usage:
        body["usage"] = usage_value
    return body
