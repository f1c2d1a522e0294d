"""One-token decode steps on the device, replayed from CUDA graphs."""
import warnings

from ..forward import transformer
from ..cache import to_numpy
from .cache import GraphKVCache
from .kernels import first_line, is_cupy
from .ops import DecodeOps


class DecodeGraphs:
    """One-token decode steps on a DeviceKVCache, replayed from CUDA graphs.

    Launching a step's ~340 kernels (8 a layer: bcnp.gpu.ops.DecodeOps) one by one from Python costs more than
    the GPU needs to run them. A step's kernels and shapes are fixed by its window (the positions it attends to,
    rounded up to WINDOW) and its token and position are read from device arrays, so the first step in each
    window runs eagerly (compiling kernels, sizing the memory pool) and is then captured; the rest of the
    window replays the graph: one launch per token. On an array module other than CuPy every step runs the same
    code op by op, which lets the CPU prove the fixed-shape step computes what transformer() does.

    Memory: a graph writes to the addresses its capture allocated, at every replay, but CuPy takes a buffer back
    into its pool as soon as Python drops it. In the default pool, those addresses would go to other arrays, and
    `free_all_blocks()` (which CuPy itself calls on an out-of-memory) would hand them back to the driver: silent
    corruption or an illegal address. So each window's eager step and capture allocate from a MemoryPool of
    their own, kept with the graph (`self.graphs[window]`) and used by nothing else: after the capture no one
    allocates from it again, and the pool lives as long as the graph.

    The cache keeps its DecodeGraphs (`cache.decoder`) but the DecodeGraphs does not keep the cache: no reference
    cycle, so a dropped cache frees its KV arrays, graphs and pools at once, not at the next cycle collection."""
    WINDOW = 256

    def __init__(self, model):
        xp = model.xp
        self.model = model
        self.token = xp.zeros(1, dtype=xp.int64)
        self.position = xp.zeros(1, dtype=xp.int64)
        self.graphs = {}                                    # window -> (graph, logits it writes, its memory pool)
        self.stream = xp.cuda.Stream(non_blocking=True) if is_cupy(xp) else None    # capture needs its own stream

    def window(self, cache):
        return min(-(-(cache.length + 1) // self.WINDOW) * self.WINDOW, cache.max_len)

    def step(self, cache, token):
        """Host float32 logits (V,) after appending `token` to `cache`."""
        xp = self.model.xp
        if cache.length + 1 > cache.max_len:
            raise ValueError(f"{cache.length} cached + 1 new token exceed the context of {cache.max_len}")
        if self.stream is None:
            return to_numpy(self._run(cache, token))
        self.stream.wait_event(xp.cuda.get_current_stream().record())      # after the prefill, on its stream
        with self.stream:
            return self._run(cache, token).get()                            # .get() waits for the stream

    def _run(self, cache, token):
        xp, model = self.model.xp, self.model
        window = self.window(cache)
        self.token[...] = token                                             # fills on the device: no copy to record
        self.position[...] = cache.length
        if window in self.graphs:
            graph, logits, _ = self.graphs[window]
            graph.launch(self.stream)
        elif self.stream is not None and model.graphs:
            pool = xp.cuda.MemoryPool()
            with xp.cuda.using_allocator(pool.malloc):
                logits = self._forward(cache, window)                       # eager: compiles, sizes the pool
                self._capture(cache, window, pool)
        else:
            logits = self._forward(cache, window)
        cache.length += 1
        return logits[0]

    def _forward(self, cache, window):
        model = self.model
        step = GraphKVCache(cache.k, cache.v, cache.length, cache.kernels, position=self.position, window=window)
        return transformer(model.xp, model.w, model.config, self.token, step, last_only=True,
                           ops=DecodeOps(step.kernels))

    def _capture(self, cache, window, pool):
        """Record the step at `window` (nothing runs: the eager step before did the work), allocating from
        `pool`, which the graph then keeps."""
        model = self.model
        try:
            self.stream.begin_capture()
            try:
                logits = self._forward(cache, window)
            except Exception:
                try:
                    self.stream.end_capture()                              # leave capture mode, keep the cause
                except Exception:
                    pass
                raise
            self.graphs[window] = (self.stream.end_capture(), logits, pool)
        except Exception as e:                 # a CuPy or driver that cannot capture this: decode op by op
            model.graphs = False
            warnings.warn(f"CUDA graph capture failed, decoding without graphs: {first_line(e)}", RuntimeWarning)
