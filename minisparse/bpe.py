"""Byte-level BPE (the GPT-2 family) over compact tables: text -> token ids, as the `tokenizers`
library's BPE model gives them with the same pre-tokeniser (and so as llama.cpp's llm_tokenizer_bpe).

The vocabulary stays in the caller's compact table (`tokenizer.Pieces`); the merges are two sorted
int64 arrays (pair key -> rank and merged id), not maps of Python objects. Left out: BPE dropout,
subword prefixes/suffixes and an unknown token (a byte-level vocabulary holds all 256 bytes).
Follows Sennrich et al. 2016 and GPT-2's byte-to-character map, in the spirit of karpathy/minbpe.
"""
from __future__ import annotations

import heapq
import re
from array import array
from bisect import bisect_left

import numpy as np


def _byte_chars() -> str:
    """GPT-2's printable stand-in of each byte: BYTE_CHARS[b] is the character byte b is written as.
    Printable Latin-1 bytes stand for themselves; the others move to U+0100, U+0101, ... in order."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, n = [], 0
    for b in range(256):
        chars.append(chr(b) if b in keep else chr(256 + n))
        n += b not in keep
    return "".join(chars)


BYTE_CHARS = _byte_chars()
# str.translate table: a text decoded as Latin-1 (one char per byte) -> its byte-level form
_TO_BYTE_CHARS = {b: c for b, c in enumerate(BYTE_CHARS)}
# Rust's char::is_whitespace (Unicode White_Space), which the tokenizers library's rstrip uses;
# Python's str.isspace differs (it also counts U+001C..U+001F)
_WHITE_SPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                         + "".join(map(chr, range(0x2000, 0x200B))))


class TextIndex:
    """A token's id from its text without a dict of every token: the texts' hashes sorted (int64),
    the ids in that order, and a hit confirmed by comparing the text itself (so exact).
    A text held by several ids gives the lowest, as a dict built with setdefault does.

    >>> ix = TextIndex(["a", "b", "a"]); ix.get("a"), ix.get("b"), ix.get("c")
    (0, 1, None)
    """

    def __init__(self, texts):
        self.texts = texts                                          # (V,) a sequence of str
        h = np.fromiter((hash(t) for t in texts), np.int64, count=len(texts))
        self.order = np.argsort(h, kind="stable").astype(np.int32)  # (V,) ids, by hash then id
        self.hashes = h[self.order]                                 # (V,) sorted

    def first(self, hashes: np.ndarray) -> np.ndarray:
        """(N,) hashes -> (N,) the position in the sorted table of the first equal hash, -1 if none."""
        if len(self.hashes) == 0:
            return np.full(len(hashes), -1, np.int64)
        at = np.minimum(np.searchsorted(self.hashes, hashes), len(self.hashes) - 1)
        return np.where(self.hashes[at] == hashes, at, -1)

    def confirm(self, at: int, text: str) -> int:
        """The id of `text`, given `first`'s position for its hash; -1 when the vocabulary lacks it
        (equal hashes of other texts are stepped over)."""
        if at < 0:
            return -1
        h = self.hashes[at]
        while at < len(self.hashes) and self.hashes[at] == h:
            i = int(self.order[at])
            if self.texts[i] == text:
                return i
            at += 1
        return -1

    def get(self, text: str) -> int | None:
        i = self.confirm(int(self.first(np.array([hash(text)], np.int64))[0]), text)
        return None if i < 0 else i


class ByteLevelBPE:
    """Encodes text as the tokenizers library's `BPE` model behind `Split` pre-tokenisers and a
    `ByteLevel` byte map, with added tokens matched first.

    texts: the vocabulary, byte-level strings (a sequence: `tokenizer.Pieces` keeps it compact).
    merges: "left right" strings, best first (a merge whose parts or result are not tokens is
      skipped; a pair listed twice keeps its later rank, as the library does).
    pre_tokenizer: a `tokenizers.pre_tokenizers` object that cuts raw text into words.
    ignore_merges: a word that is itself a token is that token (llama.cpp's rule for llama3 vocabs).
    added: (text, special, rstrip) for each added token, matched in the text before the regexes,
      leftmost then longest; a special one only with parse_special, rstrip also takes the
      whitespace after it.

    >>> from tokenizers import Regex, pre_tokenizers
    >>> pre = pre_tokenizers.Split(Regex(r" ?\\w+| ?[^\\w\\s]+|\\s+"), "isolated")
    >>> bpe = ByteLevelBPE(list(BYTE_CHARS) + ["ab", "Ġab"], ["a b", "Ġ ab"], pre)
    >>> bpe.encode("ab ab!")          # "ab", " ab" (Ġ is the space's stand-in), "!" (byte 33)
    [256, 257, 33]
    """

    CACHE_WORDS = 10_000     # words remembered with their ids (the library keeps as many)

    def __init__(self, texts, merges, pre_tokenizer, *, ignore_merges=False, added=()):
        self.texts, self.pre_tokenizer, self.ignore_merges = texts, pre_tokenizer, ignore_merges
        self.index = TextIndex(texts)
        byte_ids = [self.index.get(c) for c in BYTE_CHARS]
        self.byte_ids = [-1 if i is None else i for i in byte_ids]      # (256,) a byte's token, -1: none
        self.pair_keys, self.pair_vals = self._merge_table(merges)
        self._cache: dict[str, list[int]] = {}
        self._added = {}                                                # text -> (id, special, rstrip)
        for text, special, rstrip in added:
            i = self.index.get(text)
            if i is None:
                raise ValueError(f"added token {text!r} is not in the vocabulary; expected one of its tokens")
            self._added.setdefault(text, (i, special, rstrip))
        # longest first: at one position re's alternation takes the first that matches, so this
        # is the leftmost-longest match of the library's Aho-Corasick automaton
        texts_by_len = sorted(self._added, key=len, reverse=True)
        self._added_re = re.compile("|".join(map(re.escape, texts_by_len))) if texts_by_len else None
        if not ignore_merges:
            self.index = None         # only ignore_merges looks a text up while encoding

    def _merge_table(self, merges) -> tuple[array, array]:
        """Sorted pair keys (left id << 32 | right id) and, for each, rank << 32 | merged id: two
        int64 arrays, looked up by binary search."""
        hashes = array("q")                                             # left, right, left + right, ...
        for m in merges:
            left, right = self._parts(m)
            hashes.extend((hash(left), hash(right), hash(left + right)))
        at = self.index.first(np.frombuffer(hashes, np.int64)).reshape(-1, 3).T   # (3, n) -1: no such hash
        del hashes
        # the first candidate id of each part, -1 where no token has its hash; as arrays of the
        # standard library, whose items come out as Python ints quickly (no list of 150k ints)
        cand = [array("q", np.where(at[j] >= 0, self.index.order[at[j]], -1).astype(np.int64).tobytes())
                for j in range(3)]
        texts, keys, vals, rank = self.texts, array("q"), array("q"), 0
        for k, m in enumerate(merges):
            a, b, ab = cand[0][k], cand[1][k], cand[2][k]
            if a < 0 or b < 0 or ab < 0:
                continue
            left, right = self._parts(m)
            if texts[a] != left or texts[b] != right or texts[ab] != left + right:   # equal hashes
                a, b, ab = (self.index.confirm(int(at[j, k]), s) for j, s in enumerate((left, right, left + right)))
                if min(a, b, ab) < 0:
                    continue
            keys.append(a << 32 | b)
            vals.append(rank << 32 | ab)
            rank += 1
        keys_np, vals_np = np.frombuffer(keys, np.int64), np.frombuffer(vals, np.int64)
        order = np.argsort(keys_np, kind="stable")                      # equal pairs: by rank
        keys_np, vals_np = keys_np[order], vals_np[order]
        last = np.append(keys_np[1:] != keys_np[:-1], True)             # a repeated pair: the later rank
        return array("q", keys_np[last].tobytes()), array("q", vals_np[last].tobytes())

    @staticmethod
    def _parts(merge: str) -> tuple[str, str]:
        cut = merge.find(" ", 1)      # llama.cpp splits at the first space after the first character
        if cut < 0:
            raise ValueError(f"entry {merge!r} has no space; expected 'left right'")
        return merge[:cut], merge[cut + 1:]

    def _pair(self, a: int, b: int) -> int:
        """rank << 32 | merged id of the pair (a, b), or -1 when no merge joins them."""
        key = a << 32 | b
        i = bisect_left(self.pair_keys, key)
        return self.pair_vals[i] if i < len(self.pair_keys) and self.pair_keys[i] == key else -1

    def _merge(self, ids: list[int]) -> list[int]:
        """BPE on one word: join the adjacent pair of lowest rank (the leftmost among equals) until
        no pair has a merge. A heap of candidate pairs, as the library's Word::merge_all: an entry
        whose pair has changed since it was queued is stale and dropped when it comes up."""
        n = len(ids)
        if n < 2:
            return ids
        nxt, prev = list(range(1, n + 1)), list(range(-1, n - 1))
        nxt[-1] = -1
        heap = []
        for i in range(n - 1):
            if (v := self._pair(ids[i], ids[i + 1])) >= 0:
                heap.append((v >> 32, i, v & 0xFFFFFFFF))                # (rank, position, merged id)
        heapq.heapify(heap)
        while heap:
            _, i, new = heapq.heappop(heap)
            j = nxt[i]
            if ids[i] < 0 or j < 0:
                continue                                                # merged away, or now last
            v = self._pair(ids[i], ids[j])
            if v < 0 or v & 0xFFFFFFFF != new:
                continue                                                # stale: the pair changed
            ids[i], ids[j] = new, -1
            nxt[i] = nxt[j]
            if nxt[i] >= 0:
                prev[nxt[i]] = i
                if (v := self._pair(new, ids[nxt[i]])) >= 0:
                    heapq.heappush(heap, (v >> 32, i, v & 0xFFFFFFFF))
            if prev[i] >= 0 and (v := self._pair(ids[prev[i]], new)) >= 0:
                heapq.heappush(heap, (v >> 32, prev[i], v & 0xFFFFFFFF))
        return [i for i in ids if i >= 0]

    def word(self, word: str) -> list[int]:
        """Token ids of one pre-tokenised word (raw text; its bytes are mapped here)."""
        ids = self._cache.get(word)
        if ids is None:
            raw = word.encode("utf-8")
            whole = self.index.get(raw.decode("latin-1").translate(_TO_BYTE_CHARS)) if self.index is not None else None
            if whole is not None:
                ids = [whole]
            else:                     # a byte the vocabulary lacks is dropped, as by the library
                ids = self._merge([i for i in map(self.byte_ids.__getitem__, raw) if i >= 0])
            if len(self._cache) >= self.CACHE_WORDS:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def split_added(self, text: str, parse_special: bool) -> list[str | int]:
        """`text` cut at its added tokens: plain pieces (str) and added tokens' ids (int), in order.
        Follows the library's AddedVocabulary.find_matches: a special token skipped (parse_special
        False) still hides any shorter token overlapping it."""
        if self._added_re is None:
            return [text] if text else []
        out, done = [], 0
        for m in self._added_re.finditer(text):
            i, special, rstrip = self._added[m.group()]
            if special and not parse_special:
                continue
            start, stop = m.span()
            if rstrip:
                while stop < len(text) and text[stop] in _WHITE_SPACE:
                    stop += 1
            if done < start:
                out.append(text[done:start])
            out.append(i)
            done = stop
        if done < len(text):
            out.append(text[done:])
        return out

    def encode(self, text: str, parse_special: bool = False) -> list[int]:
        """Token ids of `text` (T,), without BOS."""
        ids = []
        for piece in self.split_added(text, parse_special):
            if isinstance(piece, int):
                ids.append(piece)
                continue
            for w, _ in self.pre_tokenizer.pre_tokenize_str(piece):
                ids += self.word(w)
        return ids
