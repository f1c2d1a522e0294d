"""Shared test helpers: where the fixtures are; for the quantized kernels bit-for-bit comparison, the weights' codes
and the matvec's error bound; for the GPU tests (tests/test_gpu_*.py) the fixture models with their
golden logits, SPEC's error measure, the cached decode, random quantized weights and the twins' matvec, and fake
CUDA kernels that check every launch against the CUDA signatures before running the NumPy twin."""
import pathlib
import re
import signal
import types

import numpy as np
import pytest

import strict_xp
from bcnp import Model
from bcnp.gpu import kernels as gpu_kernels
from bcnp import quant
from bcnp.gpu.cache import clamp_to_float16
from bcnp.quant import quantize, unpack_nibbles

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
MODELS = ["b13-alibi-h8-l4-bf16", "b7-rope-h4-l3-fp16"]     # tiny seeded Baichuan-13B / 7B (SPEC §8)


def sigint_as_from_a_terminal():
    """preexec_fn for a child that a test sends SIGINT: a shell without job control starts its background commands
    (`pytest ... &`) with SIGINT ignored, their children inherit that, and Python then installs no KeyboardInterrupt
    handler. The child is given SIGINT's default so that the test sees what a user at a terminal sees."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(params=MODELS)
def model_fixture(request):
    """Each fixture model's directory: hf/ (.bin shards), hf-safetensors/, golden.npz, meta.json."""
    return FIXTURES / request.param


# --- the quantized kernels (tests/test_quant*.py, tests/test_matvec.py) -----------------------------------------

def signed_codes(qweight, bits):
    """The integer each weight decodes from, (out, n_blocks, 32): q for 8 bits, c - 8 for 4."""
    q = np.asarray(qweight).astype(np.int64) if bits == 8 else unpack_nibbles(qweight).astype(np.int64) - 8
    return q.reshape(q.shape[0], -1, 32)


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def padded(w):
    return np.pad(w, ((0, 0), (0, -w.shape[1] % 32)))


# The weights the kernels take, as (bits, x_bits): 8-bit with int16 x (an int8 model), 8-bit with int8 x (an int4
# model's lm_head), 4-bit (int8 x).
WEIGHT_KINDS = [(8, 16), (8, 8), (4, 8)]


def activation_scales(x, x_bits):
    """The kernels' dx per block of 32 of x, exactly: max |x_b| / L in float32 (L = 32767 for x_bits 16, 127 for
    x_bits 8)."""
    xb = padded(x[None].astype(np.float32))[0].reshape(-1, 32)
    return np.abs(xb).max(-1) / np.float32(quant.ACTIVATION_LIMIT[x_bits])


def matvec_bound(q, s, bits, x, x_bits=None):
    """The decode bound (QuantizedWeight.matvec): x is rounded per block (dx = max|x_b| / L, error <=
    dx (1/2 + (L + 1) 2^-24)), so |y - W^ x| <= sum_b |d_b| dx_b sum_i |q_bi| (1/2 + (L + 1) 2^-24 + float32
    rounding of the block products and their sum). Returns (the whole bound, its float32 rounding part) per row.
    x_bits: as `bits`-bit weights have by default."""
    x_bits = quant.activation_bits(bits) if x_bits is None else x_bits
    limit = quant.ACTIVATION_LIMIT[x_bits]
    codes = np.abs(signed_codes(q, bits)).sum(-1)                        # (out, nb)
    per_block = np.abs(s.astype(np.float64)) * activation_scales(x, x_bits).astype(np.float64) * codes
    nb = s.shape[1]
    rounding = (per_block * (nb + 4) * limit * 2.0**-24).sum(-1)
    return (per_block * (0.5 + (limit + 1) * 2.0**-24)).sum(-1) + rounding, rounding


def scalar_matvec(layer, x):
    """The portable C kernel (the specification of the SIMD ones), whatever the build compiled in."""
    kernel = quant._quant.matvec_q8_0 if layer.bits == 8 else quant._quant.matvec_q4_0
    return kernel(layer.qweight, layer.scales.view(np.uint16), layer._padded(x), None, 0, False,
                  **layer._x_kwargs())


# --- the GPU tests -------------------------------------------------------------------------------------------------

def scaled_error(got, want):
    """SPEC §7: max |Δ| / max(1, max |logit|)."""
    return float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))


def dequantized(model):
    """A quantized model with its weights dequantized to float32: the exact reference of a device that multiplies
    the dequantized weights in float (the GPU path), where bcnp's CPU kernels round x per block first (int8 x for
    int4 weights: 0.01-sized differences in the logits)."""
    return Model(model.config, {k: v.dequantize() if isinstance(v, quant.QuantizedWeight) else v
                                for k, v in model.w.items()})


def prefill_then_decode(model, prompt, split=26):
    """Logits of `split` tokens at once, then one token at a time (the cached path)."""
    cache = model.new_cache()
    return np.concatenate([model.forward(prompt[:split], cache)] + [model.forward([t], cache) for t in prompt[split:]])


@pytest.fixture(scope="module", params=MODELS)
def fixture_model(request):
    """(model, golden logits) of each fixture model, loaded once per test module."""
    return Model.from_pretrained(FIXTURES / request.param / "hf"), np.load(FIXTURES / request.param / "golden.npz")


def with_huge_attention_inputs(model, factor=1e6):
    """The model with layer 0's input_layernorm scaled by `factor`: its q, k, v (and so its float16 prefill
    products and cache entries) go far beyond float16's 65504, though every weight stays within it."""
    w = dict(model.w)
    w["model.layers.0.input_layernorm.weight"] = w["model.layers.0.input_layernorm.weight"] * np.float32(factor)
    return model._with_weights(w, np)


def random_weight(seed, rows, in_features, bits):
    """A weight in the form a kernel reads: (qweight, scales) or float16 values, padded to whole blocks."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, in_features)) * rng.uniform(0.01, 2.0, (rows, 1))).astype(np.float32)
    if bits == 16:
        return gpu_kernels.pad_columns(np, w.astype(np.float16), -(-in_features // 32) * 32), None
    return quantize(w, bits)


def twin_matvec(xp, qweight, scales, bits, x):
    if bits == 16:
        return gpu_kernels.matvec_f16(xp, qweight, x)
    return (gpu_kernels.matvec_q8_0 if bits == 8 else gpu_kernels.matvec_q4_0)(xp, qweight, scales, x)


def kernel_source():
    with open(gpu_kernels.KERNEL_SOURCE, encoding="utf-8") as f:
        return f.read()


def kernel_signatures():
    """{kernel: [(C type, parameter name), ...]} from the extern "C" declarations of quant_kernels.cu."""
    signatures = {}
    code = re.sub(r"//[^\n]*", "", kernel_source())
    for name, params in re.findall(r'extern "C" __global__ void (\w+)\(([^)]*)\)', code):
        params = [re.sub(r"__restrict__|const", "", p).split() for p in params.split(",")]
        signatures[name] = [(" ".join(p[:-1]).replace(" *", "*"), p[-1].lstrip("*")) for p in params]
    return signatures


C_TYPES = {"unsigned int*": (np.int8, np.uint8), "unsigned short*": (np.float16,), "float*": (np.float32,),
           "uint2*": (np.float16,), "int": (np.int32,), "float": (np.float32,), "long long*": (np.int64,)}


def fake_kernels(launched=None):
    """Stand-ins for the RawKernels: each checks a launch against the kernel's C signature (argument count and
    types, one thread per word or enough warps for every row) and computes its result with the NumPy twin.
    `launched`, a list, receives each launched kernel's name."""
    signatures = kernel_signatures()

    def launch(name):
        def kernel(grid, block, args, shared_mem=0):
            if launched is not None:
                launched.append(name)
            params = signatures[name]
            assert len(args) == len(params), name
            bound = {}
            for (ctype, pname), arg in zip(params, args):
                dtype = arg.dtype if isinstance(arg, strict_xp.StrictArray) else type(arg)
                assert np.dtype(dtype) in [np.dtype(t) for t in C_TYPES[ctype]], \
                    f"{name}: {pname} is {ctype}, got {dtype}"
                bound[pname] = arg
            if name == "rms_norm_f32":
                x, out = bound["x"], bound["out"]
                assert grid == (x.shape[0],) and block == (gpu_kernels.NORM_THREADS,) and shared_mem == 0
                assert out.shape == x.shape and bound["w"].shape == (x.shape[1],) == (int(bound["n"]),)
                out[...] = gpu_kernels.rms_norm_f32(strict_xp, x, bound["w"], float(bound["eps"]))
                return
            if name == "silu_mul_f32":
                n = int(bound["n"])
                assert bound["gate"].size == bound["up"].size == bound["out"].size == n
                assert block == (gpu_kernels.ELEMENTWISE_THREADS,)
                assert (grid[0] - 1) * block[0] < n <= grid[0] * block[0]
                bound["out"][...] = gpu_kernels.silu_mul_f32(strict_xp, bound["gate"], bound["up"])
                return
            if name.startswith("kv_store"):
                nh, hd, max_len = int(bound["nh"]), int(bound["hd"]), int(bound["max_len"])
                assert bound["k"].shape == bound["v"].shape == (nh * hd,) and bound["position"].shape == (1,)
                assert bound["cache_k"].shape == bound["cache_v"].shape == (nh, max_len, hd)
                assert block == (gpu_kernels.ELEMENTWISE_THREADS,)
                assert (grid[0] - 1) * block[0] < nh * hd <= grid[0] * block[0]
                position = bound["position"]
                for new, cache in ((bound["k"], bound["cache_k"]), (bound["v"], bound["cache_v"])):
                    if cache.dtype == np.float16:                          # saturates at +-65504
                        new = clamp_to_float16(new)
                    cache[:, position] = new.reshape(nh, 1, hd).astype(cache.dtype)
                return
            if name == "attention_combine":
                scratch, out = bound["scratch"], bound["out"]
                chunks, hd = int(bound["chunks"]), int(bound["hd"])
                nh = out.shape[0]
                assert chunks > 1 and grid == (nh,) and block[0] % 32 == 0 and hd <= block[0] < hd + 32
                assert scratch.shape == (nh, chunks, hd + 2) and out.shape == (nh, hd)
                out[...] = gpu_kernels.attention_combine(strict_xp, scratch[:, :, 0], scratch[:, :, 1],
                                                         scratch[:, :, 2:])
                return
            if name.startswith("attention"):
                q, k, v, bias, out, scratch = (bound[n] for n in ("q", "k", "v", "bias", "out", "scratch"))
                S, hd = int(bound["S"]), int(bound["hd"])
                nh, max_len = k.shape[0], k.shape[1]
                chunks = -(-S // gpu_kernels.ATTENTION_CHUNK)
                assert grid == (nh, chunks) and block == (gpu_kernels.ATTENTION_CHUNK,) and shared_mem == 0
                assert q.shape == out.shape == (nh, hd) and k.shape == v.shape == (nh, max_len, hd) and S <= max_len
                assert int(bound["head_stride"]) == max_len * hd and float(bound["sqrt_hd"]) == np.float32(hd ** 0.5)
                heads = nh if int(bound["bias_head_stride"]) == S else 1
                assert bias.shape == (heads, S) and int(bound["bias_head_stride"]) in (S, 0)
                m, l, o = gpu_kernels.attention_chunks(strict_xp, q, k[:, :S], v[:, :S], bias, hd ** 0.5)
                if chunks == 1:
                    out[...] = gpu_kernels.flush(o[:, 0] / l[:, 0, None])
                else:
                    assert scratch.shape == (nh, chunks, hd + 2)
                    scratch[:, :, 0], scratch[:, :, 1], scratch[:, :, 2:] = m, l, o
                return
            rows, n_pad = int(bound["rows"]), int(bound["n_pad"])
            if name.startswith("matvec"):
                assert block == (gpu_kernels.MATVEC_THREADS,)
                rows_per_block = gpu_kernels.MATVEC_ROWS_PER_BLOCK
                assert grid[0] * rows_per_block >= rows > (grid[0] - 1) * rows_per_block
                assert bound["x"].size == n_pad and bound["y"].size == rows
                if name.startswith("matvec_f16"):
                    def product(suffix=""):
                        assert bound["wt" + suffix].shape == (rows, n_pad)
                        return gpu_kernels.matvec_f16(strict_xp, bound["wt" + suffix], bound["x"])
                else:
                    def product(suffix=""):
                        twin = gpu_kernels.matvec_q8_0 if name.startswith("matvec_q8_0") else gpu_kernels.matvec_q4_0
                        q, d = bound["q" + suffix], bound["d" + suffix]
                        assert q.shape[0] == d.shape[0] == rows and d.shape[1] == n_pad // 32
                        return twin(strict_xp, q, d, bound["x"])
                if name.endswith("_add"):
                    assert bound["r"].shape == (rows,)
                    bound["y"][...] = gpu_kernels.add_residual(bound["r"], product())
                elif name.endswith("_swiglu"):
                    bound["y"][...] = gpu_kernels.silu_mul_f32(strict_xp, product(), product("_up"))
                else:
                    bound["y"][...] = product()
            else:
                words = rows * n_pad // (4 if "q8_0" in name else 8)
                assert block == (gpu_kernels.DEQUANTIZE_THREADS,) and 0 < grid[0] <= 65536
                assert grid[0] * block[0] >= min(words, 65536 * block[0])
                assert bound["out"].shape == (rows, n_pad)
                twin = gpu_kernels.dequantize_q8_0 if "q8_0" in name else gpu_kernels.dequantize_q4_0
                bound["out"][...] = twin(strict_xp, bound["q"], bound["d"], bound["out"].dtype)
        return kernel

    return {name: launch(name) for name in gpu_kernels.KERNEL_NAMES}


def decode_one_at_a_time(model, prompt, split, cache):
    return np.concatenate([model.forward(prompt[:split], cache)] + [model.forward([t], cache) for t in prompt[split:]])
