"""The CUDA source (bcnp/cuda/): its kernel names, launch shapes and signatures agree with the Python that launches
them; it compiles with nvcc and with NVRTC as CuPy compiles it, where those exist.
"""
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import strict_xp
from bcnp.gpu import kernels as gpu_kernels
from bcnp.gpu.weights import DeviceQuantizedWeight
from bcnp.quant import dequantize
from conftest import FIXTURES, fake_kernels, kernel_source, random_weight

# --- the CUDA source -------------------------------------------------------------------------------------------------

def test_kernel_names_and_launch_shapes_agree_with_the_source():
    source = kernel_source()
    assert set(re.findall(r'extern "C" __global__ void (\w+)\(', source)) == set(gpu_kernels.KERNEL_NAMES)
    define = {name: int(value) for name, value in re.findall(r"#define (\w+) (\d+)", source)}
    assert gpu_kernels.MATVEC_THREADS == 32 * define["WARPS"]
    assert gpu_kernels.MATVEC_ROWS_PER_BLOCK == define["WARPS"] * define["ROWS"]
    assert (gpu_kernels.ATTENTION_WARPS, gpu_kernels.MAX_DIMS_PER_LANE) == (define["ATTENTION_WARPS"],
                                                                    define["MAX_DIMS_PER_LANE"])
    assert gpu_kernels.NORM_THREADS == define["NORM_THREADS"]


# what a launch may pass for each C parameter type: device arrays of these dtypes, or np.int32


@pytest.mark.parametrize("bits", [8, 4, 16])
@pytest.mark.parametrize("rows", [1, 8, 13])
def test_kernel_launches_match_the_cuda_signatures(bits, rows):
    qweight, scales = random_weight(bits, rows, 100, bits)
    x = np.random.default_rng(4).standard_normal((3, 100)).astype(np.float32)
    plain = DeviceQuantizedWeight(strict_xp, strict_xp.asarray(qweight),
                                  None if scales is None else strict_xp.asarray(scales), bits, 100, np.float32)
    launched = DeviceQuantizedWeight(strict_xp, plain.qweight, plain.scales, bits, 100, np.float32, fake_kernels())
    for T in (1, 3):                                   # the matvec kernel, then dequantize + matmul
        np.testing.assert_array_equal(launched.matmul(strict_xp.asarray(x[:T])).get(),
                                      plain.matmul(strict_xp.asarray(x[:T])).get())
    for dtype in (np.float32, np.float16):
        np.testing.assert_array_equal(launched.expanded(dtype).get(), plain.expanded(dtype).get())


NO_NVCC = pytest.mark.skipif(shutil.which("nvcc") is None,
                             reason="nvcc is not installed, so the CUDA source cannot be compiled on this machine "
                                    "(CuPy compiles it with NVRTC at run time on a GPU machine)")
CUPY_FLAGS_FOR_NVCC = gpu_kernels.NVRTC_OPTIONS + ("-ftz=true",)     # what CuPy passes that nvcc also understands


def nvcc(tmp_path, arch, output):
    out = tmp_path / f"quant_kernels.{output}"
    result = subprocess.run(["nvcc", *CUPY_FLAGS_FOR_NVCC, f"-arch={arch}", f"--{output}", "-Werror", "all-warnings",
                             "-o", str(out), gpu_kernels.KERNEL_SOURCE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return out.read_bytes()


@NO_NVCC
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_source_compiles_with_nvcc(tmp_path, arch):
    binary = nvcc(tmp_path, arch, "cubin")
    for name in gpu_kernels.KERNEL_NAMES:
        assert name.encode() in binary


@NO_NVCC
def test_with_cupys_flags_every_float32_operation_flushes_subnormals(tmp_path):
    """Why the twins flush: compiled as CuPy compiles it (-ftz=true, for an H100/H200), every float32 add,
    multiply, divide, square root, FMA, max and exp2 in the PTX is the .ftz form; no IEEE-subnormal one is left."""
    ptx = nvcc(tmp_path, "sm_90", "ptx").decode()
    float_ops = re.findall(r"\b(?:add|sub|mul|div|sqrt|fma|max|min|ex2)(?:\.(?:rn|rm|rz|rp|approx|full))*"
                           r"(?:\.ftz)?(?:\.sat)?\.f32\b", ptx)
    assert len(float_ops) > 1000
    assert [op for op in float_ops if ".ftz" not in op] == []
    # the float16 conversions are inline PTX, untouched by -ftz: float16 subnormals convert exactly
    assert "cvt.f32.f16" in ptx and "cvt.ftz.f32.f16" not in ptx


def nvrtc_library():
    """libnvrtc from the system, a CUDA toolkit or the pip wheel nvidia-cuda-nvrtc-cu12/-cu13 (what CuPy loads)."""
    import ctypes.util
    import glob
    import importlib.util
    places = ["/usr/local/cuda*/lib*/libnvrtc.so*"]
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        places += [f"{root}/cuda_nvrtc/lib/libnvrtc.so*", f"{root}/cu13/lib/libnvrtc.so*"]
    found = [path for place in places for path in sorted(glob.glob(place)) if ".alt." not in path]
    return ctypes.util.find_library("nvrtc") or (found[0] if found else None)


@pytest.mark.skipif(nvrtc_library() is None, reason="NVRTC (libnvrtc) is not installed on this machine")
def test_cuda_source_compiles_with_nvrtc_as_cupy_compiles_it():
    """CuPy compiles the kernels at run time with NVRTC, which has no system headers: compile the file the same
    way (the options gpu_kernels.cuda_kernels passes, then CuPy's own, for an sm_90 GPU: a CUBIN) and find every
    kernel in it."""
    import ctypes
    nvrtc = ctypes.CDLL(nvrtc_library())
    program = ctypes.c_void_p()
    source = kernel_source().encode()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), source, b"quant_kernels.cu", 0, None, None) == 0
    options = [o.encode() for o in gpu_kernels.NVRTC_OPTIONS + gpu_kernels.CUPY_NVRTC_OPTIONS + ("-arch=sm_90",)]
    status = nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    assert status == 0, log.value.decode(errors="replace")
    assert nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(size)) == 0
    cubin = ctypes.create_string_buffer(size.value)
    assert nvrtc.nvrtcGetCUBIN(program, cubin) == 0
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    for name in gpu_kernels.KERNEL_NAMES:
        assert name.encode() in cubin.raw, name


def test_gpu_bench_runs_end_to_end_on_numpy():
    """tools/gpu_bench.py --smoke: the benchmark's code path with NumPy and tiny sizes, so the one GPU run a
    session may get is not spent on a bug in the script."""
    root = FIXTURES.parent.parent
    result = subprocess.run([sys.executable, str(root / "tools" / "gpu_bench.py"), "--smoke", "--layers", "1,2",
                             "--tokens", "2", "--prompt", "8"], capture_output=True, text=True, timeout=300, cwd=root)
    assert result.returncode == 0, result.stderr
    table = result.stdout.splitlines()[-5:]
    assert table[0].split()[:5] == ["mode", "GB/token", "tok/s", "roofline", "ratio"]
    assert [line.split()[0] for line in table[1:4]] == ["fp16", "int8", "int4"]
    result = subprocess.run(["bash", "-n", str(root / "tools" / "gpu_check.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
