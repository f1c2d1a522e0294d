"""Convert a Hugging Face Baichuan checkpoint into bcnp's directory: the same float tensors, or int8/int4 blocks.

    python -m bcnp.convert HF_DIR OUT_DIR [--quantize {8,4}] [--dtype {float16,bfloat16,float32}] [--force]

Float tensors keep their names and their source dtype bit for bit unless --dtype converts them; with --quantize
every linear `NAME.weight` becomes `NAME.qweight` + `NAME.scales` (bcnp/layout.py; lm_head always 8 bits, the
embedding float16). Every other file of the source (tokenizer, remote code, generation config) is copied, so a
float conversion is still a Hugging Face checkpoint. It streams: a block of rows is read, checked (no NaN or
infinity), converted and written before the next is touched, so converting the 13B needs RAM for one block.

Nothing appears at OUT_DIR until the end: the model is written into `.OUT_DIR.bcnp-tmp-PID` next to it (with a
marker file that makes it ours) and renamed into place. A rename onto a directory that is not empty fails, and
that is the guard: an OUT_DIR that someone else fills meanwhile is never replaced. --force replaces the OUT_DIR
found at the start by renaming it to `.OUT_DIR.bcnp-old-PID`, renaming the new one in, then deleting the old.
A run killed at any point leaves only these names; the next conversion to the same OUT_DIR deletes the stale
ones (of dead processes, with our marker) and restores an old model whose replacement never arrived.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import sys
import threading
from collections import Counter

import numpy as np

from bcnp.checkpoint import CheckpointError, checkpoint_files, read_checkpoint, rope_table
from bcnp.tensor import nonfinite
from bcnp.config import Config, ConfigError, add_family_argument, read_config_json
from bcnp.errors import one_line, read_json_object
from bcnp.sampling import GenerationConfig
from bcnp.layout import (BLOCK_SIZE, EMBEDDING, FLOAT_DTYPES, FORMAT_VERSION, converted_float_dtype,  # noqa: F401
                         expected_converted_shapes, quantized_bits, quantized_shapes)  # (re-exported)
from bcnp.weights import prepared_weight

CHUNK_ROWS = 1024                       # rows converted at a time: bounds the temporaries (10 MB of 13B embedding)
SAFETENSORS_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int8": "I8", "uint8": "U8"}
# Not copied: weights in any format, and their indexes (we write our own); config.json is rewritten.
WEIGHT_FILE = re.compile(r"\.(bin|safetensors|pt|pth|ckpt|h5|msgpack|gguf|onnx)$|\.index\.json$|^config\.json$")
MARKER = ".bcnp-convert"                # in each directory this module may delete: what makes a leftover ours


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the same cleanup runs."""


# --- what gets written --------------------------------------------------------------------------------------

def output_float_dtypes(tensors, bits, dtype):
    """{name: stored dtype} of every tensor that stays float: `dtype` if given, else the tensor's own."""
    chosen = {}
    for name, tensor in tensors.items():
        if quantized_bits(name, bits) is not None:
            continue
        if dtype is None and tensor.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{tensor.where()} is {tensor.dtype}, not a float dtype; convert it on purpose "
                                  f"with --dtype {{{','.join(FLOAT_DTYPES)}}}")
        chosen[name] = converted_float_dtype(name, bits, dtype or tensor.dtype)
    return chosen


def plan_outputs(tensors, bits, float_dtypes):
    """[(source tensor, bits or None, [(out name, dtype, shape), ...])] in model order."""
    plan = []
    for name, tensor in tensors.items():
        b = quantized_bits(name, bits)
        if b is None:
            plan.append((tensor, None, [(name, float_dtypes[name], tensor.shape)]))
        else:
            base = name[: -len(".weight")]
            (qd, qs), (sd, ss) = quantized_shapes(tensor.shape, b)
            plan.append((tensor, b, [(base + ".qweight", qd, qs), (base + ".scales", sd, ss)]))
    return plan


def nbytes(dtype, shape):
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype if dtype != "bfloat16" else "u2").itemsize


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


def row_blocks(tensor):
    rows = tensor.shape[0] if tensor.shape else 1
    if len(tensor.shape) < 2:
        return [None]
    return [slice(start, min(start + CHUNK_ROWS, rows)) for start in range(0, rows, CHUNK_ROWS)]


def float_rows(tensor, rows, dtype):
    """Rows of a float tensor as `dtype`: the stored bytes themselves when the dtype is the source's (every path
    goes through Tensor.stored, which refuses NaN and infinity)."""
    if dtype == tensor.dtype:
        return tensor.stored(rows)
    if dtype == "float16":
        return tensor.float16(rows)                    # refuses values beyond float16's range
    x = tensor.float32(rows)
    if dtype == "float32":
        return x
    from bcnp._dtypes import f32_to_bf16
    out = np.empty(x.shape, np.uint16)
    f32_to_bf16(x.reshape(-1), out.reshape(-1))        # nearest-even; above 3.39e38 rounds to infinity
    if nonfinite(out, "bfloat16") is not None:
        raise CheckpointError(f"{tensor.where()} holds {float(np.abs(x).max()):g}, beyond bfloat16's range")
    return out


def converted_chunks(tensor, bits, dtype, config):
    """The output of one source tensor as (output index, array) pairs, a block of rows at a time, in file order.
    Float tensors are copied as they are (a Baichuan2 lm_head too: the loader normalises it, as it does the
    source's); a quantized one is made of the rows the forward pass uses (`prepared_weight`: NormHead works
    row by row, so a block of rows at a time is exact)."""
    if bits is None:
        for rows in row_blocks(tensor):
            yield 0, float_rows(tensor, rows, dtype)
        return
    from bcnp.quant import quantize_fast  # compiled, bit-identical to bcnp.quant.quantize

    # qweight goes out as it is made; the scales (1/16 of its size or less) wait until it is done.
    scales = []
    for rows in row_blocks(tensor):
        where = f"{tensor.where()} rows {rows.start}:{rows.stop}"
        x = prepared_weight(config, tensor.name, tensor.float32(rows))   # float32() refuses non-finite weights
        q, s = quantize_fast(x, bits, name=where)
        yield 0, q
        scales.append(s)
    yield 1, np.concatenate(scales)


def safetensors_header(entries):
    """The header bytes for [(name, dtype, shape)] laid out in that order; padded so data starts 8-aligned.
    "format": "pt" is what transformers requires of a safetensors file it loads (the layout is torch's)."""
    header, offset = {"__metadata__": {"format": "pt", "writer": "bcnp.convert"}}, 0
    for name, dtype, shape in entries:
        size = nbytes(dtype, shape)
        header[name] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text, offset


def write_shard(path, shard, progress, config):
    """One safetensors file: the header (sizes are known up front), then each tensor's bytes as produced."""
    entries = [e for _, _, outs in shard for e in outs]
    header, data_size = safetensors_header(entries)
    with open(path, "wb") as f:
        f.write(header)
        for tensor, bits, outs in shard:
            written = [0] * len(outs)
            for i, array in converted_chunks(tensor, bits, outs[0][1], config):
                name, dtype, shape = outs[i]
                stored = "uint16" if dtype == "bfloat16" else dtype
                if array.dtype != np.dtype(stored) or array.shape[1:] != tuple(shape[1:]):
                    raise CheckpointError(f"{tensor.where()}: converted {name} is {array.dtype} {array.shape}, "
                                          f"expected {dtype} rows of {shape}")
                f.write(np.ascontiguousarray(array).data)
                written[i] += array.nbytes
                tensor.release()        # this block's pages: the RSS stays one block, not one tensor (655 MB)
            for (name, dtype, shape), n in zip(outs, written):
                if n != nbytes(dtype, shape):
                    raise CheckpointError(f"{tensor.where()}: converted {name} has {n} bytes, expected "
                                          f"{nbytes(dtype, shape)} ({dtype} {shape})")
            progress.update(tensor.nbytes)
        if f.tell() != len(header) + data_size:
            raise CheckpointError(f"{path}: wrote {f.tell()} bytes, expected {len(header) + data_size}")
        f.flush()
        os.fsync(f.fileno())


def shard_names(n):
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


def write_weights(directory, plan, max_shard_bytes, progress, config):
    from tqdm import tqdm

    shards = split_shards(plan, max_shard_bytes)
    names = shard_names(len(shards))
    total = sum(tensor.nbytes for tensor, _, _ in plan)
    with tqdm(total=total, unit="B", unit_scale=True, desc="convert", file=sys.stderr,
              disable=None if progress else True) as bar:
        for name, shard in zip(names, shards):
            write_shard(os.path.join(directory, name), shard, bar, config)
    if len(shards) > 1:
        weight_map = {out: file for file, shard in zip(names, shards) for _, _, outs in shard for out, _, _ in outs}
        total_size = sum(nbytes(d, s) for shard in shards for _, _, outs in shard for _, d, s in outs)
        write_json(os.path.join(directory, "model.safetensors.index.json"),
                   {"metadata": {"total_size": total_size}, "weight_map": weight_map})


def bcnp_section(config, tensors, bits, float_dtypes):
    """config.json's `bcnp` section: what bcnp.layout needs to know every tensor's dtype and shape."""
    kept = {name: d for name, d in float_dtypes.items() if not (bits and name == EMBEDDING)}  # that one: float16
    by_size = Counter()
    for name, dtype in kept.items():
        by_size[dtype] += tensors[name].numel
    float_dtype = by_size.most_common(1)[0][0]
    section = {"format_version": FORMAT_VERSION, "family": config.family,
               "quantization": None if bits is None else {"bits": bits, "block_size": BLOCK_SIZE},
               "source_dtype": source_dtype(tensors), "float_dtype": float_dtype}
    if config.rope_inv_freq is not None:                 # the source's own RoPE table (bcnp.checkpoint.rope_table)
        section["rope_inv_freq"] = list(config.rope_inv_freq)
    others = {name: d for name, d in kept.items() if d != float_dtype}
    if others:
        section["float_dtypes"] = others                 # a mixed-precision source, kept as it was
    return section


def source_dtype(tensors):
    """The dtype holding most of the checkpoint's bytes (Baichuan stores one dtype throughout)."""
    counts = Counter()
    for t in tensors.values():
        counts[t.dtype] += t.nbytes
    return counts.most_common(1)[0][0]


def side_files(hf_dir):
    """The source's top-level files that are neither weights nor config.json: tokenizer, remote code, ..."""
    return sorted(name for name in os.listdir(hf_dir)
                  if not WEIGHT_FILE.search(name) and os.path.isfile(os.path.join(hf_dir, name)))


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


# --- the directory ------------------------------------------------------------------------------------------

def convert(hf_dir, out_dir, quantize_bits=None, force=False, max_shard_bytes=4 * 2**30, progress=True,
            dtype=None, log=None, family=None):
    """Write the bcnp directory for the checkpoint in `hf_dir` to `out_dir`; returns out_dir.

    dtype: None keeps every float tensor's dtype; "float16", "bfloat16" or "float32" converts them. `log` gets
    one-line notes about leftovers of earlier runs (default: printed on stderr). family: "baichuan" or
    "baichuan2", recorded in the bcnp section (default: Baichuan2 for its vocabulary of 125,696)."""
    hf_dir, out_dir = os.fspath(hf_dir), os.fspath(out_dir)
    log = log or (lambda message: print(f"note: {one_line(message)}", file=sys.stderr))
    check_arguments(out_dir, quantize_bits, dtype, max_shard_bytes)
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"{hf_dir}: no such directory")
    config_dict = read_config_dict(hf_dir)
    config = Config.from_dict(config_dict, source=os.path.join(hf_dir, "config.json"), family=family)
    GenerationConfig.from_json(hf_dir, config.vocab_size)   # refuse now what `generate` would refuse at open
    buffers = {}
    tensors = read_checkpoint(hf_dir, config.weight_shapes(), buffers)
    tensors = {name: tensors[name] for name in config.weight_shapes()}   # model order, whatever the source's
    config = dataclasses.replace(config, rope_inv_freq=rope_table(config, buffers))
    copied = side_files(hf_dir)
    inputs = [hf_dir, *input_files(hf_dir), *(os.path.join(hf_dir, name) for name in copied)]
    out = os.path.abspath(out_dir)
    refuse_output_holding(out_dir, inputs)
    recover_leftovers(out, inputs, log)
    replaced = existing_output(out_dir, force)
    float_dtypes = output_float_dtypes(tensors, quantize_bits, dtype)
    plan = plan_outputs(tensors, quantize_bits, float_dtypes)

    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = make_work_dir(out)
    try:
        write_weights(tmp, plan, max_shard_bytes, progress, config)
        config_dict["bcnp"] = bcnp_section(config, tensors, quantize_bits, float_dtypes)
        write_json(os.path.join(tmp, "config.json"), config_dict)
        for name in copied:
            shutil.copyfile(os.path.join(hf_dir, name), os.path.join(tmp, name))
        old = move_into_place(tmp, out, replaced, log)
    except BaseException:
        with contextlib.suppress(OSError):            # the error that got us here is the one to report
            remove_ours(tmp)
        raise
    if old is not None:           # after the swap: a crash while deleting leaves `old`, which the next run removes
        try:
            remove_ours(old)
        except OSError as e:
            log(f"could not delete {old}, the model --force replaced ({e}); rm -rf -- {shlex.quote(old)}")
    return out_dir


def check_arguments(out_dir, bits, dtype, max_shard_bytes):
    if not out_dir.strip() or not os.path.basename(os.path.abspath(out_dir)):
        raise ValueError(f"OUT_DIR {out_dir!r} names no directory to write; give a path such as ./model-bcnp")
    if bits not in (None, 8, 4):
        raise ConfigError(f"--quantize must be 8 or 4, got {bits!r}")
    if dtype not in (None, *FLOAT_DTYPES):
        raise ConfigError(f"--dtype must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"the largest shard must be a positive number of bytes, got {max_shard_bytes!r}")


def read_config_dict(hf_dir):
    config_dict = read_config_json(hf_dir)
    if "bcnp" in config_dict:
        raise ConfigError(f"{hf_dir}: already converted by bcnp; convert the original Hugging Face directory")
    return config_dict


def input_files(hf_dir):
    """config.json, the weight files and their index: what reading the checkpoint opens."""
    files, _, weight_map = checkpoint_files(hf_dir)
    indexes = [os.path.join(hf_dir, n) for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")]
    return [os.path.join(hf_dir, "config.json"), *files, *(p for p in indexes if os.path.isfile(p))]


def holds(directory_stat, path):
    """Whether the directory with `directory_stat` is `path` or one of its ancestors (through symlinks too:
    a shard may be a link into it; compared by device and inode, so bind mounts and odd spellings count)."""
    for spelling in {os.path.abspath(path), os.path.realpath(path)}:
        while True:
            with contextlib.suppress(OSError):
                if os.path.samestat(os.stat(spelling), directory_stat):
                    return True
            parent = os.path.dirname(spelling)
            if parent == spelling:
                break
            spelling = parent
    return False


def refuse_output_holding(out_dir, inputs):
    """OUT_DIR must not be a symlink, a file, or hold anything this conversion reads: --force deletes it."""
    if os.path.islink(out_dir):
        raise FileExistsError(f"{out_dir}: is a symbolic link; give the directory itself (or a new path)")
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir}: exists and is not a directory")
    out_stat = os.stat(out_dir)
    for path in inputs:
        if holds(out_stat, path):
            what = "is the input directory" if path == inputs[0] and os.path.samefile(path, out_dir) else \
                f"holds {path}, which this conversion reads"
            raise FileExistsError(f"{out_dir}: {what}; choose another output directory (--force would delete it)")


def existing_output(out_dir, force):
    """The stat of the non-empty OUT_DIR that --force is to replace; None when there is nothing to replace."""
    if not os.path.lexists(out_dir) or not os.listdir(out_dir):
        return None
    if not force:
        raise FileExistsError(f"{out_dir}: exists and is not empty (use --force to replace it)")
    return os.stat(out_dir)


# --- temporary directories and what crashed runs left -----------------------------------------------------------

def work_dir(out, kind, pid):
    """`.NAME.bcnp-tmp-PID` (being written) or `.NAME.bcnp-old-PID` (the OUT_DIR --force replaces), next to out."""
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.bcnp-{kind}-{pid}")


def write_marker(directory):
    write_json(os.path.join(directory, MARKER), {"pid": os.getpid(), "host": socket.gethostname(),
                                                 "written_by": "bcnp.convert"})


def make_work_dir(out):
    """Our temporary directory, marker first: whatever happens later, a leftover is recognisably ours."""
    tmp = work_dir(out, "tmp", os.getpid())
    os.mkdir(tmp)                                     # mode 0777 less the umask: what the output should get
    try:
        write_marker(tmp)
    except BaseException:
        os.rmdir(tmp)
        raise
    return tmp


def remove_ours(directory):
    """Delete a directory we made (or moved aside), the marker last: a crash midway leaves it still ours."""
    if not os.path.isdir(directory) or os.path.islink(directory):
        return
    for entry in os.scandir(directory):
        if entry.name != MARKER:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, MARKER))
    os.rmdir(directory)


def leftovers(out):
    """[(path, kind, pid)] of the work directories of conversions to `out`, whoever made them."""
    parent, pattern = os.path.dirname(out), re.compile(rf"\.{re.escape(os.path.basename(out))}\.bcnp-(tmp|old)-(\d+)")
    found = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(parent)):
            match = pattern.fullmatch(name)
            if match and os.path.isdir(os.path.join(parent, name)) and not os.path.islink(os.path.join(parent, name)):
                found.append((os.path.join(parent, name), match.group(1), int(match.group(2))))
    return found


def read_marker(directory):
    try:
        marker = read_json_object(os.path.join(directory, MARKER), max_bytes=4096, what="bcnp marker")
    except (OSError, ValueError):
        return None
    return marker if marker.get("written_by") == "bcnp.convert" else None


def still_running(pid, marker):
    """Whether the conversion that made a work directory may still be running (then it is not a leftover)."""
    if pid == os.getpid():
        return False                                  # a dead process's, with our recycled pid
    if marker is not None and marker.get("host") != socket.gethostname():
        return True                                   # another machine's (a shared disk): we cannot tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                                   # EPERM: alive, someone else's
        return True
    return True


def recover_leftovers(out, inputs, log):
    """Clean up after conversions to `out` that died (crash, SIGKILL, power loss): delete their unfinished
    temporary directories and replaced models, and put back a replaced model whose replacement never arrived.

    They are deleted rather than reported because a leftover is unusable by construction (a finished conversion
    is renamed away), and at 26 GB for the 13B it is what actually hurts; only directories with our marker (or
    empty ones) are deleted, anything else with our naming is reported with the command that removes it."""
    for path, kind, pid in leftovers(out):
        try:
            recover_leftover(path, kind, pid, out, inputs, log)
        except OSError as e:                          # one we cannot handle must not stop the conversion
            log(f"{path}: left by an interrupted conversion (pid {pid}) and could not be cleaned up ({e})")


def recover_leftover(path, kind, pid, out, inputs, log):
    marker = read_marker(path)
    if still_running(pid, marker):
        log(f"{path}: another conversion to {out} (pid {pid}) is running; whichever finishes second will "
            "fail without touching the other's output")
        return
    if any(holds(os.stat(path), p) for p in inputs):
        return                                        # someone is converting from inside it: leave it be
    if kind == "old" and not os.path.lexists(out):
        os.rename(path, out)                          # the only complete model: --force died between renames
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(out, MARKER))
        log(f"restored {out} from {path}, where an interrupted --force conversion (pid {pid}) had moved it")
    elif marker is not None or not os.listdir(path):
        remove_ours(path)
        log(f"removed {path}, left by an interrupted conversion (pid {pid})")
    else:
        log(f"{path} looks like the leftover of an interrupted conversion (pid {pid}) but has no {MARKER} "
            f"file, so it was left alone; remove it with: rm -rf -- {shlex.quote(path)}")


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM wait until the block is done (the --force swap must not stop between its two renames).
    Yields the list of signals that arrived meanwhile."""
    caught = []
    if threading.current_thread() is not threading.main_thread():
        yield caught                                  # only the main thread can set handlers; none run elsewhere
        return
    previous = {s: signal.signal(s, lambda number, frame: caught.append(number)) for s in (signal.SIGINT,
                                                                                         signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def move_into_place(tmp, out, replaced, log):
    """Rename the finished `tmp` to `out`, never replacing anything but the directory `replaced` (a stat: the
    OUT_DIR --force was given) or an empty one. Returns the path of the replaced model, now to be deleted."""
    with signals_deferred() as caught:
        old = None if replaced is None else set_aside(out, replaced)
        os.unlink(os.path.join(tmp, MARKER))          # from here on it is the model, not a leftover
        try:
            os.rename(tmp, out)                       # fails if out exists and is not an empty directory
        except OSError as e:
            message = f"{out}: appeared during the conversion (another process?) and was left untouched"
            if old is not None and not put_back(old, out):
                message += f"; the model --force was to replace is in {old}"
            raise FileExistsError(f"{message}; the conversion was discarded ({e.strerror})") from None
    if caught:
        log(f"interrupted after {out} was complete and in place; it is kept")
    return old


def set_aside(out, replaced):
    """Rename the OUT_DIR --force replaces to a name the next run recognises, if it is still that directory."""
    try:
        current = os.stat(out)
    except FileNotFoundError:
        return None                                   # removed meanwhile: nothing left to replace
    if not os.path.samestat(current, replaced):
        raise FileExistsError(f"{out}: was replaced by another process during the conversion; left it untouched "
                              "and discarded the conversion")
    old = work_dir(out, "old", os.getpid())
    os.rename(out, old)
    write_marker(old)
    return old


def put_back(old, out):
    try:
        os.rename(old, out)
    except OSError:
        return False
    os.unlink(os.path.join(out, MARKER))
    return True


# --- command line -------------------------------------------------------------------------------------------

def max_shard_bytes(text):
    """--max-shard-gb: GiB, finite and big enough for one byte."""
    try:
        gib = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GiB, got {text!r}") from None
    if not math.isfinite(gib) or gib * 2**30 < 1:
        raise argparse.ArgumentTypeError(f"must be a positive, finite number of GiB, got {text!r}")
    return int(gib * 2**30)


def raise_terminated(signum, frame):
    raise Terminated


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bcnp.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face checkpoint directory (.bin or .safetensors)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (must not exist or be empty)")
    parser.add_argument("--quantize", type=int, choices=(8, 4), default=None,
                        help="quantize linear weights to 8 or 4 bits (lm_head always 8)")
    parser.add_argument("--dtype", choices=FLOAT_DTYPES, default=None,
                        help="store float tensors in this dtype (default: each keeps its own, bit for bit)")
    add_family_argument(parser)
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--max-shard-gb", type=max_shard_bytes, default=4 * 2**30, metavar="GB",
                        help="largest output file, GiB (default 4)")

    def one_line_error(message):
        print(f"error: {one_line(message)}", file=sys.stderr)
        sys.exit(2)

    parser.error = one_line_error
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        convert(args.hf_dir, args.out_dir, args.quantize, args.force, args.max_shard_gb, dtype=args.dtype,
                family=args.family)
    except (ValueError, OSError) as e:  # CheckpointError, ConfigError and quantize's errors are ValueErrors
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"wrote {one_line(args.out_dir)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
