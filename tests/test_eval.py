"""`python -m bcnp.eval`: the benchmarks' file layouts, prompts byte-identical to the cited scripts (golden strings
written from the scripts' format strings, docs/evaluation.md), scoring equal to a direct computation with
`Model.logits`, prefix-shared scoring equal to scoring each prompt alone, the category tables, and the command
line end to end on the demo model (tests/fixtures/eval is a question set of our own in each layout)."""
import io
import json
import os
import pathlib
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bcnp import Model
from bcnp.benchmarks import (BenchmarkError, Protocol, Question, Subject, as_pandas_prints, read_benchmark,
                             subject_table)
from bcnp.config import Config
from bcnp.demo import DEMO_NAME, build_demo_model
from bcnp.eval import (apply_repetition_penalty, category_accuracies, continuation_ids, loglikelihood_choice, main,
                       next_token_choice)
from bcnp.weights import random_weights
from bcnp.scoring import PrefixCache, log_softmax

DATA = pathlib.Path(__file__).parent / "fixtures" / "eval"
TOKENIZERS = os.environ.get("BCNP_TOKENIZER_DIR")


def scaled_error(a, b):
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def subject(task, name, pandas=False):
    return next(s for s in read_benchmark(task, DATA / task, pandas=pandas) if s.name == name)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return pathlib.Path(build_demo_model(tmp_path_factory.mktemp("cache") / DEMO_NAME))


@pytest.fixture(scope="module")
def demo(demo_dir):
    return Model.from_pretrained(demo_dir)


@pytest.fixture(scope="module")
def tiny_model():
    cfg = Config(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                 max_position=96, position_embedding="alibi")
    return Model(cfg, random_weights(cfg, seed=9, std=0.3))


# --- the files -----------------------------------------------------------------------------------------------------

def test_each_layout_reads_every_subject_with_its_categories():
    ceval = read_benchmark("ceval", DATA / "ceval")
    assert [s.name for s in ceval] == ["high_school_physics", "law", "mao_zedong_thought"]
    assert [len(s.dev) for s in ceval] == [5, 5, 5] and [len(s.test) for s in ceval] == [2, 2, 2]
    assert [s.categories for s in ceval] == [["STEM"], ["Humanities"], ["Social Sciences"]]
    mmlu = read_benchmark("mmlu", DATA / "mmlu")                    # the parent of Hendrycks' data/ too
    assert [s.name for s in mmlu] == ["abstract_algebra", "high_school_geography", "nutrition", "philosophy"]
    assert read_benchmark("mmlu", DATA / "mmlu" / "data")[0].test == mmlu[0].test
    cmmlu = read_benchmark("cmmlu", DATA / "cmmlu")
    assert cmmlu[0].name == "ancient_chinese" and cmmlu[0].categories == ["Social Sciences", "China Specific"]
    assert cmmlu[0].test[1] == Question("“不惑之年”指", ("三十岁", "四十岁", "五十岁", "六十岁"), "B")


def test_category_tables_have_every_subject_of_each_benchmark():
    sizes = {task: len(subject_table(task)["subjects"]) for task in ("ceval", "mmlu", "cmmlu")}
    assert sizes == {"ceval": 52, "mmlu": 57, "cmmlu": 67}
    counts = {c: 0 for c in subject_table("mmlu")["columns"]}
    for entry in subject_table("mmlu")["subjects"].values():
        counts[entry["categories"][0]] += 1
    assert counts == {"STEM": 18, "Social Sciences": 12, "Humanities": 13, "Others": 14}
    china = [n for n, e in subject_table("cmmlu")["subjects"].items() if "China Specific" in e["categories"]]
    assert len(china) == 15 and all(len(subject_table("cmmlu")["subjects"][n]["categories"]) == 2 for n in china)


@pytest.mark.parametrize("column, printed", [
    (["1", "2", "3"], ["1", "2", "3"]),              # int64
    (["07", "8"], ["7", "8"]),
    (["1", "0.5"], ["1.0", "0.5"]),                  # float64
    (["1", "None"], ["1.0", "nan"]),                 # a missing cell makes integers float
    (["1e5", "2"], ["100000.0", "2.0"]),
    (["x", "NA", ""], ["x", "nan", "nan"]),          # strings; NA strings are missing
    (["True", "false"], ["True", "False"]),          # bool
    (["True, True", "1"], ["True, True", "1"]),
])
def test_cells_print_as_pandas_types_them(column, printed):
    assert as_pandas_prints(column) == printed


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "no such directory"),
    (lambda d: (d / "test").mkdir() or (d / "test" / "nonsense_test.csv").write_text("q,a,b,c,d,A\n"),
     "'nonsense' is not a mmlu subject"),
    (lambda d: (d / "test").mkdir() or (d / "test" / "virology_test.csv").write_text("q,a,b,c,d,A\n"),
     r"dev/virology_dev.csv: no such file"),
    (lambda d: [(d / s).mkdir() for s in ("dev", "test")] and [
        (d / "dev" / "virology_dev.csv").write_text("q,a,b,c,d,E\n"),
        (d / "test" / "virology_test.csv").write_text("q,a,b,c,d,A\n")], "row 1 has the answer 'E'"),
    (lambda d: [(d / s).mkdir() for s in ("dev", "test")] and [
        (d / "dev" / "virology_dev.csv").write_text("q,a,b\n"),
        (d / "test" / "virology_test.csv").write_text("q,a,b,c,d,A\n")], "row 1 has 3 cells"),
])
def test_bad_files_are_errors_naming_them(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(BenchmarkError, match=message):
        read_benchmark("mmlu", tmp_path)


# --- the prompts, byte for byte --------------------------------------------------------------------------------------

def test_hf_datasets_shuffle_seed_123_of_five_dev_examples():
    # Dataset.shuffle(seed=123) draws np.random.default_rng(123).permutation(len): this order is its output
    law = subject("ceval", "law")
    assert Protocol("ceval", "baichuan").shot_pool(law) == [law.dev[i] for i in (4, 0, 2, 3, 1)]


def test_baichuan_ceval_prompt():
    law, p = subject("ceval", "law"), Protocol("ceval", "baichuan")
    expected = ("以下是中国关于法学考试的单项选择题，请选出其中的正确答案。\n"
                "\n完全民事行为能力人的年龄一般是\nA. 十六周岁以上\nB. 十八周岁以上\nC. 十周岁以上\nD. 八周岁以上\n答案：B"
                "\n我国的根本大法是\nA. 刑法\nB. 民法典\nC. 宪法\nD. 行政法\n答案：C"
                "\n我国现行宪法通过的年份是\nA. 1954年\nB. 1978年\nC. 1982年\nD. 1975年\n答案：")
    assert p.prompt("law", p.shot_pool(law)[:2], law.test[0]) == expected


def test_baichuan_ceval_zero_shot_uses_the_scripts_own_subject_name():
    mao, p = subject("ceval", "mao_zedong_thought"), Protocol("ceval", "baichuan")
    assert p.prompt(mao.name, [], mao.test[0]) == (
        "以下是中国关于毛泽东思想和中国特色社会主义理论概论考试的单项选择题，请选出其中的正确答案。\n\n"
        "新民主主义革命的领导阶级是\nA. 农民阶级\nB. 工人阶级\nC. 民族资产阶级\nD. 小资产阶级\n答案：")


def test_hendrycks_mmlu_prompt_with_pandas_cells():
    algebra, p = subject("mmlu", "abstract_algebra", pandas=True), Protocol("mmlu", "baichuan")
    assert p.pandas
    assert p.prompt(algebra.name, algebra.dev[:2], algebra.test[1]) == (
        "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
        "How many elements does the group Z_4 have?\nA. 2\nB. 4\nC. 8\nD. 1\nAnswer: B\n\n"
        "The identity element of (Z, +) is\nA. 1\nB. 0\nC. -1\nD. nan\nAnswer: B\n\n"
        "How many elements of order 2 are in Z_2 x Z_2?\nA. 3.0\nB. 1\nC. 2.0\nD. 4.0\nAnswer:")


def test_cmmlu_script_prompt():
    arts, p = subject("cmmlu", "arts", pandas=True), Protocol("cmmlu", "baichuan")
    assert p.prompt(arts.name, arts.dev[:1], arts.test[0]) == (
        "以下是关于艺术学的单项选择题，请直接给出正确答案的选项。\n\n"
        "题目：《蒙娜丽莎》的作者是\nA. 达·芬奇\nB. 米开朗基罗\nC. 拉斐尔\nD. 梵高\n答案是：A\n\n"
        "题目：《清明上河图》的作者是\nA. 张择端\nB. 吴道子\nC. 顾恺之\nD. 齐白石\n答案是：")


def test_lm_eval_prompts():
    physics = subject("ceval", "high_school_physics")
    assert Protocol("ceval", "lm-eval").prompt(physics.name, physics.dev[:1], physics.test[1]) == (
        "以下是中国关于高中物理的单项选择题，请选出其中的正确答案。\n\n"
        "物体做自由落体运动时，加速度的方向是\nA. 竖直向上\nB. 竖直向下\nC. 水平方向\nD. 不确定\n答案： B\n\n"
        "牛顿第一定律又叫\nA. 惯性定律\nB. 万有引力定律\nC. 能量守恒定律\nD. 欧姆定律\n答案：")   # question.strip()
    algebra = subject("mmlu", "abstract_algebra")
    assert Protocol("mmlu", "lm-eval").prompt(algebra.name, algebra.dev[:1], algebra.test[1]) == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "How many elements does the group Z_4 have?\nA. 2\nB. 4\nC. 8\nD. 1\nAnswer: B\n\n"
        "How many elements of order 2 are in Z_2 x Z_2?\nA. 3\nB. 1\nC. 2\nD. 4\nAnswer:")
    arts = subject("cmmlu", "arts")
    assert Protocol("cmmlu", "lm-eval").prompt(arts.name, arts.dev[:1], arts.test[0]) == (
        "以下是关于艺术学的单项选择题，请直接给出正确答案的选项。\n\n"
        "《蒙娜丽莎》的作者是\nA. 达·芬奇\nB. 米开朗基罗\nC. 拉斐尔\nD. 梵高\n答案： A\n\n"
        "《清明上河图》的作者是\nA. 张择端\nB. 吴道子\nC. 顾恺之\nD. 齐白石\n答案：")


def test_lm_eval_continuation_tokens_come_from_the_whole_encoding():
    def encode(text):                                   # a toy tokenizer: one id per character, "  " merged
        return [ord(c) for c in text.replace("  ", "\x01")]
    assert continuation_ids(encode, "Q:", " A") == ([ord("Q"), ord(":")], [ord(" "), ord("A")])
    assert continuation_ids(encode, "Q: ", "A") == ([ord("Q"), ord(":")], [ord(" "), ord("A")])   # space moved
    assert continuation_ids(encode, "Q ", " A") == ([ord("Q")], [1, ord("A")])


@pytest.mark.skipif(not TOKENIZERS, reason="BCNP_TOKENIZER_DIR (the real Baichuan tokenizers) not set")
def test_candidates_with_the_real_baichuan_tokenizer():
    from bcnp.tokenizer import Tokenizer
    t = Tokenizer(os.path.join(TOKENIZERS, "baichuan-13b.model"))
    assert Protocol("ceval", "baichuan").candidates(t) == [703, 731, 702, 743]          # "▁A" .. "▁D"
    assert [t.id_to_piece(i) for i in Protocol("cmmlu", "baichuan").candidates(t)] == ["A", "B", "C", "D"]
    assert continuation_ids(t.encode, "题目\n答案：", " A")[1] == [703]                # one token: " A"


# --- dropping shots to fit -----------------------------------------------------------------------------------------

def test_shots_are_dropped_last_first_until_the_prompt_fits():
    physics, p = subject("ceval", "high_school_physics"), Protocol("ceval", "baichuan")
    pool = p.shot_pool(physics)
    lengths = [len(p.prompt(physics.name, pool[:k], physics.test[0])) for k in range(6)]
    text, ids, used = p.fit(physics.name, pool, physics.test[0], list, lengths[3])   # one id per character
    assert used == 3 and text == p.prompt(physics.name, pool[:3], physics.test[0]) and len(ids) == lengths[3]


def test_cmmlu_drops_its_longest_shots_first():
    shots = [Question("x" * n, ("a", "b", "c", "d"), "A") for n in (5, 30, 10, 30)]
    arts, p = subject("cmmlu", "arts"), Protocol("cmmlu", "baichuan")
    fixed = len(p.prompt("arts", [], arts.test[0]))
    shot_len = [len(p.prompt("arts", [s], arts.test[0])) - fixed for s in shots]
    text, _, used = p.fit("arts", shots, arts.test[0], list, fixed + shot_len[0] + shot_len[2] + 1)
    assert used == 2 and text == p.prompt("arts", [shots[0], shots[2]], arts.test[0])   # both 30s went at once


# --- scoring --------------------------------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(1, 20), st.integers(0, 19)), min_size=1, max_size=6),
       st.integers(0, 2**31))
def test_prefix_shared_logits_equal_each_prompt_alone(tiny_model, prompts, seed):
    """Prompts that share prefixes of any length, in any order, through one PrefixCache."""
    rng = np.random.default_rng(seed)
    base = list(rng.integers(0, 61, 40))
    cache = PrefixCache(tiny_model)
    for shared, extra, start in prompts:
        ids = base[:shared] + list(rng.integers(0, 61, extra))
        start = min(start, len(ids) - 1)
        assert scaled_error(cache.logits(ids, start), tiny_model.logits(ids)[start:]) <= 1e-5


def test_baichuan_choice_is_the_argmax_of_the_candidates_next_token_logits(demo):
    physics, p = subject("ceval", "high_school_physics"), Protocol("ceval", "baichuan")
    candidates = p.candidates(demo.tokenizer)
    cache = PrefixCache(demo)
    for q in physics.test:
        ids = demo.tokenizer.encode(p.prompt(physics.name, p.shot_pool(physics)[:2], q))
        logits = demo.logits(ids)[-1]
        direct = [logits[c] / 1.1 if c in ids and logits[c] > 0 else logits[c] * 1.1 if c in ids else logits[c]
                  for c in candidates]
        choice, scores = next_token_choice(cache, ids, candidates, penalty=1.1)
        np.testing.assert_allclose(scores, direct, rtol=1e-5, atol=1e-6)
        assert choice == int(np.argmax(direct))


def test_repetition_penalty_divides_positive_and_multiplies_negative_scores_of_seen_tokens():
    assert apply_repetition_penalty([2.0, -2.0, 2.0, -2.0], [5, 6, 7, 8], [5, 6, 1], 2.0) == [1.0, -4.0, 2.0, -2.0]


def test_loglikelihood_equals_a_direct_sum_of_log_softmax(demo, tiny_model):
    """One-token continuations (the shared-logits path) and longer ones (one forward pass each)."""
    for model, context, continuations in ((demo, list(range(10, 60)), [[5], [7], [9], [11]]),
                                          (tiny_model, list(range(3, 40)), [[5], [7, 8], [9, 1, 2], [4, 4]])):
        choice, scores = loglikelihood_choice(PrefixCache(model), context, continuations)
        direct = []
        for cont in continuations:
            logprobs = log_softmax(model.logits(context + cont))
            direct.append(sum(logprobs[len(context) - 1 + i, token] for i, token in enumerate(cont)))
        np.testing.assert_allclose(scores, direct, rtol=1e-5)
        assert choice == int(np.argmax(direct))


# --- aggregation ------------------------------------------------------------------------------------------------------

def result(predictions, answers):
    return {"predictions": predictions, "answers": answers}


def test_mmlu_averages_over_questions_cmmlu_over_subjects():
    mmlu = category_accuracies("mmlu", {"abstract_algebra": result("AAAA", "AAAB"),       # STEM 3/4
                                        "college_physics": result("A", "B"),               # STEM 0/1
                                        "philosophy": result("AB", "AB")})                 # Humanities 2/2
    assert mmlu == {"STEM": 3 / 5, "Humanities": 1.0, "Average": 5 / 7}
    cmmlu = category_accuracies("cmmlu", {"ancient_chinese": result("AAAA", "AAAB"),       # Social, China: 3/4
                                          "arts": result("A", "B"),                         # Humanities: 0
                                          "chinese_history": result("AB", "AB")})           # Humanities, China: 1
    assert cmmlu == {"Humanities": 0.5, "Social Sciences": 0.75, "China Specific": (0.75 + 1) / 2,
                     "Average": (0.75 + 0 + 1) / 3}


# --- the command line ---------------------------------------------------------------------------------------------

def run_eval(*args):
    out, err = io.StringIO(), io.StringIO()
    status = main([str(a) for a in args], out=out, err=err)
    return status, out.getvalue(), err.getvalue()


TABLE_ROW = re.compile(r"\| (\S+) \| ((?:[\d.]+|-) \| )+")


@pytest.mark.parametrize("task", ["ceval", "mmlu", "cmmlu"])
def test_cli_table_json_and_resume(demo_dir, tmp_path, task):
    path = tmp_path / "results.json"
    args = ["--model", demo_dir, "--task", task, "--data", DATA / task, "--shots", 2, "--json", path]
    status, out, err = run_eval(*args)
    assert status == 0, err
    header = "| Model 2-shot | " + " | ".join(subject_table(task)["columns"]) + " | Average |"
    assert out.splitlines()[0] == header and TABLE_ROW.match(out.splitlines()[2])
    saved = json.loads(path.read_text(encoding="utf-8"))
    names = [s.name for s in read_benchmark(task, DATA / task)]
    assert list(saved["subjects"]) == names and saved["questions_per_second"] > 0
    for name, r in saved["subjects"].items():
        assert len(r["predictions"]) == 2 and set(r["predictions"]) <= set("ABCD")
        assert r["accuracy"] == sum(a == b for a, b in zip(r["predictions"], r["answers"])) / 2
    assert saved["categories"]["Average"] == pytest.approx(category_accuracies(task, saved["subjects"])["Average"])

    interrupted = json.loads(path.read_text(encoding="utf-8"))          # as if stopped before the last answer
    last = interrupted["subjects"][names[-1]]
    last["predictions"], last["answers"] = last["predictions"][:1], last["answers"][:1]
    path.write_text(json.dumps(interrupted), encoding="utf-8")
    status, out2, err = run_eval(*args)
    assert status == 0 and "resuming" in err and "[1 questions in" in err
    assert json.loads(path.read_text(encoding="utf-8"))["subjects"] == saved["subjects"] and out2 == out


def test_cli_lm_eval_protocol_quantized_with_limit(demo_dir):
    status, out, err = run_eval("--model", demo_dir, "--task", "mmlu", "--data", DATA / "mmlu",
                                "--protocol", "lm-eval", "--quantize", "4", "--limit", 1)
    assert status == 0, err
    assert "[4 questions in" in err and out.splitlines()[2].startswith(f"| {demo_dir.name}-int4 |")


def test_cli_says_when_shots_were_dropped(demo_dir):
    # the demo's context is 512 tokens; five C-Eval shots in its tiny tokenizer take more
    status, _, err = run_eval("--model", demo_dir, "--task", "ceval", "--data", DATA / "ceval", "--limit", 1)
    assert status == 0 and re.search(r"note: \w+: 1 prompts did not fit in 512 tokens with 5 shots", err)


def test_cli_refuses_a_json_of_other_settings_and_bad_arguments(demo_dir, tmp_path):
    path = tmp_path / "r.json"
    base = ["--model", demo_dir, "--task", "cmmlu", "--data", DATA / "cmmlu", "--limit", 1, "--json", path]
    assert run_eval(*base)[0] == 0
    status, _, err = run_eval(*base[:-2], "--shots", 1, "--json", path)
    assert status == 1 and "holds a run with other settings" in err
    for args, message in ((["--task", "mmlu"], "required: --data"),
                          (["--task", "mmlu", "--data", DATA / "mmlu", "--shots", "-1"], "--shots must be >= 0")):
        status, out, err = run_eval("--model", demo_dir, *args)
        assert status == 2 and out == "" and message in err and len(err.splitlines()) == 1
