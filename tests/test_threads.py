"""Thread counts: `-t` governs every pool, and parallel work leaves out the cores that other
processes hold (minisparse.fast.threads, "a busy machine")."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numba
import numpy as np
import pytest
from threadpoolctl import threadpool_info

import minisparse
from minisparse.fast import quant, threads
from minisparse.fast import attention as kernel

ROOT = Path(__file__).resolve().parent.parent


def blas_threads():
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_cli_threads_1_holds_numba_and_blas_to_one_thread(stories_path):
    # in a fresh process: the limit is process-wide and stays, as it should for the CLI; after a
    # generate, as Numba's first parallel call loads a second OpenBLAS (SciPy's)
    code = ("import json, numba, threadpoolctl\n"
            "from minisparse.cli import main\n"
            "blas = lambda: [l['num_threads'] for l in threadpoolctl.threadpool_info() "
            "if l['user_api'] == 'blas']\n"
            "before = blas()\n"
            f"rc = main(['-t', '1', 'generate', '-m', {str(stories_path)!r}, '-p', 'Once', "
            "'-n', '3', '--temp', '0'])\n"
            "print(json.dumps({'rc': rc, 'before': before, 'after': blas(), "
            "'numba': numba.get_num_threads()}))\n")
    env = {k: v for k, v in os.environ.items() if k not in threads.BLAS_ENV}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300, check=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    assert res["rc"] == 0 and res["numba"] == 1
    assert len(res["after"]) >= len(res["before"]) and all(n == 1 for n in res["after"])
    if (os.cpu_count() or 1) > 1:
        assert max(res["before"]) > 1          # the limit changed something: BLAS had more threads


def test_set_threads_is_the_limit_of_blas_and_numba(monkeypatch):
    before, blas_before = numba.get_num_threads(), blas_threads()
    for name in threads.BLAS_ENV:
        monkeypatch.delenv(name, raising=False)               # set back after the test
    from threadpoolctl import threadpool_limits
    try:
        with threadpool_limits(limits=None):   # set back on exit, for the tests that follow
            threads.set_threads(1)
            assert numba.get_num_threads() == 1 and all(n == 1 for n in blas_threads())
            assert all(os.environ[name] == "1" for name in threads.BLAS_ENV)   # libraries to come
    finally:
        numba.set_num_threads(before)
    assert blas_threads() == blas_before


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: nothing to leave out")
def test_a_busy_process_takes_a_core_from_free_cores():
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)                        # started and spinning: always runnable (state R)
        seen = []
        for _ in range(5):
            threads._FREE[0] = -1.0            # look again now, not the last answer
            seen.append(threads.free_cores())
            time.sleep(0.01)
    finally:
        hog.kill()
        hog.wait()
    # the hog is one runnable task of another process, always counted; the machine's other
    # load can only take more cores, and free_cores never answers less than one
    assert all(1 <= n <= max(1, os.cpu_count() - 1) for n in seen), seen


def test_this_process_threads_count_as_its_own_not_as_others():
    stop = threading.Event()
    data = b"x" * (16 << 20)

    def spin():                                # hashlib lets go of the GIL on large buffers
        while not stop.is_set():
            hashlib.sha256(data).digest()
    t = threading.Thread(target=spin)
    t.start()
    try:
        time.sleep(0.2)
        own = max(threads._own_running() for _ in range(20))
    finally:
        stop.set()
        t.join()
    assert own >= 2                            # this thread (reading /proc) and the hashing one


def test_a_thread_of_this_process_that_stops_between_the_reads_is_not_taken_for_another(monkeypatch):
    # the machine's running tasks are read between two counts of this process's own: a worker of
    # ours that was running for the machine's read but no longer for one count (or not yet for
    # the other) must not be counted as another process's task holding a core
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    monkeypatch.setattr(threads, "_running", lambda: 2)           # ours: this thread and a worker
    counts = iter([2, 1])                                         # the worker stopped after the read
    monkeypatch.setattr(threads, "_own_running", lambda: next(counts))
    assert threads._look() == min(cpus, os.cpu_count())           # no other process: all free
    counts = iter([1, 2])                                         # ... or started just before it
    assert threads._look() == min(cpus, os.cpu_count())
    counts = iter([1, 1])                                         # a task that is not ours: a core
    assert threads._look() == max(1, min(cpus, os.cpu_count() - 1))


def test_a_look_taken_during_a_prefill_is_not_kept_for_the_decode_after_it(monkeypatch):
    # while a prefill's threads run, a look may see them mid-change; the decode after the
    # prefill looks afresh instead of keeping that answer for CHECK_S
    if numba.get_num_threads() < 2:
        pytest.skip("a prefill splits work only on two or more threads")
    looks = []
    monkeypatch.setattr(threads, "_FREE", [-1.0, 0])
    monkeypatch.setattr(threads, "_look", lambda: looks.append(1) or 1)
    monkeypatch.setattr(threads, "_blas_on", lambda n: None)
    with threads.prefill_threads(64):
        assert threads.free_cores() == 1 and len(looks) == 1
    threads.free_cores()
    assert len(looks) == 2                                        # looked again, at once
    with threads.pinned_free_cores(2), threads.prefill_threads(64):
        pass
    with threads.pinned_free_cores(2):                            # a pin outlives a prefill inside it
        with threads.prefill_threads(64):
            pass
        assert threads.free_cores() == 2 and len(looks) == 2


def test_workers_are_numba_threads_at_most_free_cores(monkeypatch):
    monkeypatch.setattr(threads, "numba_threads", lambda: 4)
    monkeypatch.setattr(threads, "free_cores", lambda: 1)
    assert threads.workers() == 1
    monkeypatch.setattr(threads, "free_cores", lambda: 3)
    assert threads.workers() == 3
    monkeypatch.setattr(threads, "free_cores", lambda: 16)
    assert threads.workers() == 4


def test_free_cores_looks_at_most_once_per_check(monkeypatch):
    looks = []
    monkeypatch.setattr(threads, "_look", lambda: looks.append(1) or 2)
    monkeypatch.setattr(threads, "_FREE", [-1.0, 0])
    assert [threads.free_cores() for _ in range(100)] == [2] * 100
    assert len(looks) == 1
    threads._FREE[0] -= threads.CHECK_S        # as if CHECK_S had passed (the look was quick)
    threads.free_cores()
    assert len(looks) == 2


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="Numba started with one thread")
def test_on_threads_runs_on_n_threads_and_sets_the_count_back(monkeypatch):
    monkeypatch.setattr(threads, "_NUMBA", [-1.0, 0])         # Numba's count read afresh
    before = numba.get_num_threads()
    assert threads.on_threads(1, numba.get_num_threads) == 1
    assert numba.get_num_threads() == before


def test_numba_threads_is_read_at_most_once_per_check_and_afresh_by_set_threads(monkeypatch):
    from threadpoolctl import threadpool_limits
    before = numba.get_num_threads()
    monkeypatch.setattr(threads, "_NUMBA", [-1.0, 0])
    assert threads.numba_threads() == before
    numba.set_num_threads(1)
    try:
        assert threads.numba_threads() == before           # within CHECK_S: the value read
        with threadpool_limits(limits=None):
            for name in threads.BLAS_ENV:
                monkeypatch.delenv(name, raising=False)    # set back after the test
            threads.set_threads(1)
            assert threads.numba_threads() == 1
    finally:
        numba.set_num_threads(before)
        threads._NUMBA[0] = -1.0


def test_a_busy_machine_decodes_on_one_thread_to_the_same_token(stories_path, monkeypatch):
    # every parallel kernel of a decode step goes through on_threads; with one free core none
    # does, and the step runs the serial kernels instead
    model = minisparse.load_model(stories_path)
    monkeypatch.setattr(threads, "numba_threads", lambda: 2)
    monkeypatch.setattr(quant, "PARALLEL_MIN_WEIGHTS", 0)        # stories260K's small matrices too
    monkeypatch.setattr(kernel, "PARALLEL_MIN_WORK", 0)
    calls = []
    real = threads.on_threads
    spy = lambda n, *a: calls.append(n) or real(n, *a)            # noqa: E731
    monkeypatch.setattr(quant, "on_threads", spy)
    monkeypatch.setattr(kernel, "on_threads", spy)
    ids = [1, 403, 407, 261, 378]
    logits = {}
    for free in (2, 1):
        monkeypatch.setattr(threads, "free_cores", lambda: free)
        calls.clear()
        cache = model.new_cache()
        model.forward(ids[:-1], cache)
        logits[free] = model.forward(ids[-1:], cache)[-1]
        assert (len(calls) > 0 and set(calls) == {2}) if free == 2 else calls == []
    # the serial and parallel kernels run the same per-row code (_matvec_rows, _attend_row) on the
    # same rows; only which thread runs a row differs, so the logits agree to float32 noise
    # (the bound of test_prefill_split_over_threads_equals_one_thread)
    assert np.abs(logits[1] - logits[2]).max() <= 1e-4
    assert np.argmax(logits[1]) == np.argmax(logits[2])


def test_prefill_on_a_busy_machine_keeps_blas_on_one_thread_and_its_pool(monkeypatch):
    # the prefill pool keeps Numba's count: its caller sleeps while it waits, so the scheduler
    # moves a displaced worker onto the core the caller leaves
    monkeypatch.setattr(threads.numba, "get_num_threads", lambda: 2)
    monkeypatch.setattr(threads, "free_cores", lambda: 1)
    with threads.prefill_threads(1024):
        assert threads.active()
        assert all(lib["num_threads"] == 1 for lib in threads._blas().info()     # the BLAS it holds
                   if lib["user_api"] == "blas")
        assert threads.row_blocks(1024, 1024, 1024) == [(0, 512), (512, 1024)]


def test_blas_follows_the_free_cores_outside_a_prefill(monkeypatch):
    from threadpoolctl import threadpool_limits
    nblas = lambda: {lib["num_threads"] for lib in threads._blas().info()    # noqa: E731
                     if lib["user_api"] == "blas"}
    free = [1]
    monkeypatch.setattr(threads, "_look", lambda: free[0])
    monkeypatch.setattr(threads, "_FREE", [-1.0, 0])
    monkeypatch.setattr(threads, "_BLAS_TOP", [3])      # as after set_threads(3)
    monkeypatch.setattr(threads, "_BLAS_NOW", [0])
    with threadpool_limits(limits=None):                # BLAS set back on exit
        assert threads.free_cores() == 1 and nblas() == {1}
        free[0] = 8
        threads._FREE[0] = -1.0                         # look again now
        assert threads.free_cores() == 8 and nblas() == {3}    # never above its own count
        monkeypatch.setattr(threads.numba, "get_num_threads", lambda: 2)
        with threads.prefill_threads(1024):
            free[0] = 2
            threads._FREE[0] = -1.0
            threads.free_cores()
            assert threads.active() and nblas() == {1}     # the prefill's hold stands
        assert nblas() == {3}                               # and ends with it


def test_a_slow_look_waits_longer_for_the_next(monkeypatch):
    monkeypatch.setattr(threads, "_look", lambda: time.sleep(0.002) or 2)   # 2 ms a look
    monkeypatch.setattr(threads, "_FREE", [-1.0, 0])
    t0 = time.monotonic()
    threads.free_cores()
    # the next look comes LOOK_EVERY looks' time later (here more than CHECK_S): looking takes
    # at most 1/LOOK_EVERY of the time
    assert threads._FREE[0] - t0 >= threads.LOOK_EVERY * 0.002 > threads.CHECK_S


def test_pinned_free_cores_fixes_workers_without_looking_and_looks_afresh_after(monkeypatch):
    looks, blas = [], []
    monkeypatch.setattr(threads, "_FREE", [-1.0, 0])
    monkeypatch.setattr(threads, "_look", lambda: looks.append(1) or 1)   # every other core taken
    monkeypatch.setattr(threads, "_blas_on", blas.append)
    monkeypatch.setattr(threads, "numba_threads", lambda: 4)
    assert threads.workers() == 1 and len(looks) == 1
    with threads.pinned_free_cores(3):
        threads._FREE[0] -= 1e9                 # however long ago the last look: no new one
        assert [threads.workers() for _ in range(50)] == [3] * 50
    assert len(looks) == 1 and blas == [1]      # pinned: neither a look nor a BLAS change
    with threads.pinned_free_cores(8):
        assert threads.workers() == 4           # still at most Numba's count
    assert threads.workers() == 1 and len(looks) == 2      # the first call after looks afresh
    with pytest.raises(RuntimeError), threads.pinned_free_cores(2):
        raise RuntimeError("inside")
    assert threads.workers() == 1 and len(looks) == 3      # set back on an error too
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(ValueError, match="pinned_free_cores: n must be an integer >= 1"):
            with threads.pinned_free_cores(bad):
                pass


FLOOR_SCRIPT = """
import json, sys
sys.path.insert(0, "benchmarks")
import numpy as np
from bench_engine import warm_minisparse_kernels
from bench_rss import compiled_kernels
from minisparse import load_model
from minisparse.fast import quant, step, threads
warm_minisparse_kernels()
floor = compiled_kernels()
m = load_model("tests/fixtures/oracle/llama_g2_hd64_q8_0.gguf")
step.PARALLEL_MIN_WEIGHTS = quant.PARALLEL_MIN_WEIGHTS = 0   # its small matrices take the large ones' kernels
for n in (1, 2):                                # a quiet moment, and another process on a core
    with threads.pinned_free_cores(n):
        for T in (16, 200):                     # 200: several row tiles of attention
            cache = m.new_cache()
            logits = m.forward([1 + t % 250 for t in range(T)], cache, last_only=True)
            for _ in range(3):
                logits = m.forward([int(np.argmax(logits[-1]))], cache)
print(json.dumps({k: n - floor.get(k, 0) for k, n in compiled_kernels().items() if n > floor.get(k, 0)}))
"""


@pytest.mark.skipif(not quant.INT8_DECODE, reason="the floor's fused step needs the 8-bit decode")
def test_the_benchmark_floor_holds_every_kernel_variant_a_two_thread_run_takes():
    # bench_engine.py's floor (warm_minisparse_kernels) is the runtime: a kernel the model's run
    # loads after it is counted as the model's memory. A two-thread run takes the one-thread
    # variants whenever another process holds a core, so the floor must hold both, whatever the
    # machine ran while it was taken; a fresh process, so nothing is loaded before the floor
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "NUMBA_NUM_THREADS": "2"}
    p = subprocess.run([sys.executable, "-c", FLOOR_SCRIPT], env=env, cwd=root, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {}
