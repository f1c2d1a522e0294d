"""Few-shot multiple-choice accuracy on C-Eval, MMLU or CMMLU, from the benchmarks' own files, offline.

    python -m bcnp.eval --model DIR --task mmlu --data mmlu/data [--shots 5] [--protocol baichuan|lm-eval]
                        [--limit N] [--json FILE] [--quantize 8|4] [--device cpu|cuda]

Prints the table of the Baichuan-13B model card (STEM / Social Sciences / Humanities / Others [/ China
Specific] / Average, in percent) and writes every subject's predictions and accuracy to --json, which is also
where an interrupted run resumes from. The prompts and the answer rule are those of the protocol's scripts
(bcnp.benchmarks; docs/evaluation.md cites them).

Speed: the few-shot prompts of one subject share their instruction and examples, so a `PrefixCache` computes
them once per subject and each question costs only its own tokens; all four choices come from one forward pass
(the baichuan protocol reads four logits of the last position; lm-eval's continuations " A" .. " D" are one
token each with Baichuan's tokenizer, so the same logits give their log-likelihoods).
"""
import json
import os
import sys
import time

import numpy as np

from .benchmarks import LETTERS, PROTOCOLS, TASKS, BenchmarkError, Protocol, read_benchmark, subject_table
from .errors import one_line, read_json_object
from .scoring import ArgumentParser, PrefixCache, UsageError, add_model_arguments, log_softmax, open_model

SAVE_EVERY_SECONDS = 30


# --- scoring one question ------------------------------------------------------------------------------------------

def apply_repetition_penalty(scores, candidates, ids, penalty):
    """Hugging Face's RepetitionPenaltyLogitsProcessor on the candidates' scores: a candidate that occurs in
    `ids` has a positive score divided by `penalty`, a negative one multiplied."""
    seen = set(ids)
    return [(s / penalty if s > 0 else s * penalty) if token in seen else s for s, token in zip(scores, candidates)]


def next_token_choice(cache, ids, candidates, penalty=1.0):
    """(index of the chosen letter, the four scores): the argmax of the next-token logits over `candidates`
    (np.argmax, as in the scripts: the first of equal scores)."""
    logits = cache.logits(ids)[-1]
    scores = [float(logits[c]) for c in candidates]
    if penalty != 1.0:
        scores = apply_repetition_penalty(scores, candidates, ids, penalty)
    return int(np.argmax(scores)), scores


def continuation_ids(encode, context, continuation):
    """lm-eval's `_encode_pair`: trailing spaces of the context move to the continuation; the continuation's
    tokens are those of encode(context + continuation) past len(encode(context))."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = encode(context)
    return context_ids, encode(context + continuation)[len(context_ids):]


def loglikelihood_choice(cache, context_ids, continuations):
    """(index of the most likely continuation, the log-likelihoods): each continuation's tokens scored after
    `context_ids`. One-token continuations share the context's last logits (one forward pass for all)."""
    start = len(context_ids) - 1
    if all(len(c) == 1 for c in continuations):
        logprobs = log_softmax(cache.logits(context_ids)[-1])
        scores = [float(logprobs[c[0]]) for c in continuations]
    else:
        scores = []
        for cont in continuations:
            logprobs = log_softmax(cache.logits(context_ids + cont, start=start))
            scores.append(float(sum(logprobs[i, token] for i, token in enumerate(cont))))
    return int(np.argmax(scores)), scores


class Scorer:
    """Asks the model for one question's answer under a protocol; keeps the prefix cache between questions."""

    def __init__(self, model, protocol, shots):
        self.model, self.protocol, self.shots = model, protocol, shots
        self.encode = model.tokenizer.encode
        self.cache = PrefixCache(model)
        self.candidates = protocol.candidates(model.tokenizer) if protocol.name == "baichuan" else None
        context = model.config.max_position
        self.limit = min(protocol.max_tokens or context, context)

    def answer(self, subject, pool, q):
        """(letter chosen, shots used) for question q of `subject` with the first shots of `pool`."""
        shots = pool[: self.shots]
        if self.protocol.name == "baichuan":
            _, ids, used = self.protocol.fit(subject.name, shots, q, self.encode, self.limit)
            self._check_fits(subject, ids)
            choice, _ = next_token_choice(self.cache, ids, self.candidates, self.protocol.repetition_penalty)
            return LETTERS[choice], used
        # lm-eval: the context plus its longest continuation must fit
        limit = self.limit - 2
        text, _, used = self.protocol.fit(subject.name, shots, q, self.encode, limit)
        pairs = [continuation_ids(self.encode, text, " " + letter) for letter in LETTERS]
        context_ids = pairs[0][0]
        self._check_fits(subject, context_ids + max((c for _, c in pairs), key=len))
        choice, _ = loglikelihood_choice(self.cache, context_ids, [c for _, c in pairs])
        return LETTERS[choice], used

    def _check_fits(self, subject, ids):
        if len(ids) > self.model.config.max_position:
            raise ValueError(f"{subject.name}: a question alone is {len(ids)} tokens; the model's context holds "
                             f"{self.model.config.max_position}")


# --- results: accuracy per subject and category, the table, the JSON --------------------------------------------------

def accuracy(result):
    return sum(p == a for p, a in zip(result["predictions"], result["answers"])) / max(len(result["answers"]), 1)


def category_accuracies(task, results):
    """{column: accuracy} in the model card's order, then "Average". MMLU (the Hendrycks script) averages over
    questions; C-Eval and CMMLU (their leaderboards, CMMLU's get_results) over subjects."""
    table = subject_table(task)
    by_question = task == "mmlu"
    out = {}
    for column in table["columns"] + ["Average"]:
        members = [r for name, r in results.items()
                   if column == "Average" or column in table["subjects"][name]["categories"]]
        members = [r for r in members if r["answers"]]
        if not members:
            continue
        if by_question:
            out[column] = (sum(accuracy(r) * len(r["answers"]) for r in members)
                           / sum(len(r["answers"]) for r in members))
        else:
            out[column] = sum(accuracy(r) for r in members) / len(members)
    return out


def format_table(task, model_name, shots, categories):
    columns = subject_table(task)["columns"] + ["Average"]
    head = f"| Model {shots}-shot | " + " | ".join(columns) + " |"
    rule = "|" + "---|" * (len(columns) + 1)
    row = f"| {model_name} | " + " | ".join(f"{100 * categories[c]:.1f}" if c in categories else "-"
                                            for c in columns) + " |"
    return "\n".join([head, rule, row])


def run_settings(args):
    return {"task": args.task, "protocol": args.protocol, "shots": args.shots, "limit": args.limit,
            "model": os.path.abspath(args.model), "quantize": args.quantize, "data": os.path.abspath(args.data)}


def load_results(path, settings):
    """The per-subject results of an earlier run with the same settings (to resume), else {}."""
    if not path or not os.path.exists(path):
        return {}
    saved = read_json_object(path, error=ValueError, what="results JSON")
    if saved.get("settings") != settings:
        raise ValueError(f"{path}: holds a run with other settings ({one_line(saved.get('settings'))}); "
                         "give another --json file or remove it")
    return saved.get("subjects", {})


def save_results(path, settings, results, summary):
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"settings": settings, **summary, "subjects": results}, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.replace(tmp, path)                            # a crash mid-write leaves the previous file whole


# --- the command line -------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = ArgumentParser(prog="python -m bcnp.eval", description="C-Eval / MMLU / CMMLU few-shot accuracy.")
    add_model_arguments(p)
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--data", metavar="DIR", required=True, help="the benchmark's files in its published layout")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--protocol", choices=PROTOCOLS, default="baichuan",
                   help="baichuan: the scripts behind Baichuan's model card; lm-eval: lm-evaluation-harness")
    p.add_argument("--limit", type=int, metavar="N", help="score only the first N questions of each subject")
    p.add_argument("--json", metavar="FILE", help="write the results here; an interrupted run resumes from it")
    args = p.parse_args(argv)
    if args.shots < 0:
        raise UsageError(f"--shots must be >= 0, got {args.shots}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    return args


def evaluate(model, protocol, subjects, shots, limit, results, save, err):
    """Score every subject's questions not yet in `results` (updated in place); `save()` is called now and then."""
    from tqdm import tqdm
    scorer = Scorer(model, protocol, shots)
    todo = {s.name: s.test[:limit] for s in subjects}
    total = sum(len(t) for t in todo.values())
    done = sum(len(results.get(name, {}).get("predictions", "")) for name in todo)
    last_save, start, n_scored = time.monotonic(), time.perf_counter(), 0
    with tqdm(total=total, initial=done, unit="q", file=err, dynamic_ncols=True) as bar:
        for subject in subjects:
            result = results.setdefault(subject.name, {"predictions": "", "answers": "", "shots_dropped": 0})
            pool = protocol.shot_pool(subject)
            if len(pool) < shots:
                bar.write(f"note: {subject.name} has {len(pool)} dev examples, fewer than --shots {shots}", file=err)
            bar.set_description(subject.name)
            for q in todo[subject.name][len(result["predictions"]):]:
                letter, used = scorer.answer(subject, pool, q)
                result["predictions"] += letter
                result["answers"] += q.answer
                if used < min(shots, len(pool)):
                    result["shots_dropped"] += 1
                n_scored += 1
                bar.update(1)
                if time.monotonic() - last_save > SAVE_EVERY_SECONDS:
                    save()
                    last_save = time.monotonic()
            result["accuracy"] = accuracy(result)
            if result["shots_dropped"]:
                bar.write(f"note: {subject.name}: {result['shots_dropped']} prompts did not fit in {scorer.limit} "
                          f"tokens with {shots} shots; shots were dropped to fit", file=err)
            save()
    seconds = time.perf_counter() - start
    return n_scored, seconds


def run(args, out, err):
    protocol = Protocol(args.task, args.protocol)
    subjects = read_benchmark(args.task, args.data, pandas=protocol.pandas)      # before the (slow) model
    model = open_model(args, err)
    settings = run_settings(args)
    results = load_results(args.json, settings)
    if results:
        err.write(f"{args.json}: resuming ({sum(len(r['predictions']) for r in results.values())} answers there)\n")
    name = os.path.basename(os.path.normpath(args.model)) + (f"-int{args.quantize}" if args.quantize else "")

    def summary():
        categories = category_accuracies(args.task, {k: v for k, v in results.items() if v["answers"]})
        return {"categories": categories}

    def save():
        save_results(args.json, settings, results, summary())

    try:
        n, seconds = evaluate(model, protocol, subjects, args.shots, args.limit, results, save, err)
    except KeyboardInterrupt:
        save()
        raise
    final = summary()
    if n:
        final["questions_per_second"] = n / seconds
        err.write(f"[{n} questions in {seconds:.1f} s, {n / seconds:.2f} questions/s]\n")
    save_results(args.json, settings, results, final)
    out.write(format_table(args.task, name, args.shots, final["categories"]) + "\n")
    return final


def main(argv=None, out=None, err=None):
    out, err = out or sys.stdout, err or sys.stderr
    try:
        run(parse_args(argv), out, err)
        return 0
    except UsageError as e:
        err.write(f"error: {one_line(e)}\n")
        return 2
    except (BenchmarkError, ValueError, OSError, RuntimeError, ImportError) as e:
        err.write(f"error: {one_line(e)}\n")
        return 1
    except KeyboardInterrupt:
        err.write("\ninterrupted; run the same command again to resume from --json\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
