"""Synthetic pass-key retrieval examples (the needle-vs-density task), exact in length, seeded.

The generator lives in `minisparse/lab/needle.py` (one source of truth: the lab scores with it,
the trainer trains with it). This file loads that module BY PATH, so `models/train.py` still runs
with torch + NumPy only (no minisparse install, no numba: the lab's needle module imports only
NumPy at module level). Same names as before: build_kit, make_passkey_example, make_batch,
load_kit, and the text constants.
"""
import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parent.parent / "minisparse" / "lab" / "needle.py"
_spec = importlib.util.spec_from_file_location("_minisparse_lab_needle", _PATH)
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
globals().update({k: v for k, v in vars(_mod).items() if not k.startswith("__")})
