"""C-Eval, MMLU and CMMLU as their authors publish them: readers of each benchmark's own file layout, the
subject -> category tables, and the prompts of the two protocols `python -m bcnp.eval` reproduces.

Layouts (the directory given to --data):
- C-Eval (ceval-exam.zip): `dev/{subject}_dev.csv` (header id,question,A,B,C,D,answer,explanation) and
  `val/{subject}_val.csv` (id,question,A,B,C,D,answer). The test split has no answers; val is scored.
- MMLU (Hendrycks' data.tar, `data/` or its parent): `dev/{subject}_dev.csv`, `test/{subject}_test.csv`, no
  header, columns question,A,B,C,D,answer.
- CMMLU: `dev/{subject}.csv`, `test/{subject}.csv`, header `,Question,A,B,C,D,Answer` (the first column is
  pandas' index).

Protocols (see docs/evaluation.md for the sources, quoted with their commits):
- "baichuan": the scripts behind the Baichuan-13B model card's tables: Baichuan-7B's evaluation/evaluate_zh.py
  (C-Eval) and evaluate_mmlu.py (MMLU, the Hendrycks format), and CMMLU's own src/mp_utils.py with
  hf_causal_model.py (the card cites CMMLU's "official evaluation scheme"). The answer is the argmax of the
  next-token logits over four candidate tokens.
- "lm-eval": lm-evaluation-harness's tasks mmlu, ceval-valid and cmmlu: the log-likelihood of " A" .. " D"
  after the prompt.
"""
import csv
import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "benchmark_subjects.json")
LETTERS = ("A", "B", "C", "D")
TASKS = ("ceval", "mmlu", "cmmlu")
PROTOCOLS = ("baichuan", "lm-eval")


class BenchmarkError(ValueError):
    pass


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple          # the texts of A, B, C, D
    answer: str             # "A" .. "D"


@dataclass
class Subject:
    name: str
    dev: list               # the few-shot examples, in file order
    test: list              # the questions scored (C-Eval: val)
    categories: list = field(default_factory=list)


def subject_table(task):
    with open(DATA, encoding="utf-8") as f:
        return json.load(f)[task]


# --- reading the files -----------------------------------------------------------------------------------------------

# pandas.read_csv's default NA strings: the Hendrycks and CMMLU scripts read their CSVs with pandas, so such a
# cell reaches their prompts as "nan"
PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
             "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
INTEGER = re.compile(r"\s*[+-]?\d+\s*")
FLOAT = re.compile(r"\s*[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|inf|Inf|INF|infinity|Infinity)\s*")
BOOLEAN = {"True": "True", "TRUE": "True", "true": "True", "False": "False", "FALSE": "False", "false": "False"}


def as_pandas_prints(column):
    """The cells of one CSV column as the pandas-based scripts print them. pandas types each column from all
    its cells: all integers -> int64 ("07" prints 7); numbers with a fraction, or integers next to a missing
    cell -> float64 ("1" prints 1.0); all booleans -> bool; else strings. Missing (NA) cells print "nan"."""
    present = [c for c in column if c not in PANDAS_NA]
    missing = len(present) < len(column)
    if present and all(INTEGER.fullmatch(c) for c in present) and not missing:
        return [str(int(c)) for c in column]
    if all(FLOAT.fullmatch(c) for c in present):                 # (all cells missing: float64 too)
        return ["nan" if c in PANDAS_NA else repr(float(c)) for c in column]
    if present and all(c in BOOLEAN for c in present):
        return ["nan" if c in PANDAS_NA else BOOLEAN[c] for c in column]
    return ["nan" if c in PANDAS_NA else c for c in column]


def read_csv(path, header):
    """The rows of a UTF-8 CSV file (the header row checked and dropped when `header` is given)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise BenchmarkError(f"{path}: no such file") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise BenchmarkError(f"{path}: not a UTF-8 CSV file ({e})") from None
    if header is not None:
        if not rows or [c.strip() for c in rows[0][:len(header)]] != header:
            raise BenchmarkError(f"{path}: expected the header {','.join(header)}")
        rows = rows[1:]
    return rows


def questions(path, rows, columns, pandas):
    """Question objects from rows whose `columns` (indices of question, A, B, C, D, answer) are set."""
    width = max(columns) + 1
    for i, row in enumerate(rows):
        if len(row) < width:
            raise BenchmarkError(f"{path}: row {i + 1} has {len(row)} cells, expected at least {width}")
    cells = [[row[c] for c in columns] for row in rows]
    if pandas and cells:
        cells = [list(r) for r in zip(*[as_pandas_prints(list(col)) for col in zip(*cells)])]
    out = []
    for i, (q, a, b, c, d, answer) in enumerate(cells):
        if answer.strip().upper() not in LETTERS:
            raise BenchmarkError(f"{path}: row {i + 1} has the answer {answer!r}, expected one of A B C D")
        out.append(Question(q, (a, b, c, d), answer.strip().upper()))
    return out


def layout(task, data_dir):
    """(dev file, scored file, header, columns) patterns of a task; MMLU accepts Hendrycks' `data/` parent."""
    if task == "ceval":
        return ("dev/{}_dev.csv", "val/{}_val.csv", ["id", "question", "A", "B", "C", "D", "answer"],
                [1, 2, 3, 4, 5, 6], data_dir)
    if task == "mmlu":
        if not os.path.isdir(os.path.join(data_dir, "test")) and os.path.isdir(os.path.join(data_dir, "data", "test")):
            data_dir = os.path.join(data_dir, "data")
        return "dev/{}_dev.csv", "test/{}_test.csv", None, [0, 1, 2, 3, 4, 5], data_dir
    if task == "cmmlu":
        return "dev/{}.csv", "test/{}.csv", ["", "Question", "A", "B", "C", "D", "Answer"], [1, 2, 3, 4, 5, 6], data_dir
    raise BenchmarkError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def read_benchmark(task, data_dir, pandas=False):
    """Every subject whose scored file is in `data_dir`, sorted by name (as the scripts run them).
    `pandas`: cells as the pandas-based scripts print them (the Hendrycks and CMMLU scripts)."""
    dev_pattern, test_pattern, header, columns, data_dir = layout(task, data_dir)
    test_dir = os.path.join(data_dir, os.path.dirname(test_pattern))
    if not os.path.isdir(test_dir):
        raise BenchmarkError(f"{test_dir}: no such directory (--data should hold the {task} files: "
                             f"{dev_pattern.format('SUBJECT')}, {test_pattern.format('SUBJECT')})")
    suffix = os.path.basename(test_pattern.format(""))
    names = sorted(f[: -len(suffix)] for f in os.listdir(test_dir) if f.endswith(suffix))
    if not names:
        raise BenchmarkError(f"{test_dir}: no {test_pattern.format('SUBJECT')} files")
    table = subject_table(task)["subjects"]
    subjects = []
    for name in names:
        if name not in table:
            raise BenchmarkError(f"{os.path.join(data_dir, test_pattern.format(name))}: {name!r} is not a "
                                 f"{task} subject")
        read = {}
        for split, pattern in (("dev", dev_pattern), ("test", test_pattern)):
            path = os.path.join(data_dir, pattern.format(name))
            read[split] = questions(path, read_csv(path, header), columns, pandas)
        subjects.append(Subject(name, read["dev"], read["test"], table[name]["categories"]))
    return subjects


# --- the prompts of Baichuan's scripts -------------------------------------------------------------------------------

def baichuan_ceval_example(q, with_answer):
    # evaluate_zh.py CEval.build_an_example_prompt
    choices = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, q.choices))
    return f"{q.question}\n{choices}\n答案：{q.answer if with_answer else ''}"


def baichuan_ceval_prompt(subject, shots, q):
    # evaluate_zh.py CEval.build_prompt: the instruction line, then "\n" + each example
    table = subject_table("ceval")
    name = table["baichuan_zh"].get(subject, table["subjects"][subject]["zh"])
    prompt = f"以下是中国关于{name}考试的单项选择题，请选出其中的正确答案。\n"
    for shot in shots:
        prompt += "\n" + baichuan_ceval_example(shot, True)
    return prompt + "\n" + baichuan_ceval_example(q, False)


def baichuan_ceval_shots(dev):
    """`dataset['dev'].shuffle(seed=123)`: Hugging Face datasets draws the order with NumPy's
    `default_rng(seed).permutation(len)`."""
    return [dev[i] for i in np.random.default_rng(123).permutation(len(dev))]


def hendrycks_example(q, with_answer):
    # evaluate_mmlu.py format_example
    prompt = q.question + "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, q.choices)) + "\nAnswer:"
    return prompt + (f" {q.answer}\n\n" if with_answer else "")


def hendrycks_prompt(subject, shots, q):
    # evaluate_mmlu.py gen_prompt; format_subject puts a space before every word, hence "about  abstract algebra"
    words = "".join(" " + part for part in subject.split("_"))
    prompt = f"The following are multiple choice questions (with answers) about {words}.\n\n"
    return prompt + "".join(hendrycks_example(s, True) for s in shots) + hendrycks_example(q, False)


def cmmlu_example(q, with_answer):
    # CMMLU src/mp_utils.py format_example
    prompt = "题目：" + q.question + "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, q.choices))
    return prompt + "\n答案是：" + (f"{q.answer}\n\n" if with_answer else "")


def cmmlu_instruction(subject):
    return f"以下是关于{subject_table('cmmlu')['subjects'][subject]['zh']}的单项选择题，请直接给出正确答案的选项。\n\n"


def cmmlu_prompt(subject, shots, q):
    return cmmlu_instruction(subject) + "".join(cmmlu_example(s, True) for s in shots) + cmmlu_example(q, False)


# --- the prompts of lm-evaluation-harness ----------------------------------------------------------------------------

def lm_eval_description(task, subject):
    # the `description` of each task's generated YAML (_generate_configs.py)
    if task == "mmlu":
        return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    zh = subject_table(task)["subjects"][subject]["zh"]
    if task == "ceval":
        return f"以下是中国关于{zh}的单项选择题，请选出其中的正确答案。\n\n"
    return f"以下是关于{zh}的单项选择题，请直接给出正确答案的选项。\n\n"


def lm_eval_doc_to_text(task, q):
    # doc_to_text of _default_template_yaml / _default_ceval_yaml: the question stripped, the choices as they are
    end = "Answer:" if task == "mmlu" else "答案："
    choices = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, q.choices))
    return f"{q.question.strip()}{choices}\n{end}"


def lm_eval_context(task, subject, shots, q):
    """description + each shot (doc_to_text, target_delimiter " ", its letter, fewshot_delimiter "\\n\\n") +
    doc_to_text; the continuations scored are " A" .. " D"."""
    shots_text = "".join(f"{lm_eval_doc_to_text(task, s)} {s.answer}\n\n" for s in shots)
    return lm_eval_description(task, subject) + shots_text + lm_eval_doc_to_text(task, q)


# --- a protocol: which prompt, which shots, how it is cut to fit, what is scored ------------------------------------

@dataclass(frozen=True)
class Protocol:
    task: str
    name: str

    @property
    def pandas(self):
        """Whether the protocol's script reads the CSVs with pandas (and so prints numbers its way)."""
        return self.name == "baichuan" and self.task in ("mmlu", "cmmlu")

    @property
    def max_tokens(self):
        """The scripts' own prompt limit (None: the model's context)."""
        return 2048 if self.name == "baichuan" and self.task in ("mmlu", "cmmlu") else None

    @property
    def repetition_penalty(self):
        """evaluate_zh.py reads the scores of `model.generate(..., repetition_penalty=1.1)`: the penalty applies
        to the candidates that occur in the prompt."""
        return 1.1 if self.name == "baichuan" and self.task == "ceval" else 1.0

    def shot_pool(self, subject):
        if self.name == "baichuan" and self.task == "ceval":
            return baichuan_ceval_shots(subject.dev)
        return list(subject.dev)                       # the others take the first dev examples in file order

    def prompt(self, subject, shots, q):
        if self.name == "lm-eval":
            return lm_eval_context(self.task, subject, shots, q)
        return {"ceval": baichuan_ceval_prompt, "mmlu": hendrycks_prompt, "cmmlu": cmmlu_prompt}[self.task](
            subject, shots, q)

    def candidates(self, tokenizer):
        """The token ids whose next-token logits are compared (the baichuan protocol)."""
        if self.task == "cmmlu":                       # hf_causal_model.py: convert_tokens_to_ids("A")
            return [tokenizer.piece_to_id(letter) for letter in LETTERS]
        return [tokenizer.encode(letter)[-1] for letter in LETTERS]   # tokenizer.encode("A")[-1]: "▁A"

    def fit(self, subject, shots, q, encode, limit):
        """(prompt, its token ids, shots kept) with at most `limit` tokens; shots are dropped as the script does
        (CMMLU's: the longest ones; the others': the last first)."""
        if self.name == "baichuan" and self.task == "cmmlu":
            return self._fit_cmmlu(subject, shots, q, encode, limit)
        k = len(shots)
        while True:
            text = self.prompt(subject, shots[:k], q)
            ids = encode(text)
            if len(ids) <= limit or k == 0:
                return text, ids, k
            k -= 1

    def _fit_cmmlu(self, subject, shots, q, encode, limit):
        # mp_utils.py gen_prompt: drop every shot of the largest token count while the shots take
        # >= limit - (instruction + question) tokens; without room even for those, the question alone
        instruction, end = cmmlu_instruction(subject), cmmlu_example(q, False)
        fixed = len(encode(instruction) + encode(end))
        if fixed > limit:
            return end, encode(end), 0
        kept = [(s, len(encode(cmmlu_example(s, True)))) for s in shots]
        while kept and sum(n for _, n in kept) >= limit - fixed:
            longest = max(n for _, n in kept)
            kept = [(s, n) for s, n in kept if n != longest]
        text = instruction + "".join(cmmlu_example(s, True) for s, _ in kept) + end
        return text, encode(text), len(kept)
