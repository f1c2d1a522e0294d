"""bcnp without its compiled modules (a machine with no C compiler or Python.h, as a fresh GPU machine may be):
one warning, then the NumPy specification does the work, with the same logits."""
import subprocess
import sys

import numpy as np

from bcnp import Model
from conftest import FIXTURES, MODELS

HIDE_COMPILED = ("import sys; sys.modules['bcnp._quant'] = sys.modules['bcnp._dtypes'] = "
                 "sys.modules['bcnp._attention'] = None\n")

# In the child: the bfloat16 fixture (its weights widened without bcnp._dtypes), float and int8 logits.
CHILD = HIDE_COMPILED + """
import numpy as np
from bcnp import Model, quant
model = Model.from_pretrained(sys.argv[1])
golden = np.load(sys.argv[2])
q8 = model.quantize(8)
q8.cache_dtype = np.dtype(np.float32)        # the linears' fallback alone (a float16 cache's: tests/test_attention.py)
cache = q8.new_cache()
prompt = golden["prompt_2"]
np.savez(sys.argv[3], kernels=quant._quant.SIMD, float=model.logits(prompt), q8=q8.logits(prompt),
         q8_decode=np.concatenate([q8.forward(prompt[:26], cache)] + [q8.forward([t], cache) for t in prompt[26:]]))
"""


def run_without_compiled_modules(*args):
    return subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_without_compiled_modules_bcnp_warns_once_and_computes_the_same_logits(tmp_path):
    fixture = FIXTURES / MODELS[0]                                   # bfloat16: the _dtypes path too
    result = run_without_compiled_modules(fixture / "hf", fixture / "golden.npz", tmp_path / "out.npz")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warnings) == 1, result.stderr
    assert "bcnp._quant and bcnp._dtypes and bcnp._attention" in warnings[0]
    assert "python setup.py build_ext --inplace" in warnings[0]
    assert "Python.h" in warnings[0]

    out, golden = np.load(tmp_path / "out.npz"), np.load(fixture / "golden.npz")
    assert str(out["kernels"]) == "numpy"
    want = golden["logits_full_2"]
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(out["float"] - want).max() <= 1e-4 * scale
    compiled = Model.from_pretrained(fixture / "hf").quantize(8)
    compiled.cache_dtype = np.dtype(np.float32)                                 # as the child's
    # quantizing is bit-identical and the fallback rounds x as the kernels do (bcnp.quant.round_activation), then
    # multiplies the dequantized weight in float32: equal up to the order of the float32 sums -- and to where such
    # a last-bit difference moves an element of x across one of its rounding steps (2^-16 of its block's largest),
    # which measured up to 4.3e-5 here; SPEC's tolerance against the original holds
    np.testing.assert_allclose(out["q8"], compiled.logits(golden["prompt_2"]), rtol=0, atol=1e-4 * scale)
    assert np.abs(out["q8_decode"] - out["q8"]).max() <= 1e-4 * scale


def test_the_fallback_answers_the_compiled_modules_calls_with_its_results():
    from bcnp import quant
    assert quant._quant is not quant.NumpyKernels                      # built here: compare with it
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 64)).astype(np.float32)
    x = rng.standard_normal(64).astype(np.float32)
    for bits in (8, 4):
        q, d = getattr(quant.NumpyKernels, f"quantize_q{bits}_0")(w, "w", 0)
        want_q, want_d = getattr(quant._quant, f"quantize_q{bits}_0")(w, "w", 0)            # the compiled module
        np.testing.assert_array_equal(q, want_q)
        np.testing.assert_array_equal(d, want_d)
        dequantize = getattr(quant.NumpyKernels, f"dequantize_q{bits}_0")
        np.testing.assert_array_equal(dequantize(q, d), getattr(quant._quant, f"dequantize_q{bits}_0")(q, d))
        out = np.empty((5, 64), np.float32)
        assert dequantize(q, d, out, 1) is out
        for x_bits in ((16, 8) if bits == 8 else (8,)):
            kw = {"x_bits": x_bits} if bits == 8 else {}
            y = getattr(quant.NumpyKernels, f"matvec_q{bits}_0")(q, d, x, None, 0, **kw)
            np.testing.assert_allclose(y, dequantize(q, d).astype(np.float64) @ quant.rounded_activation(x, x_bits),
                                       rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(y, getattr(quant._quant, f"matvec_q{bits}_0")(q, d, x, None, 0, **kw),
                                       rtol=1e-5, atol=1e-5)
            xs = np.stack([x, -x])
            np.testing.assert_allclose(getattr(quant.NumpyKernels, f"matmul_q{bits}_0")(q, d, xs, None, 0, **kw),
                                       getattr(quant._quant, f"matmul_q{bits}_0")(q, d, xs, None, 0, **kw),
                                       rtol=1e-5, atol=1e-5)
