"""Baichuan's tokenizer (SentencePiece) and a streaming detokenizer for printing a reply as it is generated.

Baichuan's tokenizer.model is SentencePiece BPE with byte fallback: a character outside the 64000 pieces is
spelled as its UTF-8 bytes, one `<0xNN>` piece each. Content is encoded with plain `sp.encode(text)`: the
chat template adds role tokens itself, never bos/eos (`add_bos_token` and `add_eos_token` are false).
"""
import os

import sentencepiece as spm

from .config import ConfigError
from .errors import read_json_object

REPLACEMENT_CHARACTER = "\ufffd"   # what SentencePiece decodes an incomplete or invalid byte sequence to


class Tokenizer:
    """encode(text) -> ids and decode(ids) -> text, plus the special ids bos/eos/pad/unk.

    The special ids come from the model file; a `tokenizer_config.json` beside it (Hugging Face layout) may
    name other special pieces. Baichuan's model file has no pad piece: its tokenizer_config.json says
    pad_token = "<unk>", so pad falls back to unk (id 0)."""

    def __init__(self, path):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such tokenizer model file")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
        self.path = path
        self.vocab_size = self.sp.vocab_size()
        self.unk_id = self.sp.unk_id()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.unk_id
        self._read_tokenizer_config(os.path.join(os.path.dirname(path), "tokenizer_config.json"))

    def _read_tokenizer_config(self, config_path):
        try:
            config = read_json_object(config_path, error=ConfigError, max_bytes=2**20, what="tokenizer_config.json")
        except FileNotFoundError:
            return
        for name in ("bos", "eos", "pad", "unk"):
            token = config.get(f"{name}_token")
            if isinstance(token, dict):                 # {"__type": "AddedToken", "content": "<s>", ...}
                token = token.get("content")
            if token is not None and not isinstance(token, str):
                raise ConfigError(f"{config_path}: {name}_token must be a piece (a string or "
                                  f"{{\"content\": string}}), got {config[name + '_token']!r:.60}")
            if token is not None and self._has_piece(token):
                setattr(self, f"{name}_id", self.sp.piece_to_id(token))

    def _has_piece(self, piece):
        i = self.sp.piece_to_id(piece)
        return self.sp.id_to_piece(i) == piece

    def __len__(self):
        return self.vocab_size

    def encode(self, text):
        if not isinstance(text, str):
            raise TypeError(f"encode: expected str, got {type(text).__name__}")
        problem = utf8_problem(text)
        if problem:                                 # SentencePiece would fail with a pybind11 cast message
            raise ValueError(f"encode: the text is not valid UTF-8 ({problem})")
        return self.sp.encode(text)

    def decode(self, ids):
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"decode: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return self.sp.decode(ids)

    def id_to_piece(self, token_id):
        return self.sp.id_to_piece(int(token_id))

    def piece_to_id(self, piece):
        """The id of a piece (`<unk>`'s id, 0, for a piece the vocabulary does not have)."""
        return self.sp.piece_to_id(piece)

    def is_byte(self, token_id):
        return self.sp.is_byte(int(token_id))

    def is_control(self, token_id):
        return self.sp.is_control(int(token_id))


def utf8_problem(text):
    """Why `text` cannot be written as UTF-8, or None. Undecodable bytes reach Python as surrogate escapes
    (sys.argv, and stdin read with errors="surrogateescape"): byte 0xff becomes U+DCFF."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        if 0xDC80 <= code <= 0xDCFF:
            return f"byte 0x{code - 0xDC00:02x} at character {e.start}"
        return f"a lone surrogate U+{code:04X} at character {e.start}"


class StreamDecoder:
    """Token ids in, printable text out, one token at a time: `put(id) -> str` gives the text that is now safe
    to print (maybe ''), `end() -> str` whatever remains. Everything returned, concatenated, equals
    `tokenizer.decode(all ids)`.

    Decoding each token on its own would go wrong twice:
    - byte-fallback pieces spell one character over several tokens (<0xE4> <0xB8> <0x96> is 世); on its own a
      byte decodes to U+FFFD. Text is held while the last token is a byte and the decoded text ends in U+FFFD.
    - SentencePiece drops the leading space ('▁') of the first piece only at the start of the text, so
      decode([id]) of a word in the middle of a reply loses its space.
    So we decode a short window of ids that starts at an *anchor*, a token after which SentencePiece's decode is
    plain concatenation (any piece but bytes and control tokens: once it is decoded, later pieces keep their
    leading space and byte runs before it are closed), and return what the window adds past the text already
    returned from it. The window usually holds one or two ids, so streaming costs O(1) per token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # an empty unknown-piece surface would not end the start of the text; SentencePiece's default is " ⁇ "
        self._unk_is_anchor = tokenizer.decode([tokenizer.unk_id]) != "" if tokenizer.unk_id >= 0 else False
        self.reset()

    def reset(self):
        self.window = []      # ids from the anchor on
        self.printed = ""     # decode of the part of the window already returned

    def _is_anchor(self, token_id):
        if self.tokenizer.is_byte(token_id) or self.tokenizer.is_control(token_id):
            return False
        return token_id != self.tokenizer.unk_id or self._unk_is_anchor

    def put(self, token_id):
        token_id = int(token_id)
        self.window.append(token_id)
        text = self.tokenizer.decode(self.window)
        if self.tokenizer.is_byte(token_id) and text.endswith(REPLACEMENT_CHARACTER):
            return ""                                   # the character may still be arriving byte by byte
        new_text = text[len(self.printed):]
        if self._is_anchor(token_id):
            self.window, self.printed = [token_id], self.tokenizer.decode([token_id])
        else:
            self.printed = text
        return new_text

    def end(self):
        text = self.tokenizer.decode(self.window)[len(self.printed):]
        self.reset()
        return text
