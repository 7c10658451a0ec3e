"""minisparse.testing: the public property-test kit for attention selectors.

    from minisparse.testing import check_selector
    check_selector(MySelector(...))          # or a mask function fn(q, k, q_pos, k_pos)

Hypothesis strategies for attention problems (strategies.py), the invariants every selector is
held to (invariants.py), check_selector, report and time_selector (check.py), a selector from a mask
function (mask.py), and the derived error bounds they all use (bounds.py). The project's own
suite, tests/test_attention_properties.py, runs on the same strategies and invariants.
Leaves out the model and caches: it tests what a selector chooses and what the kernel reads.
"""
from . import invariants
from .bounds import KERNEL_REL, U, kernel_tol, logit_err, lse_tol
from .check import as_factory, check_selector, report, time_selector
from .mask import MaskSelector, from_mask_fn
from .strategies import Problem, make_problem, problems

__all__ = ["check_selector", "report", "time_selector", "as_factory", "MaskSelector", "from_mask_fn",
           "problems", "make_problem", "Problem", "invariants",
           "kernel_tol", "lse_tol", "logit_err", "KERNEL_REL", "U"]
