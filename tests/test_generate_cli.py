"""`python -m bcnp.generate` end to end (SPEC §6), and the demo model.

The fixture model (vocab 512) comes without a tokenizer; a temporary copy gets tests/fixtures' tiny
SentencePiece model (512 pieces) as its tokenizer.model. Its weights are random, so replies are compared with
what the Python API produces for the same prompt, token for token."""
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bcnp import Model
from bcnp.demo import build_demo_model, demo_cache_dir
from bcnp.chat import chat_prompt
from bcnp.generate import interactive
from bcnp.sampling import GenerationConfig
from bcnp.tokenizer import Tokenizer

ROOT = pathlib.Path(__file__).parent.parent
FIXTURES = pathlib.Path(__file__).parent / "fixtures"
HF_FIXTURE = FIXTURES / "b13-alibi-h8-l4-bf16" / "hf"
TINY_SPM = FIXTURES / "tokenizers" / "tiny-spm.model"
STATS = re.compile(r"\[prompt (\d+) tokens, prefill (\S+ tok/s|-), decode (\S+ tok/s|-), (\d+) tokens generated\]")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chat-model") / "hf"
    shutil.copytree(HF_FIXTURE, directory)
    shutil.copy(TINY_SPM, directory / "tokenizer.model")
    assert Tokenizer(TINY_SPM).vocab_size <= json.loads((HF_FIXTURE / "config.json").read_text())["vocab_size"]
    return directory


@pytest.fixture(scope="module")
def model(model_dir):
    return Model.from_pretrained(model_dir)


def run_cli(*args, stdin="", env=None):
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8", **(env or {})}
    return subprocess.run([sys.executable, "-m", "bcnp.generate", *map(str, args)], input=stdin, env=environment,
                          cwd=ROOT, capture_output=True, text=True, encoding="utf-8", timeout=120)


def greedy_reply(model, messages, max_new_tokens):
    """What the chat must answer: the greedy continuation of the chat template, decoded."""
    ids, budget = model.chat_prompt(messages, max_new_tokens)
    tokens = list(model.generate(ids, max_new_tokens=budget, do_sample=False))
    return model.tokenizer.decode(tokens), len(ids)


def stats(stderr):
    return [(int(m.group(1)), int(m.group(4))) for m in STATS.finditer(stderr)]


# --- one-shot and interactive ------------------------------------------------------------------------------------

def test_one_shot_streams_the_greedy_reply_and_reports_stats(model_dir, model):
    r = run_cli("--model", model_dir, "--prompt", "hello world. how are you today?", "--greedy",
                "--max-new-tokens", 12)
    assert r.returncode == 0, r.stderr
    expected, n_prompt = greedy_reply(model, [{"role": "user", "content": "hello world. how are you today?"}], 12)
    assert r.stdout == expected + "\n"
    assert len(STATS.findall(r.stderr)) == 1 and stats(r.stderr)[0][0] == n_prompt


def test_system_prompt_goes_first(model_dir, model):
    r = run_cli("--model", model_dir, "--system", "be brief", "--prompt", "hello", "--greedy", "--max-new-tokens", 4)
    assert r.returncode == 0, r.stderr
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert r.stdout == greedy_reply(model, messages, 4)[0] + "\n"


def test_same_seed_same_reply(model_dir):
    runs = [run_cli("--model", model_dir, "--prompt", "tell me a story", "--seed", 7, "--max-new-tokens", 10,
                    "--temperature", 1.5, "--top-k", 0, "--top-p", 1.0, "--repetition-penalty", 1.0)
            for _ in range(2)]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[0].stdout == runs[1].stdout


def test_quantized_model_chats(model_dir):
    r = run_cli("--model", model_dir, "--prompt", "hello", "--quantize", 8, "--greedy", "--max-new-tokens", 3)
    assert r.returncode == 0, r.stderr
    assert len(STATS.findall(r.stderr)) == 1


def test_interactive_session_keeps_history_until_reset(model_dir, model):
    script = "hello world.\nhow are you today?\n/reset\nwhat is your name?\n/quit\nnever read\n"
    r = run_cli("--model", model_dir, "--greedy", "--max-new-tokens", 5, stdin=script)
    assert r.returncode == 0, r.stderr

    history, expected_out, expected_stats = [], "", []
    for line in ["hello world.", "how are you today?", None, "what is your name?"]:
        if line is None:                                              # /reset
            history = []
            continue
        messages = history + [{"role": "user", "content": line}]
        reply, n_prompt = greedy_reply(model, messages, 5)
        history = messages + [{"role": "assistant", "content": reply}]
        expected_out += reply + "\n"
        expected_stats.append(n_prompt)
    assert r.stdout == expected_out
    assert [n_prompt for n_prompt, _ in stats(r.stderr)] == expected_stats
    assert expected_stats[1] > expected_stats[0] + len(model.tokenizer.encode("how are you today?"))  # saw turn 1
    assert "Traceback" not in r.stderr


def test_end_of_input_ends_the_session(model_dir):
    r = run_cli("--model", model_dir, "--greedy", "--max-new-tokens", 2, stdin="hello\n")
    assert r.returncode == 0, r.stderr
    assert len(STATS.findall(r.stderr)) == 1


# --- every user error: one line on stderr, non-zero exit ---------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--model", "{missing}", "--prompt", "hi"], "no such directory"),
    (["--model", "{hf_fixture}", "--prompt", "hi"], "no tokenizer.model"),
    (["--prompt", "hi"], "give either --model DIR or --demo"),
    (["--model", "{model}", "--top-k", "-1"], "--top-k must be an integer >= 0"),
    (["--model", "{model}", "--top-p", "0"], r"--top-p must be a number in \(0, 1\]"),
    (["--model", "{model}", "--top-p", "1.5"], r"--top-p must be a number in \(0, 1\]"),
    (["--model", "{model}", "--top-p", "nan"], r"--top-p must be a number in \(0, 1\]"),
    (["--model", "{model}", "--temperature", "0"], "--temperature must be a finite number > 0"),
    (["--model", "{model}", "--temperature", "inf"], "--temperature must be a finite number > 0"),
    (["--model", "{model}", "--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1"),
    (["--model", "{model}", "--repetition-penalty", "-1"], "--repetition-penalty must be a finite number > 0"),
    (["--model", "{model}", "--repetition-penalty", "inf"], "--repetition-penalty must be a finite number > 0"),
    (["--model", "{model}", "--repetition-penalty", "nan"], "--repetition-penalty must be a finite number > 0"),
    (["--model", "{model}", "--seed", "-3"], "--seed must be >= 0"),
    (["--model", "{model}", "--top-k", "many"], "invalid int value"),
    (["--model", "{model}", "--quantize", "3"], "invalid choice"),
    (["--model", "{model}", "--device", "tpu"], "invalid choice"),
    (["--model", "{model}", "--frobnicate"], "unrecognized arguments"),
    (["--model", "{model}", "--prompt", "the sea " * 200], "the prompt is .* tokens.* context holds 256 tokens"),
    (["--model", "{model}", "--device", "cuda", "--prompt", "hi"], "(?i)cupy|cuda|gpu"),
])
def test_user_errors_print_one_line_and_exit_non_zero(model_dir, tmp_path, args, message):
    paths = {"missing": tmp_path / "no-such-model", "hf_fixture": HF_FIXTURE, "model": model_dir}
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so --device cuda fails on every machine
    r = run_cli(*[a.format(**paths) for a in args], env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and re.search(message, lines[0]), lines[0]
    assert r.stdout == ""


# --- Ctrl-C, with a model whose generation is interrupted --------------------------------------------------------

class InterruptedModel:
    """Stands in for Model: says 'hello world' token by token, then the user presses Ctrl-C (once)."""

    def __init__(self):
        self.tokenizer = Tokenizer(TINY_SPM)
        self.generation_config = GenerationConfig(max_new_tokens=8)
        self.config = type("Config", (), {"max_position": 256})()
        self.prompts = []
        self.interrupt = True

    def chat_prompt(self, messages, max_new_tokens=None):
        return chat_prompt(self.tokenizer, messages, context=256, max_new_tokens=max_new_tokens,
                           generation_max_new_tokens=8)

    def generate(self, ids, **kwargs):
        self.prompts.append(list(ids))
        yield from self.tokenizer.encode("hello world")
        if self.interrupt:
            self.interrupt = False
            raise KeyboardInterrupt


def typed_lines(*lines):
    """A read_line that returns `lines`, then reports the end of input like input() does."""
    remaining = list(lines)

    def read_line():
        if not remaining:
            raise EOFError
        return remaining.pop(0)
    return read_line


CLI_DEFAULTS = dict(system=None, seed=None, max_new_tokens=None, temperature=None, top_k=None, top_p=None,
                    repetition_penalty=None, greedy=False)


def test_ctrl_c_stops_the_reply_and_keeps_the_session_and_the_partial_reply():
    model, t = InterruptedModel(), Tokenizer(TINY_SPM)
    out, err = io.StringIO(), io.StringIO()
    args = type("Args", (), CLI_DEFAULTS)()
    assert interactive(model, args, out, err, read_line=typed_lines("first", "second")) == 0
    assert out.getvalue() == "hello world\nhello world\n"
    assert err.getvalue().count("[reply interrupted]") == 1
    # the second prompt holds the first exchange with the partial reply that was printed
    assert model.prompts[1] == model.prompts[0] + t.encode("hello world") + [195] + t.encode("second") + [196]


def test_ctrl_c_at_the_prompt_quits_cleanly_with_status_130():
    def press_ctrl_c():
        raise KeyboardInterrupt
    out, err = io.StringIO(), io.StringIO()
    args = type("Args", (), CLI_DEFAULTS)()
    assert interactive(InterruptedModel(), args, out, err, read_line=press_ctrl_c) == 130
    assert out.getvalue() == ""


def test_python_chat_api_replies_streams_and_fits_a_small_context(model):
    """model(messages): the checkpoint's 2048 new tokens do not fit the fixture's 256-token context, so half
    the context is kept for the reply; stream=True yields the same text piece by piece."""
    messages = [{"role": "user", "content": "please tell me a story"}]
    result = model(messages, do_sample=False)
    want, _ = greedy_reply(model, messages, model.config.max_position // 2)
    assert result == {"response": want, "history": messages + [{"role": "assistant", "content": want}]}
    assert "".join(model(messages, stream=True, do_sample=False)) == want


def test_the_command_line_and_the_python_api_share_one_reply_budget(model_dir, model):
    """Neither given a budget: both take bcnp.chat.chat_prompt's (half the fixture's context here), so the CLI
    prints what model(messages) returns, token for token."""
    messages = [{"role": "user", "content": "please tell me a story"}]
    r = run_cli("--model", model_dir, "--prompt", messages[0]["content"], "--greedy")
    assert r.returncode == 0, r.stderr
    assert r.stdout == model(messages, do_sample=False)["response"] + "\n"
    assert stats(r.stderr)[0][1] == len(list(model.generate(model.chat_prompt(messages)[0], do_sample=False,
                                                            max_new_tokens=model.chat_prompt(messages)[1])))


# --- the demo model ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return pathlib.Path(build_demo_model(tmp_path_factory.mktemp("demo") / "demo-model"))


def test_demo_model_has_the_hugging_face_layout(demo_dir):
    assert sorted(os.listdir(demo_dir)) == ["config.json", "generation_config.json", "model.safetensors",
                                           "tokenizer.model", "tokenizer_config.json"]
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["architectures"] == ["BaichuanForCausalLM"] and config["model_type"] == "baichuan"
    assert config["vocab_size"] == Tokenizer(demo_dir / "tokenizer.model").vocab_size
    tokenizer = Tokenizer(demo_dir / "tokenizer.model")
    assert (tokenizer.id_to_piece(195), tokenizer.id_to_piece(196)) == ("<reserved_102>", "<reserved_103>")
    assert tokenizer.sp.encode("😀", out_type=str)[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]  # byte fallback
    from safetensors.numpy import load_file
    weights = load_file(demo_dir / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {np.dtype(np.float16)}


def test_demo_model_chats_through_the_python_api(demo_dir):
    model = Model.from_pretrained(demo_dir)
    result = model([{"role": "user", "content": "hello"}], max_new_tokens=8, seed=0)
    assert isinstance(result["response"], str) and result["response"]
    assert result["history"][-1] == {"role": "assistant", "content": result["response"]}


def test_demo_model_is_built_once(demo_dir):
    stamp = (demo_dir / "model.safetensors").stat().st_mtime_ns
    assert build_demo_model(demo_dir) == str(demo_dir)
    assert (demo_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_failed_demo_build_leaves_nothing_behind(tmp_path, monkeypatch):
    import bcnp.demo

    def fail(directory):
        (pathlib.Path(directory) / "config.json").write_text("{}")
        raise OSError("disk full")
    monkeypatch.setattr(bcnp.demo, "write_demo_model", fail)
    with pytest.raises(OSError, match="disk full"):
        build_demo_model(tmp_path / "demo")
    assert os.listdir(tmp_path) == []


def test_demo_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("BCNP_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert demo_cache_dir().startswith(str(tmp_path / "a") + os.sep)
    monkeypatch.delenv("BCNP_CACHE_DIR")
    assert demo_cache_dir().startswith(str(tmp_path / "b" / "bcnp") + os.sep)
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo_cache_dir().startswith(str(tmp_path / "home" / ".cache" / "bcnp") + os.sep)


def test_demo_cli_builds_caches_and_chats(tmp_path):
    r = run_cli("--demo", "--prompt", "hello", "--max-new-tokens", 6, env={"BCNP_CACHE_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "RANDOM weights" in r.stderr and "gibberish" in r.stderr
    assert len(STATS.findall(r.stderr)) == 1 and r.stdout.strip()
    assert os.listdir(tmp_path) == [os.path.basename(demo_cache_dir())]       # no temporary directory left


def test_the_demo_runs_as_baichuan2_with_its_norm_head(demo_dir):
    """--family baichuan2 reads the same demo files with NormHead: the reply is the Baichuan2 model's."""
    r = run_cli("--demo", "--family", "baichuan2", "--prompt", "hello", "--greedy", "--max-new-tokens", 6)
    assert r.returncode == 0, r.stderr
    assert "Baichuan2-13B-shaped (NormHead)" in r.stderr
    b2 = Model.from_pretrained(demo_dir, family="baichuan2")
    expected, _ = greedy_reply(b2, [{"role": "user", "content": "hello"}], 6)
    assert r.stdout == expected + "\n"
    assert not np.allclose(b2.w["lm_head.weight"], Model.from_pretrained(demo_dir).w["lm_head.weight"])
