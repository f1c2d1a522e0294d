"""Seeded fuzzing of the checkpoint readers: every mutant of a real torch `.bin`, a safetensors shard or an index
file either loads to the original tensors or raises CheckpointError, never any other exception.

What a mutant may legitimately change (bcnp does not checksum what it maps, see `read_torch_bin`): bytes inside a
storage or a safetensors data area load as different values; a safetensors header (no checksum at all) can also
rename a tensor. Set BCNP_FUZZ_MUTANTS (and BCNP_FUZZ_SEED) for a longer campaign; the default keeps CI near 15 s.
"""
import json
import os
import random
import shutil
import zipfile

import numpy as np
import pytest

from bcnp.checkpoint import CheckpointError, read_checkpoint, read_safetensors, read_torch_bin
from conftest import FIXTURES

MUTANTS = int(os.environ.get("BCNP_FUZZ_MUTANTS", "1500"))
SEED = int(os.environ.get("BCNP_FUZZ_SEED", "0"))          # another seed, another campaign
MODEL = FIXTURES / "b7-rope-h4-l3-fp16"
TORCH_SHARD = MODEL / "hf" / "pytorch_model-00001-of-00002.bin"          # written by torch.save
SAFETENSORS_SHARD = MODEL / "hf-safetensors" / "model-00001-of-00002.safetensors"


def contents(tensors):
    """name -> (dtype, shape, stored bytes): everything a reader's caller can observe."""
    return {name: (t.dtype, t.shape, np.ascontiguousarray(t.numpy()).tobytes()) for name, t in tensors.items()}


def storage_spans(path):
    """[start, end) of every storage's bytes in a torch zip (torch writes them STORED)."""
    spans = []
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            if "/data/" in info.filename:
                f.seek(info.header_offset + 26)
                name_length, extra_length = np.frombuffer(f.read(4), "<u2")
                start = info.header_offset + 30 + int(name_length) + int(extra_length)
                spans.append((start, start + info.file_size))
    return spans


def mutate(data, rng, hot):
    """(mutant, the byte range it changed in place or None for a shift) of `data`; half the mutations land in
    `hot` (the structural bytes: zip records and directory, safetensors header), where uniform ones rarely go."""
    def position():
        if hot and rng.random() < 0.5:
            start, end = rng.choice(hot)
            return rng.randrange(start, end)
        return rng.randrange(len(data))

    kind = rng.choice(["flip", "byte", "word", "truncate", "insert", "delete"])
    at = position()
    out = bytearray(data)
    if kind == "flip":
        out[at] ^= 1 << rng.randrange(8)
        return bytes(out), (at, at + 1)
    if kind == "byte":
        out[at] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        return bytes(out), (at, at + 1)
    if kind == "word":                                          # a size, offset or CRC field set to an extreme
        word = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x00\x00\x00\x80", b"\xff\xff\xff\x7f"])
        out[at: at + 4] = word
        return bytes(out[: len(data)]), (at, at + 4)
    if kind == "truncate":
        return data[:at], None
    if kind == "insert":
        return data[:at] + bytes(rng.randrange(256) for _ in range(rng.choice([1, 2, 4, 64]))) + data[at:], None
    return data[:at] + data[at + rng.choice([1, 4, 64]):], None


def touches(changed, spans):
    return changed is not None and any(changed[0] < end and start < changed[1] for start, end in spans)


def campaign(tmp_path, source, reader, hot, data_spans, may_rename, seed, n):
    """Run `n` seeded mutants of `source` through `reader`; return what broke the property."""
    original = contents(reader(source))
    data = source.read_bytes()
    rng = random.Random(seed)
    path = tmp_path / source.name
    escapes, loaded = [], 0
    for i in range(n):
        mutant, changed = mutate(data, rng, hot)
        path.write_bytes(mutant)
        try:
            got = contents(reader(path))
        except CheckpointError as e:
            assert source.name in str(e) and len(str(e)) < 1000
            continue
        except Exception as e:  # noqa: BLE001 - the property under test: nothing else may escape
            escapes.append(f"mutant {i}: {type(e).__name__}: {str(e)[:200]}")
            continue
        loaded += 1
        if got == original:
            continue
        same_layout = {k: v[:2] for k, v in got.items()} == {k: v[:2] for k, v in original.items()}
        if touches(changed, data_spans) and same_layout:
            continue                                        # new values in the mapped bytes, as the file says
        if may_rename and touches(changed, hot) and sorted(got.values()) == sorted(original.values()):
            continue                                        # a safetensors name changed in the header
        escapes.append(f"mutant {i}: loaded different tensors (changed bytes {changed})")
    return escapes, loaded


def test_torch_bin_mutants_load_the_original_or_raise_checkpoint_error(tmp_path):
    storages = storage_spans(TORCH_SHARD)
    size = TORCH_SHARD.stat().st_size
    # hot: everything but the storages (the zip records, data.pkl, byteorder, the directory).
    edges = sorted([0] + [b for span in storages for b in span] + [size])
    hot = [(a, b) for a, b in zip(edges[::2], edges[1::2]) if b > a]
    escapes, loaded = campaign(tmp_path, TORCH_SHARD, read_torch_bin, hot, storages, False, seed=SEED + 1,
                               n=MUTANTS)
    assert not escapes, escapes[:10]
    assert loaded > MUTANTS // 10          # the campaign also exercised mutants that load (storage bytes)


def test_safetensors_mutants_load_the_original_or_raise_checkpoint_error(tmp_path):
    data = SAFETENSORS_SHARD.read_bytes()
    header_end = 8 + int(np.frombuffer(data[:8], "<u8")[0])
    hot, data_area = [(0, header_end)], [(header_end, len(data))]
    escapes, loaded = campaign(tmp_path, SAFETENSORS_SHARD, read_safetensors, hot, data_area, True, seed=SEED + 2,
                               n=MUTANTS)
    assert not escapes, escapes[:10]
    assert loaded > MUTANTS // 10


@pytest.mark.parametrize("layout,index_name", [("hf-safetensors", "model.safetensors.index.json"),
                                               ("hf", "pytorch_model.bin.index.json")])
def test_index_mutants_load_the_original_or_raise_checkpoint_error(tmp_path, layout, index_name):
    directory = shutil.copytree(MODEL / layout, tmp_path / "ckpt")
    index = directory / index_name
    data = index.read_bytes()
    original = contents(read_checkpoint(directory))
    rng = random.Random(SEED + 3)
    escapes = []
    for i in range(max(MUTANTS // 10, 100)):
        mutant, _ = mutate(data, rng, None)
        index.write_bytes(mutant)
        try:
            got = contents(read_checkpoint(directory))
        except CheckpointError:
            continue
        except Exception as e:  # noqa: BLE001 - the property under test
            escapes.append(f"mutant {i}: {type(e).__name__}: {str(e)[:200]}")
            continue
        if got != original:
            escapes.append(f"mutant {i}: loaded different tensors")
    assert not escapes, escapes[:10]
    # Wrong types where the index has names: each is a CheckpointError naming the index.
    for weight_map in ([], "x", 7, None, {"model.norm.weight": 3}, {"model.norm.weight": ["a"]}, {}):
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        with pytest.raises(CheckpointError, match=index_name):
            read_checkpoint(directory)
