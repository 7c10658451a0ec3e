"""Greedy continuations of a ~4k-token Python prompt (the stdlib's argparse, cut at a newline)
under dense and Quest, in both protocols: dense prefill + Quest decode, and Quest in prefill and
decode (what `minisparse generate --attention` does), with and without dense layers 0-1.

    python3 benchmarks/quest_continuations.py 4096 24     # docs/selectors.md, "Quest at 4k tokens"
"""
import argparse
import sys
import time
import inspect
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import minisparse  # noqa: E402
from minisparse.registry import resolve  # noqa: E402

N, steps = int(sys.argv[1]), int(sys.argv[2])
m = minisparse.load_model(resolve("smollm2"))
ids = m.tokenizer.encode(inspect.getsource(argparse))
ids = ids[:N]
# end the prompt at a newline so the continuation is code, not the middle of a string
nl = [i for i, t in enumerate(ids) if "\n" in m.tokenizer.decode([t])]
ids = ids[:nl[-1] + 1]
print("prompt tokens", len(ids), repr(m.tokenizer.decode(ids[-30:])), flush=True)


def run(pre, dec, dl=()):
    """Greedy `steps` tokens: prefill under `pre`, decode under `dec` (None = dense)."""
    t0 = time.time()
    c, lg = m.prefill(ids, attention=pre, dense_layers=dl)
    tok, out = int(np.argmax(lg)), []
    for _ in range(steps):
        out.append(tok)
        tok = int(np.argmax(m.forward([tok], c, attention=dec, dense_layers=dl, last_only=True)[-1]))
    print(f"prefill {pre or 'dense'} decode {dec or 'dense'} dense_layers {dl}: "
          f"{time.time() - t0:.0f}s {m.tokenizer.decode(out)!r}", flush=True)


run(None, None)
run(None, "quest=16/256")
run("quest=16/256", "quest=16/256")
run("quest=16/256", "quest=16/256", (0, 1))
run("topk=256", "topk=256")
