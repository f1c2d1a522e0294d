"""The benchmark model as a GGUF file, so that llama.cpp's own benchmarks time the same weights as bcnp's.

    python tools/llama_gguf.py OUT.gguf [--bits 4|8] [--layers 2] [--smoke] [--force]

It writes what `tools/bench.py` and `tools/serve_bench.py` run: `--layers` layers of Baichuan-13B's widths (hidden
5120, MLP 13696, 40 heads, vocabulary 64000), `bcnp.weights.random_weights(seed=0)`, in llama.cpp's "baichuan"
layout (W_pack split into attn_q / attn_k / attn_v, as its converter does). The linears are Q4_0 (--bits 4) or
Q8_0 (--bits 8), the output matrix Q8_0 (bcnp's lm_head is int8 in both modes), the embedding float16: bcnp's
quantized weights bit for bit (SPEC §4: its Q8_0/Q4_0 are gguf's). The vocabulary is made up (byte pieces and
"t<i>"): the benchmarks feed token ids, not text. --smoke: tiny widths (checks the script in a second).

llama.cpp, outside this repository (its source also ships inside the llama-cpp-python sdist, under vendor/):

    cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON && cmake --build build -j2 \\
        --target llama-bench llama-batched-bench
    build/bin/llama-bench -m OUT.gguf -t 2 -p 16,128,512 -n 32
    build/bin/llama-batched-bench -m OUT.gguf -t 2 -c 4096 -npp 16 -ntg 32 -npl 1,2,4,8,16

llama.cpp tells Baichuan-7B from 13B by the layer count (32 or 40) and applies ALiBi only to 13B: a 2-layer model
runs without any position bias unless `src/models/baichuan.cpp` also sets `f_max_alibi_bias = 8.0f` for
LLM_TYPE_UNKNOWN (one line; docs/performance.md says which way its numbers were taken). At the benchmarks'
lengths (up to 512 positions) the bias is a small part of a step either way.
"""
import argparse
import dataclasses
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bcnp.config import BAICHUAN_13B  # noqa: E402
from bcnp.weights import random_weights  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the .gguf file to write (not replaced unless --force)")
    p.add_argument("--bits", type=int, choices=(4, 8), default=4, help="the linears' Q4_0 or Q8_0 (default 4)")
    p.add_argument("--layers", type=int, default=2, help="13B-width layers (default 2)")
    p.add_argument("--smoke", action="store_true", help="tiny widths: checks the script")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    if args.layers < 1:
        p.error(f"--layers must be >= 1, got {args.layers}")
    return args


def bench_config(layers, smoke):
    if smoke:       # multiples of 32 (the blocks); a vocabulary with room for the 256 byte pieces and 3 specials
        return dataclasses.replace(BAICHUAN_13B, num_hidden_layers=layers, hidden_size=128, intermediate_size=352,
                                   num_attention_heads=4, vocab_size=512)
    return dataclasses.replace(BAICHUAN_13B, num_hidden_layers=layers)


def vocabulary(size):
    """(pieces, types) of a made-up SentencePiece vocabulary: <unk>, <s>, </s>, the 256 byte pieces, then "▁t<i>"
    (llama.cpp's types: 1 normal, 2 unknown, 3 control, 6 byte)."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces += [f"\u2581t{i}" for i in range(size - len(pieces))]
    return pieces, types + [1] * (size - len(types))


def write_gguf(path, config, bits):
    import gguf
    linear = gguf.GGMLQuantizationType.Q4_0 if bits == 4 else gguf.GGMLQuantizationType.Q8_0
    w = random_weights(config, seed=0)
    writer = gguf.GGUFWriter(path, "baichuan")
    writer.add_context_length(config.max_position)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if bits == 4 else gguf.LlamaFileType.MOSTLY_Q8_0)
    pieces, types = vocabulary(config.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores([0.0] * len(pieces))
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def put(name, array, kind):
        array = np.ascontiguousarray(array, dtype=np.float32)
        if kind == "f16":
            writer.add_tensor(name, array.astype(np.float16))
        elif kind == "f32":
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)

    put("token_embd.weight", w["model.embed_tokens.weight"], "f16")
    put("output_norm.weight", w["model.norm.weight"], "f32")
    put("output.weight", w["lm_head.weight"], gguf.GGMLQuantizationType.Q8_0)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", w[p + "input_layernorm.weight"], "f32")
        for name, part in zip(("attn_q", "attn_k", "attn_v"), np.split(w[p + "self_attn.W_pack.weight"], 3)):
            put(f"blk.{i}.{name}.weight", part, linear)
        put(f"blk.{i}.attn_output.weight", w[p + "self_attn.o_proj.weight"], linear)
        put(f"blk.{i}.ffn_norm.weight", w[p + "post_attention_layernorm.weight"], "f32")
        for name in ("gate", "up", "down"):
            put(f"blk.{i}.ffn_{name}.weight", w[p + f"mlp.{name}_proj.weight"], linear)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main(argv=None):
    args = parse_args(argv)
    if os.path.exists(args.out) and not args.force:
        print(f"error: {args.out}: exists; pass --force to replace it", file=sys.stderr)
        return 1
    try:
        import gguf  # noqa: F401
    except ImportError:
        print("error: the gguf package is missing (a test extra: pip install -e '.[test]')", file=sys.stderr)
        return 1
    config = bench_config(args.layers, args.smoke)
    tmp = f"{args.out}.tmp-{os.getpid()}"
    try:
        write_gguf(tmp, config, args.bits)
        os.replace(tmp, args.out)            # a finished file, or none: never half a GGUF under OUT's name
    except OSError as e:
        print(f"error: {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"wrote {args.out}: {config.num_hidden_layers} layers of width {config.hidden_size}, "
          f"Q{args.bits}_0 linears, Q8_0 output, {os.path.getsize(args.out) / 1e6:.1f} MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
