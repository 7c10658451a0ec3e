"""GGUF tokenizer metadata -> a tokenizer that splits text exactly as llama.cpp does.

Two families: `llama` (SentencePiece, rebuilt as an HF `tokenizers` BPE with byte fallback and
merges ranked by piece score) and `gpt2` (byte-level BPE with the pre-tokeniser regexes of
llama.cpp's `llama-vocab.cpp`: minisparse's own encoder over compact tables, `bpe.py`, or with
backend="tokenizers" the library's BPE model, which it is tested against).
Left out: WordPiece/Unigram (`bert`, `t5`) vocabularies and chat templates (the raw template string
is exposed). Follows the GGUF spec's `tokenizer.ggml.*` keys and llama.cpp's tokenizer test vectors.
"""
from __future__ import annotations

import codecs
import os
import re
import warnings
from array import array

import numpy as np

from gguf.constants import GGUFValueType as VT
from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

from .bpe import BYTE_CHARS, ByteLevelBPE
from .errors import GGUFError
from .gguf_check import GGUFArray, GGUFFile

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# ---------------------------------------------------------------------------------------------
# Pre-tokeniser regexes for byte-level BPE, copied in meaning from llama.cpp's llm_tokenizer_bpe.
# Each list is applied in turn, every regex splitting the pieces the previous one left
# ("isolated": matches and the text between them both become pieces).
# ---------------------------------------------------------------------------------------------
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_REGEXES = {
    # llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT (a gpt2 model whose `pre` is "default" or absent)
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "gpt2": [_GPT2],
    "llama3": [_LLAMA3],
    "starcoder": [r"\p{N}", _GPT2],   # digits one by one, then the GPT-2 rules
    "qwen2": [_QWEN2],
}
# GGUF `tokenizer.ggml.pre` value -> entry of PRE_REGEXES (names as in llama.cpp's vocab loader)
PRE_ALIASES = {
    "default": "default",
    "gpt2": "gpt2", "gpt-2": "gpt2", "phi-2": "gpt2", "mpt": "gpt2", "olmo": "gpt2", "jais": "gpt2",
    "llama3": "llama3", "llama-v3": "llama3", "llama-bpe": "llama3", "falcon3": "llama3",
    "dbrx": "llama3", "smaug-bpe": "llama3",
    "starcoder": "starcoder", "smollm": "starcoder", "refact": "starcoder", "command-r": "starcoder",
    "codeshell": "starcoder", "exaone": "starcoder",
    "qwen2": "qwen2", "stablelm2": "qwen2", "deepseek-r1-qwen": "qwen2",
}
# llama.cpp matches a whole pre-token against the vocabulary before merging for these
_IGNORE_MERGES = {"llama3"}
# token texts that end generation (llama.cpp's special_eog_ids heuristic); llama.cpp also makes
# such a token a control token whatever its stored type, so "</s>" in Phi-3 text stays plain text
_EOG_TEXTS = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>",
              "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>", "<eos>"}
SUPPORTED_MODELS = ("llama", "gpt2")
# what encodes a gpt2-family vocabulary: minisparse's ByteLevelBPE, or the tokenizers library's BPE
BACKENDS = ("minisparse", "tokenizers")

_SURROGATES = re.compile("[\ud800-\udfff]")


# ---------------------------------------------------------------------------------------------
# Reading metadata with clear errors
# ---------------------------------------------------------------------------------------------
_INTS = (VT.UINT8, VT.INT8, VT.UINT16, VT.INT16, VT.UINT32, VT.INT32, VT.UINT64, VT.INT64)
_NUMBERS = _INTS + (VT.FLOAT32, VT.FLOAT64)
# expected kind -> the GGUF value types (or array item types, for 'x[]') that satisfy it
_ACCEPTS = {"str": (VT.STRING,), "int": _INTS, "bool": (VT.BOOL,), "float": _NUMBERS,
            "str[]": (VT.STRING,), "int[]": _INTS, "float[]": _NUMBERS}
_EXPECT = {"str": "a string", "int": "an integer", "bool": "a bool", "float": "a number",
           "str[]": "an array of strings", "float[]": "an array of float32", "int[]": "an array of int32"}


def _field(f: GGUFFile, src, key, expect: str, required=True, default=None, as_list=True):
    """Value of metadata `key`, checked against `expect` ('str', 'int', 'bool', 'float',
    'str[]', 'float[]', 'int[]') by its stored GGUF type before it is read; GGUFError naming file
    and key when missing or ill-typed. Arrays come back as Python lists (numbers as int/float), or
    with as_list=False compact: numbers as a NumPy copy, strings as `Pieces`."""
    if key not in f.metadata:
        if required:
            raise GGUFError(f"{src}: field '{key}': missing; expected {_EXPECT[expect]}")
        return default
    vtype, stored = f.value_types[key], f.metadata[key]
    if isinstance(stored, GGUFArray):
        ok = expect.endswith("[]") and stored.item_type in _ACCEPTS[expect]
        got = f"an array of {stored.item_type.name} ({len(stored)} items)"
    else:
        ok = not expect.endswith("[]") and vtype in _ACCEPTS[expect]
        got = f"a {vtype.name} ({stored!r:.40})"
    if not ok:
        raise GGUFError(f"{src}: field '{key}': got {got}; expected {_EXPECT[expect]}")
    if not as_list and expect == "str[]":
        return Pieces.from_gguf(f, stored)
    val = f.get(key)
    if expect in ("int[]", "float[]"):
        return val.tolist() if as_list else np.array(val)
    return val


# ---------------------------------------------------------------------------------------------
# Building the two families
# ---------------------------------------------------------------------------------------------
def _spm_merges(scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges for a SentencePiece vocabulary: every split of a piece into two pieces, ranked so the
    merge forming the higher-scoring piece comes first (llama.cpp's llm_tokenizer_spm always merges
    the bigram whose joined piece scores highest). Ties: lower piece id, then shorter left part."""
    ranked = []
    for piece, pid in vocab.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                ranked.append((-scores[pid], pid, i, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _build_spm(src, tokens, f: GGUFFile) -> tuple[HFTokenizer, bool]:
    scores = _field(f, src, "tokenizer.ggml.scores", "float[]")
    if len(scores) != len(tokens):
        raise GGUFError(f"{src}: field 'tokenizer.ggml.scores': has {len(scores)} entries; "
                        f"expected one per token ({len(tokens)})")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a duplicated piece keeps its first id, as llama.cpp's token_to_id
    unk = _field(f, src, "tokenizer.ggml.unknown_token_id", "int", required=False, default=0)
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing:
        raise GGUFError(f"{src}: field 'tokenizer.ggml.tokens': lacks byte tokens {missing[:3]}...; "
                        "expected all 256 <0xXX> pieces for byte fallback")
    bpe = models.BPE(vocab, _spm_merges(scores, vocab), byte_fallback=True,
                     unk_token=tokens[unk] if 0 <= unk < len(tokens) else None, fuse_unk=False)
    hf = HFTokenizer(bpe)
    # llama.cpp prepends one space to each text fragment (the first, and any after a special token)
    # then writes spaces as "▁"; HF runs the normaliser once per fragment between added tokens, so
    # Prepend reproduces that. No pre-tokeniser: SentencePiece merges across word boundaries.
    add_space = _field(f, src, "tokenizer.ggml.add_space_prefix", "bool", required=False, default=True)
    norms = ([normalizers.Prepend("▁")] if add_space else []) + [normalizers.Replace(" ", "▁")]
    hf.normalizer = normalizers.Sequence(norms)
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                   + ([decoders.Strip(" ", 1, 0)] if add_space else []))
    return hf, add_space


def _pre_key(src, pre: str) -> str:
    """The PRE_REGEXES entry of a GGUF `pre` name; an unknown name warns and takes GPT-2's."""
    key = PRE_ALIASES.get(pre)
    if key is None:
        warnings.warn(f"{src}: tokenizer.ggml.pre '{pre}' is not known to minisparse; using the GPT-2 "
                      f"regex (known: {', '.join(sorted(PRE_ALIASES))})", stacklevel=4)
        key = "gpt2"
    return key


def _pre_splits(key: str):
    """The regexes of PRE_REGEXES[key] as the tokenizers library's Split pre-tokenisers, in turn."""
    return [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_REGEXES[key]]


def _build_gpt2(src, pieces: "Pieces", f: GGUFFile, pre: str, added) -> ByteLevelBPE:
    merges = _field(f, src, "tokenizer.ggml.merges", "str[]", as_list=False)
    key = _pre_key(src, pre)
    try:
        return ByteLevelBPE(pieces, merges, pre_tokenizers.Sequence(_pre_splits(key)),
                            ignore_merges=key in _IGNORE_MERGES, added=added)
    except ValueError as e:
        raise GGUFError(f"{src}: field 'tokenizer.ggml.merges': {e}") from None


def _build_gpt2_hf(src, tokens, f: GGUFFile, pre: str) -> HFTokenizer:
    """The same vocabulary as the tokenizers library's BPE model (load_tokenizer's
    backend="tokenizers"): the reference ByteLevelBPE is tested against."""
    merges_raw = _field(f, src, "tokenizer.ggml.merges", "str[]")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    merges = []
    for m in merges_raw:
        cut = m.find(" ", 1)  # llama.cpp splits at the first space after the first character
        if cut < 0:
            raise GGUFError(f"{src}: field 'tokenizer.ggml.merges': entry {m!r} has no space; "
                            "expected 'left right'")
        left, right = m[:cut], m[cut + 1:]
        if left in vocab and right in vocab and left + right in vocab:
            merges.append((left, right))
    key = _pre_key(src, pre)
    hf = HFTokenizer(models.BPE(vocab, merges, ignore_merges=key in _IGNORE_MERGES))
    # regexes run on the raw text, then ByteLevel maps each byte to its printable stand-in
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        _pre_splits(key) + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    return hf


# ---------------------------------------------------------------------------------------------
# The public wrapper
# ---------------------------------------------------------------------------------------------
class Pieces:
    """A read-only sequence of strings (or of bytes, text=False) stored as one bytes blob and the
    int64 offsets of its items: item i is blob[offsets[i]:offsets[i + 1]], decoded for text.

    >>> p = Pieces(["a", "bc", ""]); len(p), p[1], list(p)
    (3, 'bc', ['a', 'bc', ''])
    """

    def __init__(self, items, text: bool = True):
        self.text = text
        # one item at a time into a growing buffer: no list of encoded items alongside the input
        data, lengths = bytearray(), array("q")
        for item in items:
            b = item.encode("utf-8") if text else item
            data += b
            lengths.append(len(b))
        self._set(data, lengths)

    @classmethod
    def from_gguf(cls, f: GGUFFile, arr: GGUFArray) -> "Pieces":
        """The strings of a GGUF string array (u64 length, then UTF-8 bytes, each) copied from the
        file's map byte for byte: no Python str per item. The walk that opened `f` checked every
        length and that every item is UTF-8."""
        self = cls.__new__(cls)
        self.text = True
        data, lengths, mv, pos = bytearray(), array("q"), memoryview(f.data), arr.offset
        for _ in range(arr.length):
            n = int.from_bytes(mv[pos:pos + 8], "little")
            data += mv[pos + 8:pos + 8 + n]
            lengths.append(n)
            pos += 8 + n
        self._set(data, lengths)
        return self

    def _set(self, data: bytearray, lengths: array):
        # int32 offsets where the blob allows (a vocabulary's is a few MB): half the size
        dtype = np.int32 if len(data) < 2**31 else np.int64
        self.offsets = np.zeros(len(lengths) + 1, dtype)
        np.cumsum(np.frombuffer(lengths, np.int64), out=self.offsets[1:])
        self.blob = bytes(data)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self.offsets) - 1
        if not -n <= i < n:
            raise IndexError(f"piece {i} of a vocabulary of {n}")
        if i < 0:
            i += n
        offsets = self.offsets
        b = self.blob[offsets[i]:offsets[i + 1]]
        return b.decode("utf-8") if self.text else b

    def __iter__(self):
        blob, text = self.blob, self.text
        for start in range(0, len(self), 4096):       # offsets as Python ints a block at a time
            ends = self.offsets[start:start + 4097].tolist()
            for a, b in zip(ends, ends[1:]):
                yield blob[a:b].decode("utf-8") if text else blob[a:b]


class Tokenizer:
    """A GGUF vocabulary as llama.cpp tokenizes it: with minisparse's `ByteLevelBPE` (`.bpe`) for the
    gpt2 family, else wrapping a `tokenizers.Tokenizer` (`.hf`; None when `.bpe` encodes).

    Lone surrogates (a Python str can hold them, UTF-8 cannot) are replaced by U+FFFD before
    encoding, which is what a UTF-8 decoder makes of the bytes such a string would come from.

    >>> tok = load_tokenizer("../shared/fixtures/stories260K.gguf")   # doctest: +SKIP
    >>> tok.decode(tok.encode("Once upon a time"))                      # doctest: +SKIP
    'Once upon a time'
    """

    def __init__(self, hf, *, model, pre, tokens, types, bos_id, eos_id, eot_ids, add_bos,
                 add_space_prefix, chat_template, bpe: ByteLevelBPE | None = None):
        if (hf is None) == (bpe is None):
            raise ValueError("Tokenizer: expected exactly one of hf (a tokenizers.Tokenizer) and bpe "
                             "(a ByteLevelBPE)")
        self.hf, self.bpe, self.model, self.pre = hf, bpe, model, pre
        self.bos_id, self.eos_id, self.eot_ids = bos_id, eos_id, eot_ids
        self.add_bos, self.add_space_prefix, self.chat_template = add_bos, add_space_prefix, chat_template
        # a vocabulary is 30k-250k pieces: kept as two blobs (the texts, and the bytes each piece
        # renders as) with offsets, not as lists of Python objects, which would hold several times
        # their size for the whole run
        self._bytes = Pieces((self._piece_bytes(t, int(ty)) for t, ty in zip(tokens, types)), text=False)
        self.tokens = tokens if isinstance(tokens, Pieces) else Pieces(tokens)
        types = np.asarray(types, np.int64)
        # the six known types fit int8; a file may hold others (llama.cpp reads them as undefined)
        small = types.size == 0 or (types.min() >= -128 and types.max() <= 127)
        self.types = types.astype(np.int8) if small else types
        self.vocab_size = len(self.tokens)

    def _piece_bytes(self, t: str, ty: int) -> bytes:
        if ty in (CONTROL, UNKNOWN, UNUSED):
            return b""  # rendered as nothing, as llama.cpp's token_to_piece(special=false)
        if ty == USER_DEFINED:
            return t.encode("utf-8")
        if self.model == "llama":
            if ty == BYTE:
                return bytes([int(t[3:5], 16)])
            return t.replace("▁", " ").encode("utf-8")
        if all(c in _BYTE_LEVEL for c in t):  # byte-level BPE: each char stands for one byte
            return bytes(_BYTE_LEVEL[c] for c in t)
        return t.encode("utf-8")

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = False) -> list[int]:
        """Token ids of `text` (T,). add_bos None follows the GGUF's rule. parse_special=False (as
        llama.cpp's test vectors and `llama_tokenize(..., parse_special=false)`) leaves control
        tokens such as "<s>" in the text as plain text; user-defined tokens are always matched."""
        text = _SURROGATES.sub("\ufffd", text)
        if self.bpe is not None:
            ids = self.bpe.encode(text, parse_special)
        else:
            # one shared HF object: the flag is set on every call (not thread-safe; fine for this engine)
            self.hf.encode_special_tokens = not parse_special
            ids = self.hf.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids) -> str:
        """Text of `ids`; control tokens (BOS, EOS, ...) render as nothing."""
        if self.bpe is not None:    # each token's bytes, joined: a character may span tokens
            return b"".join(map(self._bytes.__getitem__, ids)).decode("utf-8", errors="replace")
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def token_bytes(self, i: int) -> bytes:
        """The exact bytes token `i` contributes to the output (a byte token is a single byte)."""
        return self._bytes[i]

    def decode_piece(self, i: int) -> str:
        """Token `i` alone as text (incomplete UTF-8 shows as U+FFFD; use decode_stream to print)."""
        return self._bytes[i].decode("utf-8", errors="replace")

    def decode_stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns ids into text as they arrive: `push(id)` returns the text that became complete
    (maybe ""), `flush()` what is left. Bytes of a character split over byte-fallback tokens are
    held back until the character is whole; SentencePiece's prefix space is dropped once, at start.

    >>> s = tok.decode_stream()                                      # doctest: +SKIP
    >>> "".join(s.push(i) for i in ids) + s.flush() == tok.decode(ids)  # doctest: +SKIP
    True
    """

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip = tok.model == "llama" and tok.add_space_prefix  # until the first text appears

    def _emit(self, text: str) -> str:
        if self._strip and text:
            self._strip = False
            if text.startswith(" "):
                text = text[1:]
        return text

    def push(self, token_id: int) -> str:
        return self._emit(self._utf8.decode(self.tok.token_bytes(token_id)))

    def flush(self) -> str:
        return self._emit(self._utf8.decode(b"", final=True))


_BYTE_LEVEL = {c: b for b, c in enumerate(BYTE_CHARS)}   # GPT-2's byte-level char -> byte value


def load_tokenizer(path_or_file, backend: str = "minisparse") -> Tokenizer:
    """Tokenizer of a GGUF file: a path, or a `GGUFFile` already open (`gguf_io.open_gguf`), so the
    file is walked once. backend="tokenizers" encodes a gpt2-family vocabulary with the tokenizers
    library's BPE model instead of minisparse's (the same ids; the library's tables take more
    memory); the llama family always uses the library.

    >>> tok = load_tokenizer("../shared/fixtures/vocab/ggml-vocab-llama-spm.gguf")  # doctest: +SKIP
    >>> tok.encode("Hello world", add_bos=False)                                    # doctest: +SKIP
    [15043, 3186]
    """
    if isinstance(path_or_file, GGUFFile):
        f = path_or_file
    elif isinstance(path_or_file, (str, os.PathLike)):
        f = GGUFFile(path_or_file)          # the bounds-checked walk, before any value is read
    else:
        raise TypeError(f"load_tokenizer: expected a path or a minisparse GGUFFile (open_gguf(path)), "
                        f"got {type(path_or_file).__name__}")
    src = f.path
    if backend not in BACKENDS:
        raise ValueError(f"load_tokenizer: backend {backend!r} is not known; expected one of {', '.join(BACKENDS)}")

    model = _field(f, src, "tokenizer.ggml.model", "str")
    if model not in SUPPORTED_MODELS:
        raise GGUFError(f"{src}: field 'tokenizer.ggml.model': '{model}' is not supported; "
                        f"expected one of {', '.join(SUPPORTED_MODELS)}")
    # the vocabulary as one blob + offsets from the start: a list of its 50k-250k texts, even
    # for a moment, leaves the heap fragmented for the rest of the run
    tokens = _field(f, src, "tokenizer.ggml.tokens", "str[]", as_list=False)
    if not len(tokens):
        raise GGUFError(f"{src}: field 'tokenizer.ggml.tokens': empty; expected at least one token")
    types = _field(f, src, "tokenizer.ggml.token_type", "int[]", required=False, as_list=False,
                   default=np.full(len(tokens), NORMAL))
    if len(types) != len(tokens):
        raise GGUFError(f"{src}: field 'tokenizer.ggml.token_type': has {len(types)} entries; "
                        f"expected one per token ({len(tokens)})")
    pre = _field(f, src, "tokenizer.ggml.pre", "str", required=False, default="default")

    def tok_id(key, default):
        v = _field(f, src, key, "int", required=False, default=default)
        return v if v is not None and 0 <= v < len(tokens) else None  # 2**32-1 means "none"

    hf = bpe = None
    if model == "llama":
        hf, add_space = _build_spm(src, list(tokens), f)
        bos, eos = tok_id("tokenizer.ggml.bos_token_id", 1), tok_id("tokenizer.ggml.eos_token_id", 2)
        add_bos_default = True
    else:
        add_space = False
        if backend == "tokenizers":
            hf = _build_gpt2_hf(src, list(tokens), f, pre)
        bos, eos = tok_id("tokenizer.ggml.bos_token_id", None), tok_id("tokenizer.ggml.eos_token_id", None)
        add_bos_default = PRE_ALIASES.get(pre) == "llama3"  # llama.cpp turns BOS on for llama3 vocabs
    add_bos = _field(f, src, "tokenizer.ggml.add_bos_token", "bool", required=False,
                     default=add_bos_default)

    types = np.array(types, np.int64)                   # a copy: the file's view is read-only
    eot = {i for i, t in enumerate(tokens) if t in _EOG_TEXTS}
    types[list(eot)] = CONTROL
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if (i := tok_id(key, None)) is not None:
            eot.add(i)
    if eos is not None:
        eot.add(eos)
    # llama.cpp strips the whitespace after Phi-3's chat tokens (a per-model rule keyed on
    # general.name, since GGUF stores no such attribute); HF's rstrip does the same
    name = str(_field(f, src, "general.name", "str", required=False, default="")).lower()
    phi3 = "phi-3" in name or "phi3" in name

    def rstrip(t):
        return phi3 and t not in ("<unk>", "<s>", "<|endoftext|>")

    # control/unknown tokens are special (not matched in text unless parse_special); user-defined
    # ones are matched always, as llama.cpp's tokenizer_st_partition does
    special = [tokens[i] for i in np.flatnonzero((types == CONTROL) | (types == UNKNOWN))]
    user = [tokens[i] for i in np.flatnonzero(types == USER_DEFINED)]
    if hf is not None:
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=rstrip(t)) for t in special])
        hf.add_tokens([AddedToken(t, special=False, normalized=False, rstrip=rstrip(t))
                       for t in user])  # ids already in the vocab: kept
    else:
        added = [(t, True, rstrip(t)) for t in special] + [(t, False, rstrip(t)) for t in user]
        bpe = _build_gpt2(src, tokens, f, pre, added)
    template = _field(f, src, "tokenizer.chat_template", "str", required=False)
    return Tokenizer(hf, model=model, pre=pre, tokens=tokens, types=types, bos_id=bos, eos_id=eos,
                     eot_ids=eot, add_bos=add_bos, add_space_prefix=add_space, chat_template=template,
                     bpe=bpe)
