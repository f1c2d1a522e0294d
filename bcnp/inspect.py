"""What is in a Baichuan model: architecture, tensors, parameter counts, positions, memory, generation defaults.

    python -m bcnp.inspect MODEL_DIR [--tensors] [--json]       # a Hugging Face or a bcnp.convert directory
    python -m bcnp.inspect --preset 13b|7b|b2-13b|b2-7b [--tensors] [--json]  # the released shapes, no files

Without --tensors the tensors are listed once per name pattern (the 40 layers of the 13B share one line each:
`model.layers.{i}.mlp.up_proj.weight  x40 ...`), which still accounts for every tensor; --tensors lists each one
with the file it is stored in. --json prints the whole report (always with every tensor) as JSON. Byte counts are
exact; GB means 10^9 bytes. Nothing is read but the headers: values stay on disk.

`inspect_model(path_or_config)` computes the report as a dict; `format_report(report)` turns it into the text.
"""
import dataclasses
import json
import os
import re
import sys

import numpy as np

from .cli import EXIT_ERROR, EXIT_USAGE, ArgumentParser, Output, OutputError, UsageError, error_line, run
from .config import BAICHUAN2_7B, BAICHUAN2_13B, BAICHUAN_7B, BAICHUAN_13B, Config, add_family_argument
from .layout import BLOCK_SIZE

PRESETS = {"13b": BAICHUAN_13B, "7b": BAICHUAN_7B, "b2-13b": BAICHUAN2_13B, "b2-7b": BAICHUAN2_7B}
PRESET_NAMES = {"13b": "Baichuan-13B", "7b": "Baichuan-7B", "b2-13b": "Baichuan2-13B", "b2-7b": "Baichuan2-7B"}
BLOCK = BLOCK_SIZE                            # values per quantization block (bcnp.layout)
BLOCK_BYTES = {8: 2 + BLOCK, 4: 2 + BLOCK // 2}   # Q8_0: a float16 scale + 32 int8; Q4_0: the scale + 16 nibble bytes
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1}
PARAMETER_KINDS = ("embedding", "attention.W_pack", "attention.o_proj", "mlp", "norms", "lm_head")


# --- the pieces of the report ----------------------------------------------------------------------------------

def parameter_kind(name):
    """Which part of the model a weight belongs to (one of PARAMETER_KINDS)."""
    if name == "model.embed_tokens.weight":
        return "embedding"
    if name == "lm_head.weight":
        return "lm_head"
    if name.endswith("self_attn.W_pack.weight"):
        return "attention.W_pack"
    if name.endswith("self_attn.o_proj.weight"):
        return "attention.o_proj"
    if ".mlp." in name:
        return "mlp"
    if name.endswith("norm.weight"):
        return "norms"
    raise ValueError(f"{name}: not a Baichuan weight")


def parameter_counts(config):
    """Parameters by kind and in total, from the shapes the config implies (quantization does not change them)."""
    counts = dict.fromkeys(PARAMETER_KINDS, 0)
    for name, shape in config.weight_shapes().items():
        counts[parameter_kind(name)] += int(np.prod(shape, dtype=np.int64))
    counts["total"] = sum(counts.values())
    return counts


def quantized_nbytes(shape, bits):
    """Bytes of one (out, in) weight in bcnp's block format: rows padded to whole blocks of 32."""
    out_features, in_features = shape
    return out_features * -(-in_features // BLOCK) * BLOCK_BYTES[bits]


def weight_bytes(config, precision):
    """Bytes of all weights at `precision`: 'float32', 'float16'/'bfloat16' (2 bytes each), 'int8' or 'int4'.

    int8/int4 follow what bcnp.convert writes and Model.quantize keeps: every linear weight in blocks (lm_head at
    8 bits in both modes), the embedding as float16, the norms as float16 (a few KB; in memory they are float32)."""
    from .quant import is_linear
    bits = {"int8": 8, "int4": 4}.get(precision)
    total = 0
    for name, shape in config.weight_shapes().items():
        n = int(np.prod(shape, dtype=np.int64))
        if bits is None:
            total += n * ITEMSIZE[precision]
        elif is_linear(name):
            total += quantized_nbytes(shape, 8 if name == "lm_head.weight" else bits)
        else:
            total += n * 2
    return total


def kv_cache_bytes(config, itemsize, tokens=None):
    """Keys and values of every layer for `tokens` positions (default: the whole context)."""
    tokens = config.max_position if tokens is None else tokens
    return 2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * tokens * itemsize


def positions_report(config):
    from .forward import alibi_slopes
    from .weights import rope_inv_freq
    if config.position_embedding == "alibi":
        return {"kind": "alibi", "alibi_slopes": [float(s) for s in alibi_slopes(config.num_attention_heads)]}
    return {"kind": "rope", "rope_theta": config.rope_theta,
            "rope_inv_freq": [float(f) for f in rope_inv_freq(config)]}


def architecture_report(config):
    arch = config.to_hf_dict()["architectures"][0]
    matches = next((PRESET_NAMES[k] for k, p in PRESETS.items()
                    if dataclasses.replace(p, torch_dtype=config.torch_dtype) == config), None)
    return {"arch": arch, "family": config.family, "matches": matches, "positions": config.position_embedding,
            "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_attention_heads": config.num_attention_heads, "head_dim": config.head_dim,
            "num_hidden_layers": config.num_hidden_layers, "vocab_size": config.vocab_size,
            "context": config.max_position, "rms_norm_eps": config.rms_norm_eps, "torch_dtype": config.torch_dtype}


def memory_report(config):
    kv_tokens = config.max_position
    return {"weights": {p: weight_bytes(config, p) for p in ("bfloat16", "float16", "float32", "int8", "int4")},
            "kv_cache": {"tokens": kv_tokens,
                         "float32": kv_cache_bytes(config, 4), "float16": kv_cache_bytes(config, 2),
                         "float32_per_token": kv_cache_bytes(config, 4, 1),
                         "float16_per_token": kv_cache_bytes(config, 2, 1)}}


# --- the report ------------------------------------------------------------------------------------------------

def inspect_model(source, family=None):
    """The report (a JSON-ready dict) for a model directory (Hugging Face or bcnp.convert) or a `Config`.

    A Config stands for the released checkpoint: its tensors are listed as stored in `config.torch_dtype`, and
    the generation defaults are Baichuan-13B-Chat's (Baichuan2-Chat's repetition_penalty 1.05 for Baichuan2).
    `family` overrides a directory's (see bcnp.config.model_family)."""
    from .sampling import GenerationConfig
    if isinstance(source, Config):
        config, quantization, files, form = source, None, [], "preset"
        tensors = [{"name": name, "dtype": config.torch_dtype, "shape": list(shape),
                    "nbytes": int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[config.torch_dtype], "file": None}
                   for name, shape in config.weight_shapes().items()]
        name = architecture_report(config)["matches"] or "this Config"
        generation = GenerationConfig()
        if config.family == "baichuan2":
            generation = dataclasses.replace(generation, repetition_penalty=1.05)   # its generation_config.json
        where, generation_source = f"{name} (its released shapes and dtype; no files read)", "defaults"
    else:
        where = os.fspath(source)
        config, quantization, tensors, files = read_model_dir(where, family)
        form = "huggingface" if quantization is None else "bcnp"
        generation = GenerationConfig.from_json(where, config.vocab_size)
        path = os.path.join(where, "generation_config.json")
        generation_source = path if os.path.isfile(path) else "defaults"
    return {"source": where,
            "format": form,
            "architecture": architecture_report(config),
            "tensors": tensors,
            "num_tensors": len(tensors),
            "stored_bytes": sum(t["nbytes"] for t in tensors),
            "files": files,
            "parameters": parameter_counts(config),
            "position_encoding": positions_report(config),
            "quantization": quantization,
            "memory": memory_report(config),
            "generation": dataclasses.asdict(generation),
            "generation_source": generation_source}


def read_model_dir(directory, family=None):
    """(config, quantization or None, tensors in model order, files) of a model directory; checks every shape."""
    from . import checkpoint
    config, bcnp_section, found = checkpoint.read_model_dir(directory, family)
    quantization = None
    if bcnp_section is not None:
        q = bcnp_section.get("quantization") or {}
        quantization = {"bits": q.get("bits"), "block_size": q.get("block_size"),
                        "format_version": bcnp_section.get("format_version"),
                        "source_dtype": bcnp_section.get("source_dtype"),
                        "float_dtype": bcnp_section.get("float_dtype", "float16")}   # format 1: all float16
    tensors = [{"name": name, "dtype": found[name].dtype, "shape": list(found[name].shape),
                "nbytes": found[name].nbytes, "file": os.path.basename(found[name].path)} for name in found]
    paths = sorted({t.path for t in found.values()})
    files = [{"file": os.path.basename(p), "bytes": os.path.getsize(p)} for p in paths]
    return config, quantization, tensors, files


# --- the text --------------------------------------------------------------------------------------------------

def layer_pattern(name):
    return re.sub(r"^model\.layers\.\d+\.", "model.layers.{i}.", name)


def group_tensors(tensors):
    """[(pattern, count, dtype, shape, bytes each)] in order of first appearance: one line per per-layer tensor."""
    groups = {}
    for t in tensors:
        key = (layer_pattern(t["name"]), t["dtype"], tuple(t["shape"]))
        if key in groups:
            groups[key][1] += 1
        else:
            groups[key] = [key[0], 1, t["dtype"], key[2], t["nbytes"]]
    return [tuple(g) for g in groups.values()]


def gb(n):
    """n bytes in decimal units (GB = 10^9 bytes, as checkpoint sizes are quoted)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def shape_text(shape):
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def format_report(r, all_tensors=False):
    a, out = r["architecture"], []
    out.append(f"{r['source']}  [{r['format']}]")
    positions = "ALiBi (attention bias, no position embedding)" if a["positions"] == "alibi" \
        else "RoPE (rotary q/k, rotate_half style)"
    family = "Baichuan2 (NormHead: lm_head rows normalised)" if a["family"] == "baichuan2" else "Baichuan"
    rows = [("architecture", a["arch"] + (f"  (the shapes of {a['matches']})" if a["matches"] else "")),
            ("family", family),
            ("positions", positions),
            ("hidden_size", a["hidden_size"]), ("intermediate_size", a["intermediate_size"]),
            ("heads", f"{a['num_attention_heads']} x head_dim {a['head_dim']}"),
            ("layers", a["num_hidden_layers"]), ("vocab_size", a["vocab_size"]),
            ("context", f"{a['context']} tokens"), ("rms_norm_eps", a["rms_norm_eps"]),
            ("torch_dtype", a["torch_dtype"])]
    out += [f"  {k:<18} {v}" for k, v in rows]

    out.append("")
    out.append(f"tensors: {r['num_tensors']}, {r['stored_bytes']:,} bytes ({gb(r['stored_bytes'])})"
               + ("" if all_tensors else "; one line per name pattern, --tensors lists each"))
    if all_tensors:
        width = max(len(t["name"]) for t in r["tensors"])
        for t in r["tensors"]:
            out.append(f"  {t['name']:<{width}}  {shape_text(t['shape']):>15}  {t['dtype']:<8}  {t['nbytes']:>14,}"
                       + (f"  {t['file']}" if t["file"] else ""))
    else:
        groups = group_tensors(r["tensors"])
        width = max(len(g[0]) for g in groups)
        out.append(f"  {'name':<{width}}  {'count':>5}  {'shape':>15}  {'dtype':<8}  {'bytes each':>14}")
        for pattern, count, dtype, shape, nbytes in groups:
            out.append(f"  {pattern:<{width}}  {count:>5}  {shape_text(shape):>15}  {dtype:<8}  {nbytes:>14,}")
    for f in r["files"]:
        out.append(f"  file {f['file']}: {f['bytes']:,} bytes")

    out.append("")
    out.append("parameters")
    p = r["parameters"]
    for kind in (*PARAMETER_KINDS, "total"):
        share = f"{100 * p[kind] / p['total']:5.1f}%"
        out.append(f"  {kind:<18} {p[kind]:>16,}  {share}")

    out.append("")
    pos = r["position_encoding"]
    if pos["kind"] == "alibi":
        values, head = pos["alibi_slopes"], f"ALiBi slopes, heads 0..{len(pos['alibi_slopes']) - 1}"
    else:
        values = pos["rope_inv_freq"]
        head = f"RoPE inverse frequencies theta^(-2k/head_dim), theta {pos['rope_theta']:g}, k = 0..{len(values) - 1}"
    out.append(head)
    for i in range(0, len(values), 8):
        out.append("  " + " ".join(f"{v:10.4g}" for v in values[i:i + 8]))

    out.append("")
    q = r["quantization"]
    if r["format"] != "bcnp":
        out.append("quantization: none (the original checkpoint; `python -m bcnp.convert --quantize 8|4` makes one)")
    elif q["bits"] is None:
        out.append(f"quantization: none (bcnp {q['float_dtype']}, converted from {q['source_dtype']})")
    else:
        name = "Q8_0" if q["bits"] == 8 else "Q4_0"
        out.append(f"quantization: int{q['bits']} ({name}, blocks of {q['block_size']}, "
                   f"{BLOCK_BYTES[q['bits']]} bytes per block), lm_head int8, embedding float16, norms {q['float_dtype']}; "
                   f"converted from {q['source_dtype']}")

    out.append("")
    m = r["memory"]
    out.append("memory for the weights")
    labels = [("bfloat16", "bfloat16 / float16"), ("float32", "float32"),
              ("int8", "int8  (Q8_0, 34 B / 32 values)"), ("int4", "int4  (Q4_0, 18 B / 32; lm_head int8)")]
    for key, label in labels:
        out.append(f"  {label:<38} {m['weights'][key]:>16,} bytes  {gb(m['weights'][key]):>9}")
    kv = m["kv_cache"]
    out.append(f"memory for a full KV cache ({kv['tokens']} tokens, keys and values of every layer)")
    for dtype in ("float32", "float16"):
        out.append(f"  {dtype:<38} {kv[dtype]:>16,} bytes  {gb(kv[dtype]):>9}  "
                   f"({kv[dtype + '_per_token']:,} bytes per token)")

    out.append("")
    g = r["generation"]
    source = "built-in defaults" if r["generation_source"] == "defaults" else r["generation_source"]
    out.append(f"generation defaults ({source})")
    items = [f"{k} {v}" for k, v in g.items()]
    for i in range(0, len(items), 6):
        out.append("  " + "  ".join(items[i:i + 6]))
    return "\n".join(out) + "\n"


# --- command line ----------------------------------------------------------------------------------------------

def main(argv=None, out=None, err=None):
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    p = ArgumentParser(prog="python -m bcnp.inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", metavar="MODEL_DIR", help="a Hugging Face or bcnp.convert directory")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="the released Baichuan-13B / -7B or Baichuan2-13B / -7B shapes, no files")
    add_family_argument(p)
    p.add_argument("--tensors", action="store_true", help="list every tensor (default: one line per name pattern)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (always every tensor)")
    try:
        args = p.parse_args(argv)
        if (args.model is None) == (args.preset is None):
            raise UsageError("give a MODEL_DIR or --preset 13b|7b|b2-13b|b2-7b (one of them)")
    except UsageError as e:
        err.write(error_line(e))
        return EXIT_USAGE
    try:
        out = Output(out)
        report = inspect_model(PRESETS[args.preset] if args.preset else args.model, args.family)
        out.write(json.dumps(report, indent=1) + "\n" if args.json else format_report(report, args.tensors))
    except (OutputError, ValueError, OSError) as e:      # ConfigError and CheckpointError are ValueErrors
        err.write(error_line(e))
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    run(main)
