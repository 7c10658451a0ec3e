"""Synthetic pass-key retrieval examples (the needle-vs-density task), exact in length, seeded.

Leaves out scoring policy and sweeps (the lab does those); this file only builds token sequences.
Follows the pass-key task of Mohtashami & Jaggi, "Landmark Attention" (2023): an intro, repeated
filler, one needle sentence holding a 5-digit key at a chosen depth, then the question.

Examples are exactly `n_tokens` long and made of whole words, so `tokenizer.decode(ex["tokens"])`
is a text that tokenises back to the same ids (the filler's last words are chosen to fit exactly).
A kit built from the minisparse GGUF tokenizer equals the one train.py used (tests check this):

    >>> kit = build_kit(minisparse.load_tokenizer("models/minisparse-passkey.gguf"))
    >>> ex = make_passkey_example(kit, n_tokens=4096, depth=0.25, seed=7)
    >>> prompt = ex["tokens"][:ex["answer_start"]]      # ends with "... The pass key is"
    >>> ex["tokens"][ex["answer_start"]:]               # == ex["answer"], the key's tokens
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
