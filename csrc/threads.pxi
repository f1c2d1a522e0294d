# The kernels' thread count, included by every csrc/*.pyx (one definition; the modules import os and openmp).

def resolve_threads(threads=0):
    """The thread count to use: `threads` if positive, else $OMP_NUM_THREADS, else OpenMP's default."""
    if threads is not None and threads > 0:
        return int(threads)
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return openmp.omp_get_max_threads()
