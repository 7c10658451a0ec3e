"""Shared test set-up: Hypothesis profiles and the path to ../shared/fixtures.

Two kinds of fixture: tests/fixtures (LOCAL_FIXTURES) is committed, so every clone runs the
engine's own goldens (the shipped models' greedy text and vocabulary vectors, the oracle logits);
../shared/fixtures (FIXTURES: stories260K, llama.cpp's vocab files) is an extra check where it
sits beside the checkout, and its tests skip, naming the missing file, where it does not.

Numba compiles a kernel on first call (~1.5 s), so Hypothesis runs without a deadline; the
"ci" profile bounds how many examples each property draws so the whole suite stays in minutes.
"""
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=100, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures"
LOCAL_FIXTURES = Path(__file__).resolve().parent / "fixtures"


def shared_fixture(name: str) -> Path:
    """Path of a file in ../shared/fixtures, or skip the test with the reason."""
    p = FIXTURES / name
    if not p.exists():
        pytest.skip(f"{p} is absent: the shared fixtures folder ../shared/fixtures is not beside this checkout")
    return p


@pytest.fixture(scope="session")
def stories_path() -> Path:
    return shared_fixture("stories260K.gguf")


@pytest.fixture
def kv(tmp_path, monkeypatch):
    """An empty saved-cache folder for `minisparse ask` ($MINISPARSE_CACHE), per test."""
    monkeypatch.setenv("MINISPARSE_CACHE", str(tmp_path / "kv"))
    return tmp_path / "kv"


@pytest.fixture
def float_decode(monkeypatch):
    """Products of Q4_0/Q4_1/Q8_0 matrices, decode and prefill, on the fast path's float32
    kernels (MINISPARSE_INT8=0) for this test: for tests whose bound is float32 summation noise,
    or a decode step against a prefill (float32 sgemm) of the same tokens. The default 8-bit
    activations (llama.cpp's rounding) have their own bounds in tests/test_q8_kernels.py and
    tests/test_q8mm.py."""
    from minisparse.fast import quant
    monkeypatch.setattr(quant, "INT8_DECODE", False)
