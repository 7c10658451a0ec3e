"""Train the byte-level BPE tokenizer on the corpus and tokenize it into uint16 arrays (CPU, here).

Leaves out the model itself (train.py, on the device) and GGUF writing (export.py).
Follows GPT-2's byte-level BPE: the GPT-2 regex split + byte-to-unicode map, which llama.cpp
names `tokenizer.ggml.pre = "gpt2"`, so the GGUF tokenizer is exact in both engines.

    python3 models/prepare.py --out .device_carry      # ~2 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import corpus
import needle

VOCAB_SIZE = 4096


def train_tokenizer(texts, vocab_size: int = VOCAB_SIZE):
    """A GPT-2-style byte-level BPE (no normaliser, no prefix space) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # use_regex=True is the GPT-2 split regex; add_prefix_space=False matches llama.cpp's gpt2 pre.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[corpus.EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_docs(tok, docs) -> np.ndarray:
    """One uint16 stream: EOT doc EOT doc ... (EOT opens each document, as BOS does at inference)."""
    eot = tok.token_to_id(corpus.EOT)
    ids = [eot]
    for enc in tok.encode_batch([t for _, t in docs], add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot)
    assert max(ids) < 2**16
    return np.asarray(ids, dtype=np.uint16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".device_carry")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    docs = corpus.documents()
    train, held = corpus.split(docs)
    tok = train_tokenizer([t for _, t in train])  # tokenizer never sees held-out text
    tok.save(str(out / "tokenizer.json"))
    tr, va = encode_docs(tok, train), encode_docs(tok, held)
    np.save(out / "pydoc_train.npy", tr)
    np.save(out / "pydoc_val.npy", va)
    kit = needle.build_kit(tok)
    np.savez(out / "passkey_kit.npz", **kit)
    man = corpus.manifest(docs)
    man.update(train_tokens=int(tr.size), heldout_tokens=int(va.size), vocab_size=tok.get_vocab_size())
    (out / "corpus_manifest.json").write_text(json.dumps(man, indent=1))
    print(json.dumps({k: v for k, v in man.items() if k not in ("documents", "heldout")}, indent=1))


if __name__ == "__main__":
    main()
