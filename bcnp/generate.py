"""Chat with a Baichuan model from the command line.

    python -m bcnp.generate --model DIR --prompt "世界上第二高的山峰是哪座？"     # one reply, then exit
    python -m bcnp.generate --model DIR                                          # interactive, multi-turn
    python -m bcnp.generate --demo                                               # a tiny random-weight model

The reply streams to stdout; a stats line (prompt tokens, prefill and decode speed, tokens generated) goes to
stderr. In the interactive chat, /reset forgets the conversation and /quit (or Ctrl-D) leaves; Ctrl-C during a
reply stops that reply and keeps the part already printed in the history (the model saw it, and so did you);
Ctrl-C at the prompt leaves (exit status 130). Every mistake a user can make ends with one line `error: ...` on
stderr and a non-zero exit status; a typed line that is not UTF-8 is refused alone, and the chat goes on.

The prompt goes through the chat template. When the conversation outgrows the context, the oldest rounds are
dropped first and then the room kept for the reply shrinks; the newest message itself is never cut: if it does
not fit with room for at least one new token, that is an error.
"""
import os
import sys
import time

from .chat import PromptTooLong
from .cli import (EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, ArgumentParser, Output, OutputError, UsageError,
                  error_line, run)
from .config import add_family_argument

# The sampling settings a user may set, with their flags (checked by bcnp.sampling's rules).
SETTING_FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
                 "top_p": "--top-p", "repetition_penalty": "--repetition-penalty"}




def add_model_arguments(p, demo_help):
    """What load_model reads: the model (--model or --demo), its quantization, family, device and cache dtype."""
    p.add_argument("--model", metavar="DIR", help="a Hugging Face checkpoint directory or one from bcnp.convert")
    p.add_argument("--demo", action="store_true", help=demo_help)
    p.add_argument("--quantize", type=int, choices=(8, 4), help="quantize the linear weights to 8 or 4 bits")
    add_family_argument(p)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--cache-dtype", choices=("float16", "float32"),
                   help="the KV cache's dtype (default: float16 for a quantized model, float32 for a float one; "
                        "float16 halves its memory and what each decode step reads)")


def parse_args(argv):
    p = ArgumentParser(prog="python -m bcnp.generate", description="Chat with a Baichuan-13B/7B model.")
    add_model_arguments(p, "use a tiny Baichuan-13B-shaped model with random weights (built once and cached)")
    p.add_argument("--prompt", metavar="TEXT", help="one user message; reply and exit (default: interactive chat)")
    p.add_argument("--system", metavar="TEXT", help="a system prompt")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="default: the checkpoint's generation_config")
    p.add_argument("--temperature", type=float, metavar="T")
    p.add_argument("--top-k", type=int, metavar="K", help="0 = off")
    p.add_argument("--top-p", type=float, metavar="P")
    p.add_argument("--repetition-penalty", type=float, metavar="R", help="1.0 = off")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")
    p.add_argument("--seed", type=int, metavar="S", help="seed for sampling (turn i of a chat uses S + i)")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    from .sampling import check_setting
    from .tokenizer import utf8_problem
    if args.demo == (args.model is not None):
        raise UsageError("give either --model DIR or --demo")
    for name, flag in SETTING_FLAGS.items():
        if getattr(args, name) is not None:
            try:
                check_setting(name, getattr(args, name), label=flag)
            except ValueError as e:
                raise UsageError(str(e)) from None
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    for flag, text in (("--prompt", args.prompt), ("--system", args.system)):    # a path may hold any bytes
        if text is not None and utf8_problem(text):
            raise UsageError(f"{flag} is not valid UTF-8 ({utf8_problem(text)})")


def load_model(args):
    from . import Model
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"--model {args.model}: no such directory")
    model = Model.from_pretrained(args.model, family=getattr(args, "family", None))
    if model.tokenizer is None:
        raise ValueError(f"{args.model}: no tokenizer.model (the chat needs the checkpoint's tokenizer)")
    if model.tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{args.model}: tokenizer.model has {model.tokenizer.vocab_size} pieces but the model's "
                         f"vocab_size is {model.config.vocab_size}")
    if args.quantize:
        model = model.quantize(args.quantize)
    if args.device == "cuda":
        model = model.cuda()
    if getattr(args, "cache_dtype", None):
        import numpy as np
        model.cache_dtype = np.dtype(args.cache_dtype)
    return model


def sampling_settings(args):
    """The generate() keywords the user set; None means the checkpoint's generation_config value."""
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, do_sample=False if args.greedy else None)


def reply(model, messages, settings, max_new_tokens, seed, out, err):
    """Stream the assistant's reply to `out`, the stats to `err`; return (reply text, interrupted)."""
    from .tokenizer import StreamDecoder
    ids, budget = model.chat_prompt(messages, max_new_tokens)
    decoder = StreamDecoder(model.tokenizer)
    pieces, n_tokens, interrupted = [], 0, False
    start = time.perf_counter()
    first = last = None
    tokens = model.generate(ids, max_new_tokens=budget, seed=seed, **settings)
    try:
        for token in tokens:
            last = time.perf_counter()
            first = first or last
            n_tokens += 1
            text = decoder.put(token)
            if text:
                pieces.append(text)
                out.write(text)
                out.flush()
    except KeyboardInterrupt:
        tokens.close()
        interrupted = True
    end = time.perf_counter()
    pieces.append(decoder.end())
    out.write(pieces[-1] + "\n")
    out.flush()
    if interrupted:
        err.write("[reply interrupted]\n")
    err.write(stats_line(len(ids), n_tokens, start, first, last, end) + "\n")
    err.flush()
    return "".join(pieces), interrupted


def stats_line(n_prompt, n_generated, start, first, last, end):
    # The first token comes out of the prefill; each later one is one decode step.
    prefill_time = (first or end) - start
    prefill = f"{n_prompt / prefill_time:.1f} tok/s" if prefill_time > 0 else "-"
    decode = f"{(n_generated - 1) / (last - first):.1f} tok/s" if n_generated > 1 and last > first else "-"
    return (f"[prompt {n_prompt} tokens, prefill {prefill}, decode {decode}, "
            f"{n_generated} tokens generated]")


def one_shot(model, args, out, err):
    messages = system_messages(args) + [{"role": "user", "content": args.prompt}]
    _, interrupted = reply(model, messages, sampling_settings(args), max_new_tokens(model, args), args.seed, out, err)
    return EXIT_INTERRUPTED if interrupted else 0


def interactive(model, args, out, err, read_line=None):
    """Multi-turn chat until /quit, end of input (status 0) or Ctrl-C at the prompt (130)."""
    from .tokenizer import utf8_problem
    read_line = read_line or prompt_reader()
    system, history, turn = system_messages(args), [], 0
    err.write("Chat with the model: /reset forgets the conversation, /quit or Ctrl-D leaves, "
              "Ctrl-C stops a reply.\n")
    while True:
        try:
            line = read_line()
        except EOFError:
            err.write("\n")
            return 0
        except KeyboardInterrupt:
            err.write("\n")
            return EXIT_INTERRUPTED
        if utf8_problem(line):
            err.write(error_line(f"that line is not valid UTF-8 ({utf8_problem(line)}); nothing was sent"))
            continue
        command = line.strip()
        if not command:
            continue
        if command in ("/quit", "/exit"):
            return 0
        if command == "/reset":
            history = []
            err.write("[conversation cleared]\n")
            continue
        messages = system + history + [{"role": "user", "content": line}]
        seed = None if args.seed is None else args.seed + turn
        try:
            response, _ = reply(model, messages, sampling_settings(args), max_new_tokens(model, args), seed, out, err)
        except PromptTooLong as e:
            err.write(error_line(e))
            continue
        history = messages[len(system):] + [{"role": "assistant", "content": response}]
        turn += 1


def prompt_reader():
    """input() with a prompt and line editing on a terminal; plain lines from a pipe (no prompt in the output)."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (gives input() line editing and history)
        except ImportError:
            pass
        return lambda: input("\nUser: ")
    return input


def system_messages(args):
    return [{"role": "system", "content": args.system}] if args.system else []


def max_new_tokens(model, args):
    return args.max_new_tokens                  # None: the chat's default policy (bcnp.chat.chat_prompt)


def main(argv=None, out=None, err=None):
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        args = parse_args(argv)
        out = Output(out)                       # before anything is built: stdout closed is an error now
        if args.demo:
            from .demo import build_demo_model
            args.model = build_demo_model()
            shape = "Baichuan2-13B-shaped (NormHead)" if getattr(args, "family", None) == "baichuan2" else "Baichuan-13B-shaped"
            err.write(f"demo: a tiny {shape} model with RANDOM weights ({args.model}); "
                      "its replies are gibberish.\n")
        model = load_model(args)
        if args.prompt is not None:
            return one_shot(model, args, out, err)
        return interactive(model, args, out, err)
    except UsageError as e:
        err.write(error_line(e))
        return EXIT_USAGE
    except BrokenPipeError:
        raise                                   # not a user error: whoever read our output went away
    except (OutputError, ValueError, OSError, RuntimeError, ImportError, MemoryError) as e:
        err.write(error_line(e))
        return EXIT_ERROR
    except KeyboardInterrupt:                   # in a reply, the first Ctrl-C is handled there; this is another
        err.write("\n")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    run(main)
