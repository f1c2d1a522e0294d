"""How bcnp reads small JSON files it did not write, and how its command lines print an error: one safe line.

Both are here, at the bottom of the package, because every reader and every command line needs them: a
hostile file must not be able to crash a reader with a RecursionError (JSON nested 100,000 deep), exhaust
memory (a 1 GB "config"), or paint the user's terminal through an error message that echoes a tensor name
holding ESC and newline characters.
"""
import json
import os

# Past this, a message is cut in the middle: a 197 kB corrupt field once made a 256 MB error line.
MAX_MESSAGE_CHARS = 600


def one_line(message, limit=MAX_MESSAGE_CHARS):
    """`message` as one printable line: control characters escaped (\\n, \\x1b, ...), cut to `limit` chars."""
    text = str(message)
    if len(text) > 4 * limit:                     # escaping can only lengthen; don't escape what gets cut
        text = text[: 2 * limit] + text[-2 * limit:]
    out = []
    for ch in text:
        if ch.isprintable() or ch == " ":
            out.append(ch)
        elif ch in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    text = "".join(out)
    if len(text) > limit:
        half = (limit - 5) // 2
        text = f"{text[:half]} ... {text[-half:]}"
    return text


def read_json(path, error=ValueError, max_bytes=16 * 2**20, what="JSON file"):
    """The JSON value in file `path`, or `error` with one message naming the file.

    `max_bytes` bounds memory before anything is parsed (config.json is ~1 kB, a 13B index ~30 kB); JSON that is
    not UTF-8, not JSON, or nested too deeply for Python's parser is reported, never raised as another type.
    FileNotFoundError passes through so callers can supply defaults for optional files."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:        # refused before reading: a read of max_bytes would allocate that much
                raise error(f"{path}: {what} is {size:,} bytes, more than the {max_bytes:,} a {what} may have; "
                            "refusing to parse it")
            data = f.read(size + 1)             # (read(n) allocates n bytes up front); growth is cut below
    except FileNotFoundError:
        raise
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise error(f"{path}: {what} is more than {max_bytes:,} bytes; refusing to parse it")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: {what} is not UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{path}: {what} is nested too deeply to be a configuration") from None
    except ValueError as e:                       # json.JSONDecodeError is a ValueError
        raise error(f"{path}: {what} is not valid JSON ({e})") from None


def read_json_object(path, error=ValueError, max_bytes=16 * 2**20, what="JSON file"):
    """`read_json` for files that must hold a JSON object (every config and index bcnp reads)."""
    value = read_json(path, error, max_bytes, what)
    if not isinstance(value, dict):
        raise error(f"{os.fspath(path)}: {what} must be a JSON object, got {type(value).__name__}")
    return value
