"""The command lines against a hostile user and a hostile terminal (SPEC §6): whatever goes wrong, one line
`error: ...` on stderr naming the file, field or argument, a non-zero status, never a traceback."""
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from bcnp import generate
from conftest import sigint_as_from_a_terminal
from test_generate_cli import HF_FIXTURE, ROOT, STATS, InterruptedModel, typed_lines
from test_generate_cli import model_dir  # noqa: F401  (the chat model directory fixture)


def run(module, *args, stdin=b"", stdout=subprocess.PIPE, shell_suffix=None, env=None, timeout=120):
    """`python -m bcnp.MODULE ARGS` with bytes in and out; `shell_suffix` (e.g. '>&-') goes through sh."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8", **(env or {})}
    command = [sys.executable, "-m", f"bcnp.{module}", *[a if isinstance(a, bytes) else str(a) for a in args]]
    if shell_suffix:
        command = ["sh", "-c", 'exec "$@" ' + shell_suffix, "sh", *command]
    return subprocess.run(command, input=stdin, stdout=stdout, stderr=subprocess.PIPE, env=environment, cwd=ROOT,
                          timeout=timeout)


def one_error_line(r, pattern):
    lines = r.stderr.decode("utf-8").strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr.decode()
    assert lines[0].startswith("error: ") and re.search(pattern, lines[0]), lines[0]
    return lines[0]


def bad_copy(tmp_path, file, **changes):
    """The chat model directory with `changes` made to one of its JSON files."""
    directory = shutil.copytree(HF_FIXTURE, tmp_path / "model")
    shutil.copy(ROOT / "tests" / "fixtures" / "tokenizers" / "tiny-spm.model", directory / "tokenizer.model")
    path = directory / file
    d = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**d, **changes}))
    return directory


# --- the files: every field bcnp uses is checked when the directory is opened, by inspect as by generate ------

BAD_FIELDS = [
    ("config.json", {"rms_norm_eps": "abc"}, "config.json: rms_norm_eps must be a finite number in"),
    ("config.json", {"architectures": 5}, "config.json: architectures must be a list of strings"),
    ("config.json", {"model_type": "gpt2"}, "config.json: model_type is 'gpt2'"),
    ("config.json", {"eos_token_id": "two"}, "config.json: eos_token_id must be an integer in"),
    ("config.json", {"model_max_length": 1e12}, r"config.json: model_max_length must be an integer in \[1, 1048576\]"),
    ("config.json", {"num_hidden_layers": 10**7}, r"config.json: num_hidden_layers must be an integer in \[1, 1024\]"),
    ("config.json", {"torch_dtype": ["bfloat16"]}, "config.json: torch_dtype must be one of"),
    ("generation_config.json", {"max_new_tokens": "abc"}, "generation_config.json: max_new_tokens must be an integer"),
    ("generation_config.json", {"max_new_tokens": None}, "generation_config.json: max_new_tokens must be an integer"),
    ("generation_config.json", {"eos_token_id": "two"}, "generation_config.json: eos_token_id must be a token id"),
    ("generation_config.json", {"temperature": -1}, "generation_config.json: temperature must be a finite number"),
    ("tokenizer_config.json", {"pad_token": 7}, "tokenizer_config.json: pad_token must be a piece"),
]


@pytest.mark.parametrize("command, file, changes, message", [
    (command, *case) for case in BAD_FIELDS for command in ("inspect", "generate")
    if command == "generate" or case[0] != "tokenizer_config.json"])             # inspect reads no tokenizer
def test_inspect_and_generate_refuse_a_bad_field_naming_file_and_field(tmp_path, command, file, changes, message):
    directory = bad_copy(tmp_path, file, **changes)
    args = [directory] if command == "inspect" else ["--model", directory, "--prompt", "hi", "--max-new-tokens", 2]
    start = time.perf_counter()
    r = run(command, *args)
    one_error_line(r, str(directory / file).replace(".", r"\.") + ": " + message.split(": ", 1)[1])
    assert r.stdout == b""
    assert time.perf_counter() - start < 30                  # 10^7 layers: refused before anything is built


@pytest.mark.parametrize("content", [b"[" * 100_000, '{"a": "\xe9"}'.encode("latin-1")], ids=["deep", "latin-1"])
@pytest.mark.parametrize("file", ["config.json", "generation_config.json"])
def test_an_unparsable_json_file_is_one_line_naming_it(tmp_path, content, file):
    directory = bad_copy(tmp_path, "config.json")
    (directory / file).write_bytes(content)
    for command, args in (("inspect", [directory]), ("generate", ["--model", directory, "--prompt", "hi"])):
        one_error_line(run(command, *args), f"{file}: {file} is (nested too deeply|not UTF-8)")


def test_error_messages_escape_control_characters_and_stay_short(tmp_path):
    """A name holding a newline and ESC used to inject a fake line and colours into the terminal."""
    evil = tmp_path / ("model\nerror: fake line\x1b[31m" + "x" * 2000)
    for command, args in (("inspect", [evil]), ("generate", ["--model", evil, "--prompt", "hi"])):
        line = one_error_line(run(command, *args), r"\\nerror: fake line\\x1b\[31m")
        assert "\x1b" not in line and len(line) <= 620


# --- the terminal ---------------------------------------------------------------------------------------------

def test_generate_with_stdout_closed_is_one_error_line(tmp_path):
    r = run("generate", "--demo", "--prompt", "hi", shell_suffix=">&-", stdout=None,
            env={"BCNP_CACHE_DIR": str(tmp_path)})
    one_error_line(r, "standard output is closed")
    assert os.listdir(tmp_path) == []                        # nothing was built for nobody to read


@pytest.mark.parametrize("command, args", [("inspect", ["--preset", "13b"]),
                                           ("generate", ["--model", "{model}", "--prompt", "hi", "--greedy"])])
def test_a_full_disk_on_stdout_is_one_error_line(model_dir, command, args):
    with open("/dev/full", "wb") as full:
        r = run(command, *[str(model_dir) if a == "{model}" else a for a in args], stdout=full)
    one_error_line(r, r"cannot write to standard output \(No space left on device\)")


def test_prompt_bytes_that_are_not_utf8_are_a_usage_error(model_dir):
    r = run("generate", "--model", model_dir, "--prompt", b"caf\xe9")
    assert r.returncode == 2
    one_error_line(r, r"--prompt is not valid UTF-8 \(byte 0xe9 at character 3\)")


def test_a_stdin_line_that_is_not_utf8_is_refused_and_the_chat_goes_on(model_dir):
    r = run("generate", "--model", model_dir, "--greedy", "--max-new-tokens", 2,
            stdin=b"hello\n\xff\xfe oops\nhow are you\n")
    err = r.stderr.decode("utf-8")
    assert r.returncode == 0, err
    assert len(STATS.findall(err)) == 2                      # both good lines were answered
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == ["error: that line is not valid UTF-8 (byte 0xff at character 0); nothing was sent"]


def test_a_tiny_temperature_samples_the_greedy_reply(model_dir):
    """--temperature 1e-45 used to overflow logits / T to infinity and the probabilities to NaN."""
    common = ["--model", model_dir, "--prompt", "tell me a story", "--max-new-tokens", 8]
    tiny, greedy = run("generate", *common, "--temperature", "1e-45", "--seed", 1), run("generate", *common, "--greedy")
    assert tiny.returncode == 0, tiny.stderr.decode()
    assert tiny.stdout == greedy.stdout and tiny.stdout.strip()


# --- Ctrl-C ---------------------------------------------------------------------------------------------------

class CtrlCWhileClosing(io.StringIO):
    """stdout on which the user presses Ctrl-C again while the interrupted reply is being closed."""

    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, text):
        self.writes += 1
        if self.writes == 3:                     # 'hello', ' world', then the closing newline
            raise KeyboardInterrupt
        return super().write(text)


@pytest.mark.parametrize("out, lines", [(io.StringIO(), ["hello"]), (CtrlCWhileClosing(), ["hello"]),
                                        (io.StringIO(), [])])
def test_a_second_ctrl_c_exits_cleanly_with_status_130(monkeypatch, out, lines):
    model = InterruptedModel()
    monkeypatch.setattr(generate, "load_model", lambda args: model)
    read_line = typed_lines(*lines)

    def then_ctrl_c():                            # the lines, then Ctrl-C at the prompt
        try:
            return read_line()
        except EOFError:
            raise KeyboardInterrupt from None
    monkeypatch.setattr(generate, "prompt_reader", lambda: then_ctrl_c)
    err = io.StringIO()
    assert generate.main(["--model", str(HF_FIXTURE)], out=out, err=err) == 130
    assert "Traceback" not in err.getvalue() and "error:" not in err.getvalue()


def test_ctrl_c_twice_in_a_real_session_exits_130_without_a_traceback(model_dir):
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8"}
    p = subprocess.Popen([sys.executable, "-m", "bcnp.generate", "--model", str(model_dir), "--max-new-tokens", "200"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment,
                         preexec_fn=sigint_as_from_a_terminal)
    try:
        assert b"Chat with the model" in p.stderr.readline()  # loaded, at the prompt
        p.stdin.write(b"tell me a long story\n")
        p.stdin.flush()
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)                          # stops the reply (or the prefill)
        time.sleep(0.05)
        p.send_signal(signal.SIGINT)                          # while it closes, or at the prompt
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err.decode()
    assert b"Traceback" not in err and b"Exception ignored" not in err


def test_logits_that_overflow_stop_generation_with_one_error_line(tmp_path):
    """Finite weights can still overflow float32 (a final norm of 1e38): the reply must not be '⁇ ⁇ ⁇'."""
    from safetensors.numpy import save_file
    from bcnp.config import Config
    from bcnp.weights import random_weights
    directory = bad_copy(tmp_path, "config.json")
    for stale in directory.glob("pytorch_model*"):
        stale.unlink()
    weights = random_weights(Config.from_json(directory))
    weights["model.norm.weight"][:] = 1e38
    weights["lm_head.weight"][:] = 1e38                              # every logit overflows, from the first token
    save_file(weights, str(directory / "model.safetensors"))
    r = run("generate", "--model", directory, "--prompt", "hi", "--greedy")
    one_error_line(r, "the logits at position .* are not finite")
    assert r.stdout == b""
