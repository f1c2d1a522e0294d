"""The two helpers every reader and command line shares: safe JSON reading and one-line error messages."""
import json

import pytest
from hypothesis import given, strategies as st

from bcnp.errors import one_line, read_json, read_json_object


@given(st.text(max_size=3000))
def test_one_line_is_one_printable_bounded_line(text):
    line = one_line(text, limit=200)
    assert "\n" not in line and "\x1b" not in line and "\r" not in line
    assert all(ch.isprintable() or ch == " " for ch in line)
    assert len(line) <= 200


def test_one_line_escapes_a_fake_line_and_colours():
    assert one_line("tensor a\nerror: fake\x1b[31m") == "tensor a\\nerror: fake\\x1b[31m"


def test_one_line_keeps_both_ends_of_a_long_message():
    line = one_line("start " + "x" * 10**6 + " end", limit=100)
    assert line.startswith("start ") and line.endswith(" end") and " ... " in line


def test_read_json_names_the_file_for_each_failure(tmp_path):
    cases = {"deep.json": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
             "latin1.json": ('{"a": "é"}'.encode("latin-1"), "not UTF-8"),
             "bad.json": (b"{not json", "not valid JSON"), "big.json": (b" " * 2**20 + b"{}", "more than the 1,048,576")}
    for name, (data, why) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{name}: .*{why}"):
            read_json(tmp_path / name, max_bytes=2**20)
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ValueError, match="list.json: .*JSON object, got list"):
        read_json_object(tmp_path / "list.json")
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")
    (tmp_path / "ok.json").write_text(json.dumps({"a": [1, 2]}))
    assert read_json_object(tmp_path / "ok.json") == {"a": [1, 2]}
