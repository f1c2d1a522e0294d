"""tools/bench.py, tools/blas_stall.py and tools/llama_gguf.py run end to end (--smoke: tiny widths) and report
what their docstrings promise; and importing bcnp stops OpenBLAS's idle threads from spinning after a call (the
post-prefill stall)."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from conftest import FIXTURES

ROOT = FIXTURES.parent.parent
TOOLS = ROOT / "tools"
KINDS = ["float32", "int8", "int4"]


def run_json(*argv):
    result = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env=None)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)                        # --json: one object on stdout, nothing else


@pytest.fixture(scope="module")
def report():
    return run_json(TOOLS / "bench.py", "--smoke", "--json", "--layers", "1", "--cache-dtype", "float16")


@pytest.mark.slow
def test_the_report_has_both_ceilings_and_every_kind_length_and_context(report):
    c = report["ceilings"]
    assert c["read_gbs"] >= max(c["read_gbs_start"], c["read_gbs_worst"]) > 0 and c["blas_gflops"] > 0
    assert report["extrapolated_to_layers"] == 40 and report["layers"] == 1
    for kind in KINDS:
        assert list(report["prefill"][kind]) == ["16", "128", "512"]
        for row in report["prefill"][kind].values():
            assert row["vs_blas"] == pytest.approx(row["gflops"] / report["ceilings"]["blas_gflops"])
            assert row["tok_s"] > 0 and row["tok_s_13b"] > 0
        decode = report["decode"][kind]
        assert set(decode) == {"128", "1024", "2048", "ratio_2048_128"}
        assert decode["ratio_2048_128"] == pytest.approx(decode["2048"]["ms"] / decode["128"]["ms"])
        assert all(decode[c]["vs_bandwidth"] > 0 and decode[c]["tok_s_13b"] > 0 for c in ("128", "1024", "2048"))


@pytest.mark.slow
def test_decode_counts_the_cache_it_reads_in_the_dtype_asked_for(report):
    w = report["widths"]
    for kind in KINDS:
        assert report["cache_dtype"][kind] == "float16"
        decode = report["decode"][kind]
        keys_and_values = 2 * 1 * w["heads"] * (2048 - 128) * (w["hidden"] // w["heads"]) * 2     # 1 layer, 2 bytes
        assert (decode["2048"]["mb"] - decode["128"]["mb"]) * 1e6 == pytest.approx(keys_and_values)


@pytest.mark.slow
def test_the_report_times_the_steps_after_a_prefill_and_alibi_against_rope(report):
    assert set(report["after_prefill"]) == {"int8", "int4"}
    for steps in report["after_prefill"].values():
        assert len(steps["steps_ms"]) == 10 and steps["rested_ms"] > 0
    a = report["alibi_vs_rope"]
    assert a["positions"] == 2000 and a["seed_claim_pct"] == 31.6
    assert a["alibi_faster_pct"] == pytest.approx(100 * (a["alibi_tok_s_13b"] / a["rope_tok_s_13b"] - 1))
    alone = a["attention_alone"]
    assert alone["probabilities"] == report["widths"]["heads"] * 2001
    assert 0 < alone["alibi_subnormal_probabilities"] < alone["probabilities"]     # ALiBi's far keys, exp(-87..-104)
    assert alone["alibi_uncut_ms"] > 0
    assert alone["alibi_cut_max_difference"] < 1e-30              # scores 80 below the max weigh nothing in float32
    assert set(a["position_work_us"]) == {"alibi_bias", "rope_mask", "rope_q_k_per_layer"}


def spin_seconds(setup):
    """CPU seconds a fresh process uses while it sleeps 0.3 s right after a threaded float32 GEMM."""
    code = (f"{setup}\nimport time, numpy as np\na = np.ones((40, 512, 128), np.float32)\n"
            "b = np.ones((40, 128, 512), np.float32)\na @ b\nc = time.process_time()\ntime.sleep(0.3)\n"
            "print(time.process_time() - c)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={"PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "2", "PATH": ""})
    assert result.returncode == 0, result.stderr
    return float(result.stdout)


def test_openblas_threads_sleep_right_after_a_call_once_bcnp_is_imported():
    """OpenBLAS's default keeps its idle threads spinning ~0.1 s after every threaded call (0.04-0.12 CPU s
    measured here), taking the cores from the OpenMP kernels that run next; bcnp sets 2^20 cycles (< 1 ms)."""
    assert spin_seconds("import bcnp") < 0.02


@pytest.mark.slow
def test_blas_stall_compares_the_three_settings():
    report = run_json(TOOLS / "blas_stall.py", "--smoke", "--rounds", "1", "--layers", "1", "--prompt", "16", "--json")
    settings = report["settings"]
    assert list(settings) == ["openblas default", "bcnp", "openblas 1 thread"]
    assert settings["openblas default"]["openblas_thread_timeout"] == "28"
    assert settings["bcnp"]["openblas_thread_timeout"] == "20"
    assert settings["bcnp"]["spin_cpu_s"] < 0.02 and settings["openblas 1 thread"]["spin_cpu_s"] < 0.02
    for s in settings.values():
        assert s["prefill_s"] > 0 and math.isfinite(s["first_3_steps_ms"]) and s["rested_steps_ms"] > 0


def test_the_llama_cpp_gguf_holds_the_bench_weights_as_bcnp_quantizes_them(tmp_path):
    """tools/llama_gguf.py: llama.cpp's baichuan layout, and every linear the codes bcnp's own int4 model runs."""
    import gguf                                     # a test extra, like the reference in tests/test_quant.py
    import dataclasses
    from bcnp.config import BAICHUAN_13B
    from bcnp.quant import dequantize, quantize
    from bcnp.weights import random_weights
    out = tmp_path / "bench.gguf"
    r = subprocess.run([sys.executable, TOOLS / "llama_gguf.py", out, "--smoke", "--layers", "1"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and r.stderr.startswith(f"wrote {out}: 1 layers"), r.stderr
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    assert str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8") == "baichuan"
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["output.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    config = dataclasses.replace(BAICHUAN_13B, num_hidden_layers=1, hidden_size=128, intermediate_size=352,
                                 num_attention_heads=4, vocab_size=512)
    w = random_weights(config, seed=0)
    q, k, v = np.split(w["model.layers.0.self_attn.W_pack.weight"], 3)
    down = w["model.layers.0.mlp.down_proj.weight"]
    for name, weight in [("blk.0.attn_q", q), ("blk.0.attn_v", v), ("blk.0.ffn_down", down)]:
        t = tensors[name + ".weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
        ours = dequantize(*quantize(weight, 4), 4)
        assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape), ours)
    again = subprocess.run([sys.executable, TOOLS / "llama_gguf.py", out, "--smoke"], capture_output=True, text=True,
                           timeout=120, cwd=ROOT)
    assert again.returncode == 1 and again.stderr == f"error: {out}: exists; pass --force to replace it\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.gguf"]


@pytest.mark.slow
def test_batch_reports_every_width_a_chat_turn_and_a_burst_that_shares_its_prefix():
    report = run_json(TOOLS / "bench.py", "batch", "--smoke", "--json")
    for kind in KINDS:
        assert list(report[kind]) == ["1", "2", "4", "8", "16"] and all(r > 0 for r in report[kind].values())
        assert report[kind + "_vs_b1"]["8"] == pytest.approx(report[kind]["8"] / report[kind]["1"])
    assert report["chat_turn_int4"]["reused_tokens"] >= report["chat_turn_int4"]["history"]
    burst = report["burst_int4"]
    # 8 prompts of 31 tokens; an earlier request's cache holds 5 of them, and they share 10 more: the first computes
    # its 26, each of the others its own 16
    assert (burst["clients"], burst["prompt_tokens"]) == (8, 8 * 31)
    assert burst["computed"] == 26 + 7 * 16 and burst["seconds"] > 0


@pytest.mark.slow
def test_batch_busy_runs_the_widths_beside_python_threads_and_says_how_many():
    report = run_json(TOOLS / "bench.py", "batch", "--smoke", "--json", "--busy", "2")
    assert report["busy"] == 2
    assert all(list(report[kind]) == ["1", "2", "4", "8", "16"] and all(r > 0 for r in report[kind].values())
               for kind in KINDS)


@pytest.mark.parametrize("value", ["-1", "two"])
def test_batch_busy_refuses_what_is_not_a_count_in_one_line(value):
    result = subprocess.run([sys.executable, str(TOOLS / "bench.py"), "batch", "--busy", value], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1].endswith(f"error: argument --busy: expected an integer >= 0, got '{value}'")


@pytest.mark.slow
def test_serve_bench_runs_every_level_in_turns_and_reports_burst_and_later_requests_apart():
    report = run_json(TOOLS / "serve_bench.py", "--smoke", "--json")
    assert [row["clients"] for row in report["levels"]] == [1, 2] and not report["same_length"]
    for row in report["levels"]:
        (run,) = row["runs"]                                   # --smoke: one round
        assert run["requests"] == 2 * row["clients"] == row["requests"]
        # each client's replies add up to 2 x 4 tokens (give or take the rounding of each): eos is ignored
        assert abs(row["completion_tokens"] - 8 * row["clients"]) <= row["clients"]
        assert row["tokens_per_s"] == run["tokens_per_s"]                      # the median of one round
        assert run["tokens_per_s"] == pytest.approx(run["completion_tokens"] / run["seconds"], rel=0.05)
        assert 0 < row["ttft_p50_s"] <= row["ttft_p95_s"] and row["burst_ttft_p95_s"] > 0
    one, two = report["levels"]
    assert one["tokens_per_s_vs_1"] == 1.0
    assert two["tokens_per_s_vs_1"] == pytest.approx(two["tokens_per_s"] / one["tokens_per_s"], abs=0.01)
    assert two["ttft_p95_vs_1"] == pytest.approx(two["ttft_p95_s"] / one["ttft_p95_s"], abs=0.01)
    # one round: the best round is that round
    assert two["best_tokens_per_s"] == two["tokens_per_s"] and two["best_ttft_p95_s"] == two["ttft_p95_s"]
    assert two["best_tokens_per_s_vs_1"] == pytest.approx(two["tokens_per_s"] / one["tokens_per_s"], abs=0.01)


@pytest.mark.parametrize("argv, name", [(["--rounds", "0"], "--rounds"), (["--clients", "1,1"], "--clients"),
                                        (["--max-tokens", "x"], "--max-tokens")])
def test_serve_bench_refuses_a_bad_argument_in_one_line(argv, name):
    result = subprocess.run([sys.executable, str(TOOLS / "serve_bench.py"), *argv], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 2 and result.stdout == ""
    assert f"error: argument {name}: expected" in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.stderr
