"""minisparse.testing: what a property test of an attention kernel needs, public so that a new
selector's own tests use the same bounds as the shared suite.

Holds the derived error bounds (bounds.py). Leaves out the strategies and invariant checks,
which the shared suite (tests/test_attention_properties.py) still keeps for now.
"""
from .bounds import KERNEL_REL, U, kernel_tol, logit_err, lse_tol

__all__ = ["kernel_tol", "lse_tol", "logit_err", "KERNEL_REL", "U"]
