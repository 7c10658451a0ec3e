"""Prefill on every core: independent pieces of NumPy work side by side on a few Python threads.

NumPy releases the GIL inside its products and element-wise passes, so pieces that write
disjoint outputs can share the cores. A forward of more than one token enters `prefill_threads`:
BLAS is held to one thread, the weight products split their rows (tokens) into one block per
worker (`matmul_t`, QuantMatrix tiles) and attention runs its tiles side by side, softmax passes
included. Why not BLAS's own threads: a BLAS worker keeps spinning for a while after its product,
so whatever follows shares a core with it: the element-wise passes, and above all the decode
steps after a prompt, whose Numba kernels then wait on a busy core (docs/performance.md has
the measurements). Part of the fast path: the plain path (model.py) runs each step as one call.
Left out: process pools; decode (one token: nothing large enough to split). The thread count
is Numba's (`numba.get_num_threads()`, CLI `--threads`), whatever else the machine runs: a
caller waiting on the pool sleeps, so the scheduler moves a displaced worker onto the core it
leaves (the Numba kernels, which spin, run on the free cores: "a busy machine" below); one
process-wide mode, not re-entrant.
"""
from __future__ import annotations

import ctypes
import functools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache

import numba
import numpy as np
from threadpoolctl import ThreadpoolController, threadpool_limits

PREFILL_MIN_T = 2               # tokens in one forward from which prefill_threads splits work
MIN_MACS = 1 << 24              # products smaller than this stay one BLAS call
_ACTIVE = [False]               # inside prefill_threads


@lru_cache(maxsize=None)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="minisparse")


@lru_cache(maxsize=None)
def _blas() -> ThreadpoolController:
    """A controller of the loaded BLAS libraries, made once: inspecting the libraries costs far
    more than setting a limit through a kept controller."""
    return ThreadpoolController()


def active() -> bool:
    return _ACTIVE[0]


@contextmanager
def prefill_threads(T: int):
    """Split the large NumPy work of a T-token forward over Numba's thread count, BLAS on one
    thread meanwhile; a no-op for short calls, one thread, or when already inside."""
    n = numba.get_num_threads()
    if n <= 1 or T < PREFILL_MIN_T or _ACTIVE[0]:
        yield
        return
    _ACTIVE[0] = True
    try:
        with _blas().limit(limits=1, user_api="blas"):
            yield
    finally:
        _ACTIVE[0] = False
        if _FREE[0] != _PINNED:
            _FREE[0] = -1.0     # what a look saw while this prefill's threads ran is not the
                                # machine the decode after it meets: look afresh


def side_by_side(fn, items, n_workers=None):
    """fn(item) for every item: on the pool inside prefill_threads (or when n_workers > 1 is
    given, BLAS then held to one thread here), else in order on this thread. fn must write
    disjoint outputs, and must not call side_by_side itself (a full pool waiting on itself)."""
    n = (numba.get_num_threads() if _ACTIVE[0] else 1) if n_workers is None else int(n_workers)
    n = min(len(items), n)
    if n <= 1:
        for it in items:
            fn(it)
        return
    if _ACTIVE[0]:
        list(_pool(n).map(fn, items))      # list(): wait for all, and re-raise a worker's error
    else:
        with _blas().limit(limits=1, user_api="blas"):
            list(_pool(n).map(fn, items))


def row_blocks(T: int, n_in: int, n_out: int):
    """The rows [a, b) of x for a (T, n_in) @ (n_in, n_out) product: one block per worker inside
    prefill_threads when the product is large, else one block. Rows, not columns: each worker
    packs only its own rows of x, where column blocks each pack all of x."""
    n = numba.get_num_threads() if _ACTIVE[0] else 1
    if n <= 1 or T < 2 * n or T * n_in * n_out < MIN_MACS:
        return [(0, T)]
    step = -(-T // n)
    return [(a, min(T, a + step)) for a in range(0, T, step)]


def matmul_t(x, w):
    """x (T, in) @ w.T for w (out, in) float32 -> (T, out), by row blocks (row_blocks)."""
    blocks = row_blocks(x.shape[0], w.shape[1], w.shape[0])
    if len(blocks) == 1:
        free_cores()            # BLAS's threads follow the cores free now (a busy machine, below)
        return x @ w.T                                                       # (T, out)
    y = np.empty((x.shape[0], w.shape[0]), np.result_type(x, w))            # (T, out)

    def block(ab):
        a, b = ab
        np.matmul(x[a:b], w.T, out=y[a:b])                                  # (b-a, in) @ (in, out)
    side_by_side(block, blocks)
    return y


# ---- the allocator during a prefill
# NumPy allocates each intermediate of a forward afresh. glibc's malloc serves blocks above its
# mmap threshold (128 KiB, raised as such blocks are freed, to 32 MiB at most) by mmap, and gives
# the top of its heaps back to the kernel once more than its trim threshold (2x that) is free:
# in a long prefill, arrays of a few MB then page-fault their memory in again and again (a fresh
# page costs a fault and zeroing). prefill_heap keeps freed memory in the heap while a forward of >= KEEP_HEAP_MIN_T tokens
# runs, then hands it all back (malloc_trim), so what stays resident afterwards is no more than
# before. Other C libraries (macOS, musl): a no-op.
KEEP_HEAP_MIN_T = 64
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3          # mallopt parameters (malloc.h)
_GLIBC_MMAP_MAX = 32 << 20                              # the dynamic threshold's own ceiling
_GLIBC_TRIM = 2 * _GLIBC_MMAP_MAX                       # the trim threshold that goes with it
_HEAP_KEPT = [False]                                    # inside prefill_heap


@lru_cache(maxsize=None)
def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if libc.mallopt and libc.malloc_trim else None
    except (OSError, AttributeError):
        return None


@contextmanager
def prefill_heap(T: int):
    """Keep freed memory in glibc's heap during a forward of T >= KEEP_HEAP_MIN_T tokens, and
    return it to the kernel afterwards; else (or without glibc, or when nested) a no-op.
    Process-wide and left behind: the mmap threshold stays at 32 MiB (glibc's own dynamic
    threshold reaches that value once a 32 MiB block has been freed) and the trim threshold
    at 64 MiB, its usual pair."""
    libc = _glibc() if T >= KEEP_HEAP_MIN_T and not _HEAP_KEPT[0] else None
    if libc is None:
        yield
        return
    _HEAP_KEPT[0] = True
    libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_MAX)    # where glibc's own adjustment ends up
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)            # no trimming during the call
    try:
        yield
    finally:
        libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_TRIM)
        libc.malloc_trim(0)                             # every arena's free pages back
        _HEAP_KEPT[0] = False


# ---- element-wise steps by rows
MIN_ROW_ELEMS = 1 << 18         # element-wise calls smaller than this stay on one thread


def by_rows(*axes):
    """Decorator for fn(*args, out=None) whose output row t depends only on row t of its
    arguments (an element-wise or per-token step: RMSNorm, SwiGLU's gate, RoPE) and has the shape
    and dtype of its first argument. axes[i] is the row axis of positional argument i (None: not
    per row, passed whole). Inside prefill_threads a large call runs on one block of rows per
    worker, side by side, each writing its rows of one output: the same numbers, as no row reads
    another, and no pass to join the blocks (np.concatenate copied each output once more)."""
    def deco(fn):
        @functools.wraps(fn)
        def split(*args, out=None, **kw):
            n = numba.get_num_threads() if _ACTIVE[0] else 1
            x, ax = args[0], axes[0]
            if n <= 1 or x.size < MIN_ROW_ELEMS or x.shape[ax] < n:
                return fn(*args, out=out, **kw)
            out = np.empty_like(x) if out is None else out
            T = x.shape[ax]
            step = -(-T // n)
            rows = lambda arr, axis, a: arr[(slice(None),) * axis + (slice(a, a + step),)]  # noqa: E731

            def block(a):
                fn(*(arg if axis is None else rows(arg, axis, a)
                     for arg, axis in zip(args, axes + (None,) * len(args))),
                   out=rows(out, ax, a), **kw)
            list(_pool(n).map(block, range(0, T, step)))
            return out
        return split
    return deco


# ---- a busy machine
# A Numba parallel region (prange) ends at a barrier that waits for every one of its threads, and
# a decode step enters one per weight matrix. Between regions Numba's OpenMP workers spin, so
# when another process wants one of the cores, the worker there is a CPU-bound task like it: the
# scheduler gives the two alternate turns of milliseconds, and each region waits out the other's
# turn; decode then runs many times slower than on one thread. Workers that sleep instead of
# spinning (OMP_WAIT_POLICY=passive) pay a wake-up per region on an idle machine, which made
# them slower than one thread there. So the Numba kernels (decode's matvec, attend_rows) run on
# `workers()` threads: the thread count asked for, at most the cores that no other process's
# runnable task holds now. (The prefill pool above keeps its size: its caller sleeps.)
# Those are counted from /proc/loadavg's running tasks less this process's own (its spinning
# workers are among them), at most once per CHECK_S, and less often where a look itself is slow
# (one /proc file per thread of this process: on many cores, hundreds), so that looking takes at
# most 1/LOOK_EVERY of the time; where /proc is missing, every core is free.
# The count is machine-wide, set against this process's CPU set: a process pinned elsewhere
# still counts as taking a core. BLAS's own workers wait on each other the same way (a float32
# model's decode is all BLAS), so outside a prefill (which holds BLAS to one thread) each look
# also holds BLAS to the free cores, up to the thread count it had before (or set_threads').
CHECK_S = 0.05                  # seconds between two looks at the machine, at least
LOOK_EVERY = 100                # and at least this many times what the last look took
_FREE = [-1.0, 0]               # when free_cores looks next, and what it found last
_PINNED = float("inf")          # _FREE[0] under pinned_free_cores: no look until it ends
_BLAS_TOP = [0]                 # BLAS's thread count to return to (0: not read yet)
_BLAS_NOW = [0]                 # the count free_cores last gave BLAS


def _own_running() -> int:
    """This process's threads that are running or runnable now (state R in /proc)."""
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                stat = f.read()
        except OSError:                     # the thread ended meanwhile
            continue
        end = stat.rindex(b")")             # "tid (name) S ...": the name may hold spaces
        n += stat[end + 2: end + 3] == b"R"
    return n


def _running() -> int:
    """The machine's tasks running or runnable now (/proc/loadavg's fourth field)."""
    with open("/proc/loadavg", "rb") as f:
        return int(f.read().split()[3].split(b"/")[0])             # "0.52 0.58 0.59 3/467 1234"


def _look() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        # this process's threads are counted just before and just after the machine's: a worker
        # that stops spinning or a prefill thread that finishes between the reads would else
        # be taken for another process's task, and the decode after it held to one thread; a
        # task of another process that holds a core stays runnable, and the next look counts it
        before = _own_running()
        running = _running()
        others = max(0, running - max(before, _own_running()))
    except (OSError, ValueError, IndexError):
        return cpus
    return max(1, min(cpus, (os.cpu_count() or cpus) - others))


def free_cores() -> int:
    """Cores of this process's CPU set that no other process is running on now (at least 1);
    looked up at most once per CHECK_S seconds (see LOOK_EVERY), else the last answer.

    >>> 1 <= free_cores() <= os.cpu_count()
    True
    """
    now = time.monotonic()
    if now >= _FREE[0]:
        _FREE[1] = _look()
        _FREE[0] = now + max(CHECK_S, LOOK_EVERY * (time.monotonic() - now))
        if not _ACTIVE[0]:      # prefill_threads holds BLAS to one thread and sets it back after
            _blas_on(_FREE[1])
    return _FREE[1]


@contextmanager
def pinned_free_cores(n: int):
    """free_cores() answers n inside, without looking at the machine, so workers() is
    min(Numba's count, n): what a caller needs to run the variant of each kernel that a given
    thread count takes (a multi-threaded run takes the one-thread variants too, whenever another
    process holds a core), whatever the machine runs now. BLAS's count is not touched. The
    first call after looks afresh. Process-wide, not re-entrant.

    >>> with pinned_free_cores(1):
    ...     workers()
    1
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"pinned_free_cores: n must be an integer >= 1, got {n!r}")
    _FREE[0], _FREE[1] = _PINNED, int(n)
    try:
        yield
    finally:
        _FREE[0] = -1.0


def _blas_on(free: int):
    """Hold BLAS (the libraries _blas() found) to min(free, _BLAS_TOP) threads."""
    if not _BLAS_TOP[0]:
        _BLAS_TOP[0] = max((lib["num_threads"] for lib in _blas().info()
                            if lib["user_api"] == "blas"), default=1)
    n = min(free, _BLAS_TOP[0])
    if n != _BLAS_NOW[0]:
        _blas().limit(limits=n, user_api="blas")        # kept: not a context, no restore
        _BLAS_NOW[0] = n


_NUMBA = [-1.0, 0]              # when numba_threads reads Numba's count next, and its value


def numba_threads() -> int:
    """numba.get_num_threads(), read at most once per CHECK_S: a read costs about a microsecond
    and a decode step asks once per weight matrix. set_threads reads it afresh."""
    now = time.monotonic()
    if now >= _NUMBA[0]:
        _NUMBA[0], _NUMBA[1] = now + CHECK_S, numba.get_num_threads()
    return _NUMBA[1]


def workers() -> int:
    """Threads for a parallel Numba call now: Numba's thread count (CLI --threads), at most
    free_cores()."""
    n = numba_threads()
    return n if n <= 1 else min(n, free_cores())


def on_threads(n: int, kernel, *args):
    """kernel(*args), a Numba parallel kernel, on n threads; Numba's count is set back after."""
    if n >= numba_threads():
        return kernel(*args)
    m = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(m)


BLAS_ENV = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS", "OMP_NUM_THREADS")


def set_threads(n: int):
    """Run on at most n threads from here on, process-wide: Numba's kernels, the prefill pool
    (sized by Numba's count) and every BLAS and OpenMP library, those loaded now (threadpoolctl)
    and those loaded later (Numba's first parallel call loads SciPy's OpenBLAS), which read
    BLAS_ENV when they load. Without the BLAS limit, BLAS keeps a thread per core and `-t 1`
    would still wait on one that another process displaced."""
    numba.set_num_threads(n)
    _NUMBA[0] = -1.0
    os.environ.update({name: str(n) for name in BLAS_ENV})
    threadpool_limits(limits=n)
    _BLAS_TOP[0] = _BLAS_NOW[0] = n
