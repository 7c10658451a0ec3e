"""Synthetic pass-key retrieval (the needle-vs-density task): the seeded generator of exact-length
examples, and the lab's scoring of one selector on them under protocol A or B.

Leaves out sweeps, tables and plots (runner.py, plots.py). The generator follows the pass-key task
of Mohtashami & Jaggi, "Landmark Attention" (2023): an intro, repeated filler, one needle sentence
holding a 5-digit key at a chosen depth, then the question. This file is the one source of truth:
`models/needle.py` (used by the trainer) loads it by path, so it imports only NumPy at module level.

Examples are exactly `n_tokens` long and made of whole words, so `tokenizer.decode(ex["tokens"])`
is a text that tokenises back to the same ids (the filler's last words are chosen to fit exactly).
A kit built from the minisparse GGUF tokenizer equals the one models/train.py used:

    >>> kit = build_kit(minisparse.load_tokenizer("models/minisparse-passkey.gguf"))  # doctest: +SKIP
    >>> ex = make_passkey_example(kit, n_tokens=4096, depth=0.25, seed=7)              # doctest: +SKIP
    >>> prompt = ex["tokens"][:ex["answer_start"]]  # doctest: +SKIP
    >>> ex["tokens"][ex["answer_start"]:]           # doctest: +SKIP

`prompt` ends with "... The pass key is"; the rest equals ex["answer"], the key's tokens.
"""
from __future__ import annotations

import re

import numpy as np

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE_PRE = " The pass key is"        # + key
NEEDLE_MID = ". Remember it."           # + key
NEEDLE_POST = " is the pass key."
QUESTION = " What is the pass key? The pass key is"   # + key (the answer)
KEY_LO, KEY_HI = 10000, 100000          # 5-digit keys
# Every piece starts with a space or punctuation and ends a GPT-2 pre-token, so tokenising the
# pieces one by one gives the same ids as tokenising their concatenation (tests check this).


def _ids(tokenizer, text: str) -> np.ndarray:
    """Ids of `text` without BOS, from a HF `tokenizers.Tokenizer` or a minisparse Tokenizer."""
    if _hf(tokenizer):
        enc = tokenizer.encode(text, add_special_tokens=False).ids
    else:
        enc = tokenizer.encode(text, add_bos=False)
    return np.asarray(enc, dtype=np.int32)


def _hf(tokenizer) -> bool:
    return type(tokenizer).__module__.startswith("tokenizers")


def build_kit(tokenizer, bos_id: int | None = None) -> dict[str, np.ndarray]:
    """Pre-tokenised pieces of the task (a dict of int32 arrays; save with np.savez).

    `keys (N, W)` holds the tokens of " <key>" for every key in [10000, 100000), right-padded with -1;
    `key_len (N,)` their lengths. Building needs a tokenizer; using the kit needs only NumPy.
    """
    if bos_id is None:  # minisparse tokenizers know their BOS; the trained BPE's is <|endoftext|> = 0
        bos_id = getattr(tokenizer, "bos_id", None) or 0
    words = [_ids(tokenizer, w) for w in re.findall(r" ?[A-Za-z]+|[.]", FILLER)]   # GPT-2 pre-tokens
    filler, word_len = np.concatenate(words), np.asarray([len(w) for w in words], dtype=np.int32)
    if not np.array_equal(filler, _ids(tokenizer, FILLER)):
        raise ValueError("this tokenizer merges across the filler's words; the kit needs a GPT-2-style split")
    keys = [_ids(tokenizer, f" {k}") for k in range(KEY_LO, KEY_HI)]
    width = max(len(k) for k in keys)
    table = np.full((len(keys), width), -1, dtype=np.int32)
    for i, k in enumerate(keys):
        table[i, :len(k)] = k
    return {
        "bos": np.asarray([bos_id], dtype=np.int32),
        "intro": _ids(tokenizer, INTRO), "filler": filler, "filler_word_len": word_len,
        "needle_pre": _ids(tokenizer, NEEDLE_PRE), "needle_mid": _ids(tokenizer, NEEDLE_MID),
        "needle_post": _ids(tokenizer, NEEDLE_POST), "question": _ids(tokenizer, QUESTION),
        "keys": table, "key_len": np.asarray([len(k) for k in keys], dtype=np.int32),
    }


def make_passkey_example(kit, n_tokens: int, depth: float, seed: int) -> dict:
    """One example of exactly `n_tokens` tokens: BOS, intro, filler, needle at `depth`, filler, question, key.

    depth in [0, 1] is the needle's place within the filler (0 = right after the intro).
    Returns {"tokens" (n_tokens,) int64, "answer_start", "answer" (A,) int64, "key", "needle_start"}.
    The same (n_tokens, depth, seed) always gives the same example.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = np.random.default_rng(seed)
    key = int(rng.integers(KEY_LO, KEY_HI))
    ktok = kit["keys"][key - KEY_LO, :kit["key_len"][key - KEY_LO]]
    head = np.concatenate([kit["bos"], kit["intro"]])
    needle = np.concatenate([kit["needle_pre"], ktok, kit["needle_mid"], ktok, kit["needle_post"]])
    tail = np.concatenate([kit["question"], ktok])
    n_fill = n_tokens - len(head) - len(needle) - len(tail)
    if n_fill < 0:
        raise ValueError(f"n_tokens={n_tokens} is too short: the fixed parts alone take {n_tokens - n_fill}")
    filler, starts = _whole_word_filler(kit, n_fill)
    # the needle goes between two filler sentences (its own final "." never meets another)
    period = kit["filler"][-1]
    ok = starts[(starts == 0) | (starts == n_fill) | (filler[np.maximum(starts - 1, 0)] == period)]
    cut = int(ok[np.abs(ok - depth * n_fill).argmin()])
    tokens = np.concatenate([head, filler[:cut], needle, filler[cut:], tail]).astype(np.int64)
    return {"tokens": tokens, "answer_start": n_tokens - len(ktok), "answer": ktok.astype(np.int64),
            "key": key, "needle_start": len(head) + cut}


def _whole_word_filler(kit, n_fill: int):
    """Exactly n_fill filler tokens made of whole words, so the text re-tokenises to the same ids.

    Words are taken in order round the filler unit; near the end, a word that would overshoot is
    skipped (one-token words like " The" always fit, and two "." never meet). Returns the tokens
    and the word start offsets (including n_fill itself).
    """
    words = np.split(kit["filler"], np.cumsum(kit["filler_word_len"])[:-1])
    out, starts, i = [], [0], 0
    while starts[-1] < n_fill:
        w = words[i % len(words)]
        i += 1
        if starts[-1] + len(w) <= n_fill:
            out.append(w)
            starts.append(starts[-1] + len(w))
    tokens = np.concatenate(out) if out else np.zeros(0, dtype=np.int32)
    return tokens, np.asarray(starts)


def make_batch(kit, n_tokens: int, batch: int, rng: np.random.Generator):
    """Training batch: tokens (B, n_tokens) int64 and answer mask (B, n_tokens) bool (True on key tokens).

    Depth is uniform in [0, 1]; seeds come from `rng`, so a seeded rng gives a fixed stream.
    """
    toks = np.empty((batch, n_tokens), dtype=np.int64)
    mask = np.zeros((batch, n_tokens), dtype=bool)
    for b in range(batch):
        ex = make_passkey_example(kit, n_tokens, float(rng.random()), int(rng.integers(2**31)))
        toks[b] = ex["tokens"]
        mask[b, ex["answer_start"]:] = True
    return toks, mask


def load_kit(path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def passkey_text(n_words: int, depth: float, seed: int) -> tuple[str, str]:
    """(text, key) of a pass-key example as plain text for any tokenizer: the intro, n_words
    filler words, the needle at `depth`, the question; the text ends with "The pass key is".

    >>> t, key = passkey_text(40, 0.5, seed=1)
    >>> t.endswith("The pass key is") and key in t
    True
    """
    rng = np.random.default_rng(seed)
    key = str(int(rng.integers(KEY_LO, KEY_HI)))
    sentences = re.findall(r"[^.]+\.", FILLER)
    words, body, i = 0, [], 0
    while words < n_words:
        s = sentences[i % len(sentences)]
        body.append(s)
        words += len(s.split())
        i += 1
    cut = int(round(depth * len(body)))
    needle = f"{NEEDLE_PRE} {key}{NEEDLE_MID} {key}{NEEDLE_POST}"
    return INTRO + "".join(body[:cut]) + needle + "".join(body[cut:]) + QUESTION, key


# ----------------------------------------------------------------------------- scoring (the lab)


def _greedy_answer(model, cache, last_token, n, attention, dense_layers, stats):
    """Greedy-decode n tokens after feeding last_token into cache (one token per call)."""
    out, tok = [], int(last_token)
    for _ in range(n):
        logits = model.forward([tok], cache, attention=attention, dense_layers=dense_layers,
                               stats=stats)                                   # (1, V)
        tok = int(np.argmax(logits[-1]))
        out.append(tok)
    return out


def score_passkey(model, ex, variant, protocol, dense_layers=(), dense_cache=None, chunk=1024):
    """Exact-match retrieval of ex's key under one variant (a lab Variant or anything with
    .kind / .selector / .make_cache).

    Protocol "A": the context (every token before the last prompt token) is prefilled DENSE, the
    answer is decoded with the variant; `dense_cache` is that prefilled cache, copied here.
    Protocol "B": the prompt is prefilled with the variant too, then the answer decoded with it.
    Bounded caches only have protocol B (the cache bounds the prefill as well); A returns None.
    Returns {"correct", "generated", "density_answer", "keys_read_answer", "density_prefill"}.
    """
    import copy
    prompt = ex["tokens"][:ex["answer_start"]]
    n_ans = len(ex["answer"])
    sel = variant.selector if variant.kind == "attention" else None
    pre_stats, ans_stats = [], []
    if protocol == "A":
        if variant.kind == "cache":
            return None
        if dense_cache is None:
            dense_cache, _ = model.prefill(prompt[:-1], chunk=chunk)
        cache = copy.deepcopy(dense_cache)
    elif protocol == "B":
        cache = variant.make_cache() if variant.kind == "cache" else model.new_cache()
        for a in range(0, len(prompt) - 1, chunk):
            model.forward(prompt[a:min(a + chunk, len(prompt) - 1)], cache, attention=sel,
                          dense_layers=dense_layers, stats=pre_stats)
    else:
        raise ValueError(f"protocol must be 'A' or 'B', got {protocol!r}")
    gen = _greedy_answer(model, cache, prompt[-1], n_ans, sel, dense_layers, ans_stats)

    def dens(stats):
        if not stats:
            return None, None
        d = [(r["n_attended"] / (r["q_pos"][None, :] + 1.0)).mean() for r in stats]
        return float(np.mean(d)), float(np.mean([r["n_attended"].mean() for r in stats]))
    da, ka = dens(ans_stats)
    return {"correct": bool(gen == [int(x) for x in ex["answer"]]), "generated": gen,
            "density_answer": da, "keys_read_answer": ka, "density_prefill": dens(pre_stats)[0]}


def run_needle(model, variants, lengths, depths, seeds, protocols=("A", "B"), dense_layers=(),
               progress=None, kit=None) -> dict:
    """The depth x length x budget grid: every (length, depth, seed) example under every variant
    and protocol. Returns {"records": [...], "accuracy": {variant: {protocol: [[acc per depth]
    per length]}}, "lengths", "depths", "seeds"}. Budgets are the variants' own."""
    kit = build_kit(model.tokenizer) if kit is None else kit
    ok = [v for v in variants if v.kind != "error"]
    total = len(lengths) * len(depths) * len(seeds) * len(ok) * len(protocols)
    records, done = [], 0
    for n in lengths:
        for dep in depths:
            for s in seeds:
                ex = make_passkey_example(kit, int(n), float(dep), int(s))
                dense_cache = None
                if "A" in protocols:
                    dense_cache, _ = model.prefill(ex["tokens"][:ex["answer_start"] - 1], chunk=1024)
                for v in ok:
                    for p in protocols:
                        try:
                            r = score_passkey(model, ex, v, p, dense_layers, dense_cache)
                            err = None
                        except Exception as e:   # noqa: BLE001 - reported per record
                            r, err = None, f"{type(e).__name__}: {e}"
                        done += 1
                        if progress:
                            progress(done, total)
                        if r is None and err is None:
                            continue
                        records.append({"variant": v.spec, "protocol": p, "length": int(n),
                                        "dense_layers": list(dense_layers),
                                        "depth": float(dep), "seed": int(s), "key": ex["key"],
                                        "error": err, **(r or {})})
    acc = {}
    for v in ok:
        for p in protocols:
            grid = [[np.mean([r["correct"] for r in records if r["variant"] == v.spec and r["protocol"] == p
                              and r["length"] == n and r["depth"] == d and r.get("error") is None] or [np.nan])
                     for d in depths] for n in lengths]
            if not np.all(np.isnan(grid)):
                acc.setdefault(v.spec, {})[p] = [[float(x) for x in row] for row in grid]
    return {"lengths": [int(n) for n in lengths], "depths": [float(d) for d in depths],
            "seeds": [int(s) for s in seeds], "protocols": list(protocols),
            "dense_layers": list(dense_layers), "records": records, "accuracy": acc}
