"""Where a bounded cache keeps a needle: after a one-call prefill of a RULER single-needle prompt
(context + question, as the long-context suite's query-aware protocol with --chunk LENGTH), how
many of the answer's tokens each KV head of each layer still holds.

    python3 benchmarks/needle_held.py [--model smollm2] [--length 4096] [--seed 2] [--depth 0.5] \
        [--cache pyramid=512/beta1] [--every 3]

Prints one line per layer (every --every-th): held answer tokens per KV head.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import minisparse                                                  # noqa: E402
from minisparse.lab.suite import context_ids, question_ids         # noqa: E402
from minisparse.lab.tasks import make_task_set                     # noqa: E402
from minisparse.spec import parse_cache_spec                       # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--depth", type=float, default=0.5)
    ap.add_argument("--cache", default="pyramid=512/beta1")
    ap.add_argument("--every", type=int, default=3)
    a = ap.parse_args(argv)
    m = minisparse.load_model(a.model)
    ex, = make_task_set(["niah_single_digits"], m.tokenizer, a.length, [a.depth], 1, a.seed)
    ids = context_ids(m.tokenizer, ex.context) + question_ids(m.tokenizer, ex.question)
    ans = m.tokenizer.encode(" " + ex.answers[0], add_bos=False)
    at = [i for i in range(len(ids) - len(ans)) if ids[i:i + len(ans)] == ans]
    if not at:
        raise SystemExit(f"the answer's tokens {ans} do not occur in the prompt as one run")
    needle = set(range(at[0], at[0] + len(ans)))
    cache = parse_cache_spec(a.cache, m)
    m.forward(ids[:-1], cache, last_only=True)          # the suite feeds the last token as a step
    print(f"{a.cache}: answer {ex.answers[0]!r} = {len(ans)} tokens at {at[0]} of {len(ids)}")
    for layer in range(0, m.config.n_layers, a.every):
        held = [len(needle & set(p.tolist())) for p in cache.positions(layer)]
        print(f"layer {layer:2d}: held per KV head {held} of {len(ans)}")


if __name__ == "__main__":
    main()
