"""A tiny Baichuan-13B-shaped chat checkpoint with random weights, for `python -m bcnp.generate --demo`.

It is laid out exactly like a released Hugging Face checkpoint (config.json, generation_config.json,
tokenizer_config.json, tokenizer.model, model.safetensors), so the demo runs the same code as the real 13B:
loader, chat template, ALiBi forward pass, sampling, streaming. Its weights are random, so what it says is
gibberish. The SentencePiece tokenizer is trained in a few milliseconds from bcnp/data/demo_corpus.txt.
"""
import io
import json
import os
import shutil
import tempfile

import numpy as np

DEMO_NAME = "demo-baichuan-13b-v1"      # bump when the recipe changes, so old caches are not reused
DEMO_SEED = 13
CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo_corpus.txt")

# Like the real tokenizer: <unk> <s> </s>, then user-defined pieces with <reserved_N> at id 93 + N, so the
# chat role tokens 195 and 196 are <reserved_102> and <reserved_103>. (The real file has HTML tags, digits and
# runs of spaces at ids 7-92; the demo holds unused placeholders there.)
USER_DEFINED_PIECES = (["<SEP>", "<CLS>", "\n", "\t"] + [f"<unused_{i}>" for i in range(86)]
                       + [f"<reserved_{i}>" for i in range(104)])
VOCAB_SIZE = 1000

# Baichuan-13B's architecture (ALiBi, SwiGLU, W_pack), scaled down. 6 heads: not a power of two, so the ALiBi
# slopes take the interleaved path that the real 40 heads take.
DEMO_SHAPE = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=6, max_position=512)


def demo_cache_dir():
    """$BCNP_CACHE_DIR, else $XDG_CACHE_HOME/bcnp, else ~/.cache/bcnp; the demo model lives in a subfolder."""
    root = os.environ.get("BCNP_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "bcnp")
    return os.path.join(root, DEMO_NAME)


def corpus_lines(path=CORPUS):
    with open(path, encoding="utf-8") as f:
        return [line for line in f.read().splitlines() if line.strip() and not line.startswith("#")]


def train_demo_tokenizer(vocab_size=VOCAB_SIZE):
    """The serialized tokenizer.model: SentencePiece BPE with byte fallback and nmt_nfkc, like Baichuan's."""
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=0.995,      # the rarest characters are spelled in bytes
        normalization_rule_name="nmt_nfkc", add_dummy_prefix=True, remove_extra_whitespaces=False,
        user_defined_symbols=USER_DEFINED_PIECES, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2)
    return model.getvalue()


def unprintable_ids(tokenizer_model):
    """The unknown, placeholder and byte pieces. Their lm_head rows are zero in the demo: a random model gives
    every other piece a random logit, of which the top-k are all positive, so it prints words and characters
    instead of <unused_7> and stray bytes."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_proto=tokenizer_model)
    return [i for i in range(sp.vocab_size())
            if sp.is_byte(i) or sp.is_unknown(i) or sp.id_to_piece(i) in USER_DEFINED_PIECES]


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_demo_model(directory):
    """Write every file of the demo checkpoint into `directory` (which exists)."""
    from safetensors.numpy import save_file

    from .config import Config
    from .weights import random_weights

    tokenizer_model = train_demo_tokenizer()
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(tokenizer_model)

    config = Config(vocab_size=VOCAB_SIZE, position_embedding="alibi", torch_dtype="float16", **DEMO_SHAPE)
    write_json(os.path.join(directory, "config.json"),
               {**config.to_hf_dict(), "initializer_range": 0.02, "use_cache": True})
    write_json(os.path.join(directory, "generation_config.json"), {
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "user_token_id": 195, "assistant_token_id": 196,
        "max_new_tokens": 64,           # the real model's 2048 would fill the demo's 512-token context
        "temperature": 0.3, "top_k": 5, "top_p": 0.85, "repetition_penalty": 1.1, "do_sample": True})
    write_json(os.path.join(directory, "tokenizer_config.json"), {
        "tokenizer_class": "BaichuanTokenizer", "add_bos_token": False, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
        "model_max_length": config.max_position, "clean_up_tokenization_spaces": False, "sp_model_kwargs": {}})

    weights = random_weights(config, seed=DEMO_SEED, dtype=np.float16)
    weights["lm_head.weight"][unprintable_ids(tokenizer_model)] = 0
    save_file(weights, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


def is_demo_model(directory):
    return all(os.path.isfile(os.path.join(directory, name))
               for name in ("config.json", "generation_config.json", "tokenizer.model", "model.safetensors"))


def build_demo_model(directory=None):
    """Path of the demo checkpoint, building it first if `directory` (default: the cache) does not hold it.

    Built in a temporary directory beside the target and renamed into place, so an interrupted build never
    leaves a directory that looks complete."""
    directory = os.path.abspath(directory or demo_cache_dir())
    if is_demo_model(directory):
        return directory
    if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
        raise FileExistsError(f"{directory}: exists and is not a demo model; remove it or choose another directory")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(directory) + "-", dir=parent)
    try:
        write_demo_model(tmp)
        if os.path.isdir(directory):
            os.rmdir(directory)                          # an empty directory the caller made for us
        try:
            os.rename(tmp, directory)
        except OSError:
            if not is_demo_model(directory):            # else another process built it at the same time
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return directory
