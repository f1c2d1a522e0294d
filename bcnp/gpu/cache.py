"""The KV cache on the device: decode attention in one kernel, and the fixed-shape step a CUDA graph records."""
import math
from dataclasses import dataclass

import numpy as np

from ..tensor import FLOAT16_MAX
from ..cache import KVCache
from .kernels import ATTENTION_CHUNK, ELEMENTWISE_THREADS, MAX_DIMS_PER_LANE, WARP, attention_decode

@dataclass
class DeviceKVCache(KVCache):
    """The KV cache on the device: one new token attends in the kernel attention_decode (the cache read as it is
    stored, float16 or float32; one launch per layer, two beyond 256 positions); several tokens (prefill) as on
    the CPU.
    With `kernels` None (an array module other than CuPy) the kernel's NumPy twin stands in."""
    kernels: object = None

    def store(self, i, k, v):
        if self.k.dtype == np.float16:                   # as the kernel kv_store_f16: saturate, not infinity
            k, v = clamp_to_float16(k), clamp_to_float16(v)
        super().store(i, k, v)

    def attend(self, xp, i, q, bias):
        nh, T, hd = q.shape
        S = bias.shape[-1]
        if T != 1 or hd > WARP * MAX_DIMS_PER_LANE:
            return super().attend(xp, i, q, bias)
        bias = bias.reshape(bias.shape[0], S)                                # (nh or 1, S)
        sqrt_hd = math.sqrt(hd)
        if self.kernels is None:
            return attention_decode(xp, q[:, 0], self.k[i, :, :S], self.v[i, :, :S], bias, sqrt_hd)[:, None]
        chunks = -(-S // ATTENTION_CHUNK)
        out = xp.empty((nh, hd), dtype=xp.float32)
        scratch = xp.empty((nh, chunks, hd + 2) if chunks > 1 else (1,), dtype=xp.float32)
        name = "attention_decode_f16" if self.k.dtype == np.float16 else "attention_decode_f32"
        q, bias = xp.ascontiguousarray(q.reshape(nh, hd)), xp.ascontiguousarray(bias)
        self.kernels[name]((nh, chunks), (ATTENTION_CHUNK,),
                           (q, self.k[i], self.v[i], bias, out, scratch, np.int32(S), np.int32(hd),
                            np.int32(self.max_len * hd), np.int32(S if bias.shape[0] > 1 else 0),
                            np.float32(sqrt_hd)))
        if chunks > 1:
            self.kernels["attention_combine"]((nh,), (-(-hd // WARP) * WARP,),
                                              (scratch, out, np.int32(chunks), np.int32(hd)))
        return out[:, None]


@dataclass
class GraphKVCache(DeviceKVCache):
    """A one-token step over a DeviceKVCache's arrays whose position is read from the device array `position`
    and which attends to a fixed `window` of positions (those past the token's own are masked): its kernels and
    shapes do not depend on the position, so a CUDA graph of it serves every position inside the window."""
    position: object = None                                                 # (1,) int64, on the device
    window: int = 0

    def positions(self, xp, T):
        assert T == 1, "a graph step decodes one token"
        return self.position

    def span(self, T):
        return self.window

    def store(self, i, k, v):
        if self.kernels is None:                                            # the kernel kv_store's twin
            if self.k.dtype == np.float16:
                k, v = clamp_to_float16(k), clamp_to_float16(v)
            self.k[i][:, self.position] = k.transpose(1, 0, 2).astype(self.k.dtype)     # (nh, 1, hd)
            self.v[i][:, self.position] = v.transpose(1, 0, 2).astype(self.v.dtype)
            return
        nh, hd = k.shape[1], k.shape[2]
        name = "kv_store_f16" if self.k.dtype == np.float16 else "kv_store_f32"
        self.kernels[name]((-(-nh * hd // ELEMENTWISE_THREADS),), (ELEMENTWISE_THREADS,),
                           (k.reshape(nh * hd), v.reshape(nh * hd), self.k[i], self.v[i], self.position,
                            np.int32(nh), np.int32(hd), np.int32(self.max_len)))


def clamp_to_float16(a):
    """a (float32) limited to float16's finite range, NaN kept: what a float16 KV cache stores. A key or value
    beyond 65504 would otherwise be stored as infinity, and every later score of its head would be NaN; clamping
    keeps the model running, as other float16 engines do (a ggml_clamp(v, -65504, 65504) before the cast to
    the cache). to_device(model, dtype="float32") keeps such values exactly."""
    return a.clip(-FLOAT16_MAX, FLOAT16_MAX)
