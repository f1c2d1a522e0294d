"""`python -m bcnp.perplexity`: llama.cpp's chunks and its estimate, Hugging Face's sliding window, and the
command line on the demo model, each checked against a direct computation with `Model.logits`."""
import io
import math
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bcnp import Model
from bcnp.config import Config
from bcnp.demo import DEMO_NAME, build_demo_model
from bcnp.weights import random_weights
from bcnp.perplexity import estimate, llama_cpp_chunks, main, sliding_windows
from bcnp.scoring import token_logprobs

ROOT = pathlib.Path(__file__).parent.parent
FINAL = re.compile(r"Final estimate: PPL = (\d+\.\d{4}) \+/- (\d+\.\d{5})")


def direct_nll(logits, targets):
    """-log softmax(logits)[target], one position at a time, in plain Python floats."""
    out = []
    for row, target in zip(logits.astype(np.float64), targets):
        top = max(row)
        out.append(-(row[target] - top - math.log(sum(math.exp(v - top) for v in row))))
    return out


@pytest.fixture(scope="module")
def tiny_model():
    cfg = Config(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                 max_position=64, position_embedding="alibi")
    return Model(cfg, random_weights(cfg, seed=5, std=0.3))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return pathlib.Path(build_demo_model(tmp_path_factory.mktemp("cache") / DEMO_NAME))


# --- llama.cpp's protocol -------------------------------------------------------------------------------------

@given(st.integers(4, 40), st.integers(0, 200), st.sampled_from([None, 1]))
def test_chunks_are_consecutive_ctx_token_rows_with_the_tail_dropped_and_bos_first(ctx, extra, bos):
    tokens = list(range(100, 100 + 2 * ctx + extra))
    chunks = llama_cpp_chunks(tokens, ctx, bos)
    assert chunks.shape == (len(tokens) // ctx, ctx)
    for i, row in enumerate(chunks):
        original = tokens[i * ctx:(i + 1) * ctx]
        assert list(row[1:]) == original[1:]
        assert row[0] == (original[0] if bos is None else bos)


def test_fewer_than_two_chunks_of_tokens_is_an_error():
    with pytest.raises(ValueError, match="at least 20"):
        llama_cpp_chunks(list(range(19)), 10)


def test_estimate_is_llama_cpps_formula():
    nll = [1.0, 2.0, 3.0]                 # mean 2, mean of squares 14/3
    ppl, error = estimate(nll)
    assert ppl == pytest.approx(math.exp(2))
    assert error == pytest.approx(math.sqrt((14 / 3 - 4) / 2) * math.exp(2))


def test_perplexity_equals_a_direct_computation(tiny_model):
    """Score the second half of each chunk (positions [ctx/2, ctx-1) predicting the next token) by hand."""
    from bcnp.perplexity import chunk_nll
    rng = np.random.default_rng(0)
    tokens, ctx = list(rng.integers(3, 61, 50)), 16
    chunks = llama_cpp_chunks(tokens, ctx, bos_id=1)
    expected = []
    for chunk in chunks:
        logits = tiny_model.logits(chunk)
        expected += direct_nll(logits[8:15], chunk[9:16])
    ours = np.concatenate([chunk_nll(tiny_model, c) for c in chunks])
    assert len(ours) == 3 * 7
    np.testing.assert_allclose(ours, expected, rtol=1e-9)


# --- Hugging Face's sliding window --------------------------------------------------------------------------------

@settings(deadline=None)
@given(st.integers(2, 300), st.integers(2, 64), st.data())
def test_sliding_windows_score_each_token_at_most_once_and_all_when_they_overlap(n, ctx, data):
    """As in Hugging Face's loop: a window scores its tokens past the previous window's end, but never its own
    first token (the labels are shifted), so windows that do not overlap (stride == ctx) skip their first."""
    stride = data.draw(st.integers(1, ctx))
    scored = []
    for begin, end, first in sliding_windows(n, ctx, stride):
        assert 0 <= begin < first <= end <= n and end - begin <= ctx
        scored += range(first, end)
    assert scored == sorted(set(scored))
    if stride < ctx:
        assert scored == list(range(1, n))


def test_sliding_window_perplexity_equals_a_direct_computation(tiny_model):
    """40 tokens, windows of 16 every 8: the first window scores tokens 1..15, each later one its last 8."""
    from bcnp.perplexity import window_nll
    tokens = list(np.random.default_rng(1).integers(3, 61, 40))
    windows = sliding_windows(40, 16, 8)
    assert windows == [(0, 16, 1), (8, 24, 16), (16, 32, 24), (24, 40, 32)]
    expected = []
    for begin, end, first in windows:
        logits = tiny_model.logits(tokens[begin:end])
        expected += direct_nll(logits[first - begin - 1:end - begin - 1], tokens[first:end])
    ours = np.concatenate([window_nll(tiny_model, tokens, *w) for w in windows])
    assert len(ours) == 39
    np.testing.assert_allclose(ours, expected, rtol=1e-9)


def test_token_logprobs_is_a_log_softmax_per_row():
    logits = np.random.default_rng(2).standard_normal((5, 9)).astype(np.float32)
    targets = [0, 3, 8, 2, 2]
    np.testing.assert_allclose(-token_logprobs(logits, targets), direct_nll(logits, targets), rtol=1e-12)


# --- the command line -------------------------------------------------------------------------------------------------

def corpus_text():
    return (ROOT / "bcnp" / "data" / "demo_corpus.txt").read_text(encoding="utf-8")


def run_main(*args):
    out, err = io.StringIO(), io.StringIO()
    status = main([str(a) for a in args], out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def test_cli_prints_llama_cpps_lines_and_the_apis_value(demo_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(corpus_text()[:6000], encoding="utf-8")
    status, out, err = run_main("--model", demo_dir, text, "--ctx", 64, "--chunks", 3)
    assert status == 0, err
    assert re.fullmatch(r"\[1\]\d+\.\d{4},\[2\]\d+\.\d{4},\[3\]\d+\.\d{4},\n" + FINAL.pattern + r"\n", out)
    assert re.search(r"\d+ tokens in \S+ s, \S+ tokens/s", err)

    model = Model.from_pretrained(demo_dir)
    tokens = [1] + model.tokenizer.encode(text.read_text(encoding="utf-8"))
    nll = []
    for chunk in llama_cpp_chunks(tokens, 64, bos_id=1)[:3]:
        nll += direct_nll(model.logits(chunk)[32:63], chunk[33:64])
    ppl, error = estimate(nll)
    assert FINAL.search(out).groups() == (f"{ppl:.4f}", f"{error:.5f}")


def test_cli_quantized_and_sliding_window(demo_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(corpus_text()[:4000], encoding="utf-8")
    results = {}
    for flags in ([], ["--quantize", "8"], ["--quantize", "4"], ["--stride", "32"], ["--no-bos"]):
        status, out, err = run_main("--model", demo_dir, text, "--ctx", 64, "--chunks", 2, *flags)
        assert status == 0, err
        results[" ".join(flags)] = float(FINAL.search(out).group(1))
    assert len(set(results.values())) == len(results)                      # each variant computes something else
    assert results["--quantize 8"] == pytest.approx(results[""], rel=0.01)   # int8 barely moves it


@pytest.mark.parametrize("args, message", [
    (["--ctx", "2", "FILE"], "--ctx must be at least 4"),
    (["--stride", "600", "FILE"], r"--stride must be in \[1, --ctx\]"),
    (["MISSING"], "MISSING: no such file"),
    (["--ctx", "100000", "FILE"], "exceeds the model's context"),
    (["--ctx", "512", "SHORT"], "needs at least 1024"),
])
def test_cli_errors_are_one_line(demo_dir, tmp_path, args, message):
    (tmp_path / "FILE").write_text(corpus_text(), encoding="utf-8")
    (tmp_path / "SHORT").write_text("a short text", encoding="utf-8")
    args = [str(tmp_path / a) if a in ("FILE", "MISSING", "SHORT") else a for a in args]
    status, out, err = run_main("--model", demo_dir, *args)
    assert status != 0 and out == ""
    assert re.fullmatch(r"error: [^\n]*\n", err.splitlines(keepends=True)[-1]) and re.search(message, err)


def test_demo_end_to_end_in_a_subprocess(demo_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(corpus_text()[:3000], encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BCNP_CACHE_DIR": str(demo_dir.parent)}
    result = subprocess.run([sys.executable, "-m", "bcnp.perplexity", "--demo", str(text), "--ctx", "32",
                             "--chunks", "2"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert FINAL.search(result.stdout) and "RANDOM weights" in result.stderr
