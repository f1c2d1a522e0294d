"""Convert a Hugging Face Baichuan checkpoint into bcnp's directory: float16 (or int8/int4) safetensors.

    python -m bcnp.convert HF_DIR OUT_DIR [--quantize {8,4}] [--force]

The output holds flat arrays under the checkpoint's names: float tensors as float16, and with --quantize every
linear `NAME.weight` as `NAME.qweight` + `NAME.scales` (SPEC §4 layout; lm_head always 8 bits). It streams: one
tensor is read, converted and written before the next is touched, so converting the 13B needs RAM for one
tensor, not for the model. Everything is written into a temporary directory next to OUT_DIR and renamed at the
end, so a failed or interrupted run leaves nothing that looks like a model.
"""
import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
from collections import Counter

import numpy as np

from bcnp.checkpoint import CheckpointError, read_checkpoint
from bcnp.config import Config, ConfigError, read_config_json
from bcnp.quant import quantized_bits

FORMAT_VERSION = 1
BLOCK_SIZE = 32                         # quantization block along the input dimension
COPIED_FILES = ("generation_config.json", "tokenizer.model", "tokenizer_config.json")
CHUNK_ROWS = 1024                       # rows converted at a time: bounds the float32 temporaries
SAFETENSORS_CODES = {"float16": "F16", "int8": "I8", "uint8": "U8"}


def quantized_shapes(shape, bits):
    """(qweight, scales) as (dtype, shape) for a float (out, in) weight; rows are padded to whole blocks."""
    out_features, in_features = shape
    padded = -(-in_features // BLOCK_SIZE) * BLOCK_SIZE
    qweight = ("int8", (out_features, padded)) if bits == 8 else ("uint8", (out_features, padded // 2))
    return qweight, ("float16", (out_features, padded // BLOCK_SIZE))


def expected_converted_shapes(config, bits):
    """Every tensor of a converted directory: name -> (dtype, shape). bits: None (float16), 8 or 4."""
    expected = {}
    for name, shape in config.weight_shapes().items():
        b = quantized_bits(name, bits)
        if b is None:
            expected[name] = ("float16", shape)
        else:
            base = name[: -len(".weight")]
            expected[base + ".qweight"], expected[base + ".scales"] = quantized_shapes(shape, b)
    return expected


# --- what gets written --------------------------------------------------------------------------------------

def plan_outputs(tensors, bits):
    """[(source tensor, bits or None, [(out name, dtype, shape), ...])] in model order."""
    plan = []
    for name, tensor in tensors.items():
        b = quantized_bits(name, bits)
        if b is None:
            plan.append((tensor, None, [(name, "float16", tensor.shape)]))
        else:
            base = name[: -len(".weight")]
            (qd, qs), (sd, ss) = quantized_shapes(tensor.shape, b)
            plan.append((tensor, b, [(base + ".qweight", qd, qs), (base + ".scales", sd, ss)]))
    return plan


def nbytes(dtype, shape):
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def split_shards(plan, max_shard_bytes):
    """Consecutive groups of plan entries of at most max_shard_bytes each (a tensor larger than that alone)."""
    shards, current, size = [], [], 0
    for entry in plan:
        entry_bytes = sum(nbytes(d, s) for _, d, s in entry[2])
        if current and size + entry_bytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry_bytes
    if current or not shards:
        shards.append(current)
    return shards


def converted_chunks(tensor, bits):
    """The output of one source tensor as (output index, array) pairs, a block of rows at a time, in file order."""
    rows = tensor.shape[0] if tensor.shape else 1
    if bits is None:
        if len(tensor.shape) < 2:
            yield 0, tensor.float16()
        else:
            for start in range(0, rows, CHUNK_ROWS):
                yield 0, tensor.float16(slice(start, start + CHUNK_ROWS))
        return
    from bcnp.quant import quantize_fast  # compiled, bit-identical to bcnp.quant.quantize

    # qweight goes out as it is made; the scales (1/16 of its size or less) wait until it is done.
    scales = []
    for start in range(0, rows, CHUNK_ROWS):
        rows_here = slice(start, min(start + CHUNK_ROWS, rows))
        where = f"{tensor.where()} rows {rows_here.start}:{rows_here.stop}"
        q, s = quantize_fast(tensor.float32(rows_here), bits, name=where)  # refuses non-finite weights
        yield 0, q
        scales.append(s)
    yield 1, np.concatenate(scales)


def safetensors_header(entries):
    """The header bytes for [(name, dtype, shape)] laid out in that order; padded so data starts 8-aligned."""
    header, offset = {"__metadata__": {"format": "np", "writer": "bcnp.convert"}}, 0
    for name, dtype, shape in entries:
        size = nbytes(dtype, shape)
        header[name] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text, offset


def write_shard(path, shard, progress):
    """One safetensors file: the header (sizes are known up front), then each tensor's bytes as produced."""
    entries = [e for _, _, outs in shard for e in outs]
    header, data_size = safetensors_header(entries)
    with open(path, "wb") as f:
        f.write(header)
        for tensor, bits, outs in shard:
            written = [0] * len(outs)
            for i, array in converted_chunks(tensor, bits):
                name, dtype, shape = outs[i]
                if array.dtype != np.dtype(dtype) or array.shape[1:] != tuple(shape[1:]):
                    raise CheckpointError(f"{tensor.where()}: converted {name} is {array.dtype} {array.shape}, "
                                          f"expected {dtype} rows of {shape}")
                f.write(np.ascontiguousarray(array).data)
                written[i] += array.nbytes
            for (name, dtype, shape), n in zip(outs, written):
                if n != nbytes(dtype, shape):
                    raise CheckpointError(f"{tensor.where()}: converted {name} has {n} bytes, expected "
                                          f"{nbytes(dtype, shape)} ({dtype} {shape})")
            tensor.release()
            progress.update(tensor.nbytes)
        if f.tell() != len(header) + data_size:
            raise CheckpointError(f"{path}: wrote {f.tell()} bytes, expected {len(header) + data_size}")
        f.flush()
        os.fsync(f.fileno())


def shard_names(n):
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


# --- the directory ------------------------------------------------------------------------------------------

def convert(hf_dir, out_dir, quantize_bits=None, force=False, max_shard_bytes=4 * 2**30, progress=True):
    """Write the bcnp directory for the checkpoint in `hf_dir` to `out_dir`; returns out_dir."""
    hf_dir, out_dir = os.fspath(hf_dir), os.fspath(out_dir)
    if quantize_bits not in (None, 8, 4):
        raise ConfigError(f"--quantize must be 8 or 4, got {quantize_bits!r}")
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"{hf_dir}: no such directory")
    _check_out_dir(hf_dir, out_dir, force)
    config_dict = read_config_dict(hf_dir)
    config = Config.from_dict(config_dict, source=os.path.join(hf_dir, "config.json"))
    tensors = read_checkpoint(hf_dir, config.weight_shapes())
    tensors = {name: tensors[name] for name in config.weight_shapes()}   # model order, whatever the source's

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.tmp-", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)          # mkdtemp's private 0700 would outlive the rename
        write_weights(tmp, tensors, quantize_bits, max_shard_bytes, progress)
        config_dict["bcnp"] = {"format_version": FORMAT_VERSION,
                               "quantization": None if quantize_bits is None
                               else {"bits": quantize_bits, "block_size": BLOCK_SIZE},
                               "source_dtype": source_dtype(tensors)}
        _write_json(os.path.join(tmp, "config.json"), config_dict)
        for name in COPIED_FILES:
            if os.path.isfile(os.path.join(hf_dir, name)):
                shutil.copyfile(os.path.join(hf_dir, name), os.path.join(tmp, name))
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_config_dict(hf_dir):
    config_dict = read_config_json(hf_dir)
    if "bcnp" in config_dict:
        raise ConfigError(f"{hf_dir}: already converted by bcnp; convert the original Hugging Face directory")
    return config_dict


def source_dtype(tensors):
    """The dtype holding most of the checkpoint's bytes (Baichuan stores one dtype throughout)."""
    counts = Counter()
    for t in tensors.values():
        counts[t.dtype] += t.nbytes
    return counts.most_common(1)[0][0]


def _check_out_dir(hf_dir, out_dir, force):
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise FileExistsError(f"{out_dir}: exists and is not a directory")
        if os.path.samefile(out_dir, hf_dir):
            raise FileExistsError(f"{out_dir}: is the input directory; choose another output directory")
        if os.listdir(out_dir) and not force:
            raise FileExistsError(f"{out_dir}: exists and is not empty (use --force to replace it)")


def write_weights(directory, tensors, bits, max_shard_bytes, progress):
    from tqdm import tqdm

    shards = split_shards(plan_outputs(tensors, bits), max_shard_bytes)
    names = shard_names(len(shards))
    total = sum(t.nbytes for t in tensors.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="convert", file=sys.stderr,
              disable=None if progress else True) as bar:
        for name, shard in zip(names, shards):
            write_shard(os.path.join(directory, name), shard, bar)
    if len(shards) > 1:
        weight_map = {out: file for file, shard in zip(names, shards) for _, _, outs in shard for out, _, _ in outs}
        total_size = sum(nbytes(d, s) for shard in shards for _, _, outs in shard for _, d, s in outs)
        _write_json(os.path.join(directory, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total_size}, "weight_map": weight_map})


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _move_into_place(tmp, out_dir):
    """Rename the finished directory to out_dir; an existing one (--force) is renamed away first, then deleted."""
    if not os.path.exists(out_dir):
        os.rename(tmp, out_dir)
        return
    if not os.listdir(out_dir):
        os.rmdir(out_dir)
        os.rename(tmp, out_dir)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.old-",
                           dir=os.path.dirname(os.path.abspath(out_dir)))
    os.rmdir(old)
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --- command line -------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bcnp.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face checkpoint directory (.bin or .safetensors)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (must not exist or be empty)")
    parser.add_argument("--quantize", type=int, choices=(8, 4), default=None,
                        help="quantize linear weights to 8 or 4 bits (lm_head always 8)")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--max-shard-gb", type=float, default=4.0, help="largest output file, GiB (default 4)")

    def one_line_error(message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = one_line_error
    args = parser.parse_args(argv)
    try:
        convert(args.hf_dir, args.out_dir, args.quantize, args.force, int(args.max_shard_gb * 2**30))
    except (ValueError, OSError) as e:  # CheckpointError, ConfigError and quantize's errors are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"wrote {args.out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
