"""minisparse.lab: `minisparse eval` — every attention variant measured the same way against
dense on a real model (density, mass recall, output error, perplexity ratio, KL, agreement) and
on the pass-key task (protocols A and B). See docs/lab.md."""
from .metrics import dense_probs, lm_metrics, log_softmax, mass_recall, realised_density, rel_error, summary
from .needle import build_kit, make_passkey_example, passkey_text, run_needle, score_passkey
from .runner import Variant, markdown_table, parse_variants, run_one, run_text, selection_mask
from .texts import BUILTINS, builtin_text
