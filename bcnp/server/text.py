"""From a sequence's tokens to the text a client sees: streamed whole characters, cut before the first stop string.

A stop string is matched on the decoded text, not on tokens: "\\nUser:" may arrive as any split of pieces, and a
piece may hold the end of the reply and the start of the stop string at once. So text that could be the start of
a stop string is held back until the next piece shows whether it is one; the stop string itself is never sent.
"""
from collections import namedtuple

from ..tokenizer import StreamDecoder

TokenText = namedtuple("TokenText", "text data")       # a token as log-probabilities show it: str, UTF-8 bytes


class StopMatcher:
    """`put(text) -> str` what is safe to send now; `stopped` once a stop string appeared (nothing is sent from it
    on); `end() -> str` the held-back rest. Everything sent, concatenated, is the whole text cut before the stop
    string that is complete first (of two ending at the same character, the longer)."""

    def __init__(self, stops=()):
        self.stops = tuple(stops)
        self.held = ""
        self.stopped = False

    def put(self, text):
        if self.stopped:
            return ""
        text = self.held + text
        found = [(i + len(s), i) for i, s in ((text.find(s), s) for s in self.stops) if i >= 0]
        if found:
            # the first stop string to be complete (generation stops there), the longest of those ending there:
            # the same cut however the text was split into pieces
            self.stopped, self.held = True, ""
            return text[:min(found)[1]]
        keep = self._longest_stop_prefix_ending(text)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def _longest_stop_prefix_ending(self, text):
        """The length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def end(self):
        text, self.held = ("" if self.stopped else self.held), ""
        return text


class ChoiceText:
    """One choice's text as its tokens arrive: whole UTF-8 characters (`StreamDecoder`), then stop strings."""

    def __init__(self, tokenizer, stops=()):
        self.decoder = StreamDecoder(tokenizer)
        self.matcher = StopMatcher(stops)

    @property
    def stopped(self):
        return self.matcher.stopped

    def put(self, token):
        return self.matcher.put(self.decoder.put(token))

    def end(self):
        text = self.matcher.put(self.decoder.end())
        return text + self.matcher.end()


def token_bytes(tokenizer, token):
    """The UTF-8 bytes a token stands for: one byte for a byte-fallback piece <0xNN>, '▁' read as a space."""
    piece = tokenizer.id_to_piece(token)
    if tokenizer.is_byte(token):
        return bytes([int(piece[3:5], 16)])
    if tokenizer.is_control(token):
        return b""
    return piece.replace("\u2581", " ").encode("utf-8")


def token_text(tokenizer, token):
    """The token as log-probabilities show it; a piece that is part of a character is shown as its bytes
    (`bytes:\\xe4`, as OpenAI's API shows them)."""
    data = token_bytes(tokenizer, token)
    try:
        return TokenText(data.decode("utf-8"), data)
    except UnicodeDecodeError:
        return TokenText("bytes:" + "".join(f"\\x{b:02x}" for b in data), data)
