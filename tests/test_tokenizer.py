"""minisparse.tokenizer against llama.cpp's own tokenizer test vectors, plus round-trip, streaming
and error properties. The shipped model's vocabulary is checked without ../shared: committed
vectors (tests/fixtures/minisparse_pydoc_vocab.json) and a property, both against bpe_reference.

The vectors (`.inp`/`.out` beside each vocab GGUF) are what llama.cpp's test-tokenizer-0 checks:
inputs separated by "\\n__ggml_vocab_test__\\n" (the newline before the separator is not part of the
input), one line of expected ids per input, encoded WITHOUT BOS.
"""
import heapq
import json
import re
import warnings

import gguf
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import FIXTURES, LOCAL_FIXTURES, ROOT, shared_fixture
from minisparse.errors import GGUFError
from minisparse.gguf_io import open_gguf
from minisparse.tokenizer import _BYTE_LEVEL, _EOG_TEXTS, PRE_REGEXES, Pieces, load_tokenizer

VOCABS = ["ggml-vocab-llama-spm.gguf", "ggml-vocab-phi-3.gguf", "ggml-vocab-gpt-2.gguf"]
ALL = ["vocab/" + v for v in VOCABS] + ["stories260K.gguf"]
SEP = "\n__ggml_vocab_test__\n"
_cache = {}


def tok(name):
    """Tokenizer of a shared fixture, built once per session (a 50k vocab takes ~2 s)."""
    if name not in _cache:
        _cache[name] = load_tokenizer(shared_fixture(name))
    return _cache[name]


def _vectors(vocab):
    """(input, expected ids) pairs, read at collection; absent fixtures give one skipping case."""
    inp, out = FIXTURES / "vocab" / (vocab + ".inp"), FIXTURES / "vocab" / (vocab + ".out")
    if not inp.exists():
        return [pytest.param(vocab, None, None, marks=pytest.mark.skip(reason=f"{inp} is absent"), id=vocab)]
    texts = inp.read_text(encoding="utf-8").split(SEP)
    assert texts[-1] == "", "the .inp file ends with a separator line"
    lines = out.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""
    texts, lines = texts[:-1], lines[:-1]
    assert len(texts) == len(lines), f"{vocab}: {len(texts)} inputs but {len(lines)} id lines"
    return [pytest.param(vocab, t, [int(x) for x in line.split()], id=f"{vocab}-{i}")
            for i, (t, line) in enumerate(zip(texts, lines))]


CASES = [c for v in VOCABS for c in _vectors(v)]


def expected_text(t, s):
    """What decode(encode(s)) must give: lone surrogates become U+FFFD (they cannot be UTF-8);
    SentencePiece writes spaces as U+2581 "▁", so a literal "▁" comes back as a space (llama.cpp too)."""
    s = re.sub("[\ud800-\udfff]", "\ufffd", s)
    return s.replace("▁", " ") if t.model == "llama" else s


def stream(t, ids):
    s = t.decode_stream()
    pieces = [s.push(i) for i in ids]
    return pieces + [s.flush()]


# ------------------------------------------------------------------------------------------------
# llama.cpp test vectors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab,text,ids", CASES)
def test_encodes_to_llama_cpp_ids(vocab, text, ids):
    assert tok("vocab/" + vocab).encode(text, add_bos=False) == ids


@pytest.mark.parametrize("vocab,text,ids", CASES)
def test_vector_round_trips(vocab, text, ids):
    t = tok("vocab/" + vocab)
    assert t.decode(ids) == expected_text(t, text)
    assert "".join(stream(t, ids)) == t.decode(ids)


# ------------------------------------------------------------------------------------------------
# SentencePiece: equal to llama.cpp's algorithm, re-implemented here from its description
# ------------------------------------------------------------------------------------------------
def spm_reference(t, scores, ids_of, text):
    """llama.cpp's llm_tokenizer_spm on one fragment: UTF-8 chars as symbols, repeatedly merge the
    adjacent pair whose joined piece is in the vocabulary with the highest score (leftmost on ties),
    then any symbol that is not a piece becomes its <0xXX> byte tokens."""
    if not text:
        return []
    b = ("▁" + text.replace(" ", "▁")).encode()
    starts = [i for i in range(len(b)) if b[i] & 0xC0 != 0x80]     # UTF-8 character starts
    ends = starts[1:] + [len(b)]
    # symbol k: [byte start, byte length, prev, next]
    sym = [[s, e - s, k - 1, k + 1 if k + 1 < len(starts) else -1]
           for k, (s, e) in enumerate(zip(starts, ends))]
    heap = []

    def add(left, right):
        if left != -1 and right != -1:
            piece = b[sym[left][0]: sym[left][0] + sym[left][1] + sym[right][1]]
            if piece in ids_of:
                heapq.heappush(heap, (-scores[ids_of[piece]], left, right, len(piece)))

    for k in range(1, len(sym)):
        add(k - 1, k)
    while heap:
        _, left, right, size = heapq.heappop(heap)
        L, R = sym[left], sym[right]
        if L[1] == 0 or R[1] == 0 or L[1] + R[1] != size:
            continue  # one side was merged since this pair was queued
        L[1], R[1], L[3] = L[1] + R[1], 0, R[3]
        if R[3] >= 0:
            sym[R[3]][2] = left
        add(L[2], left)
        add(left, L[3])
    out, k = [], 0
    while k != -1:
        piece = b[sym[k][0]: sym[k][0] + sym[k][1]]
        out += [ids_of[piece]] if piece in ids_of else [ids_of[f"<0x{x:02X}>".encode()] for x in piece]
        k = sym[k][3]
    return out


SPM = ["vocab/" + VOCABS[0], "vocab/" + VOCABS[1], "stories260K.gguf"]
_ref_cache = {}


def spm_reference_data(name):
    if name not in _ref_cache:
        t = tok(name)
        ids_of = {}
        for i, piece in enumerate(t.tokens):
            ids_of.setdefault(piece.encode(), i)
        fields = gguf.GGUFReader(shared_fixture(name)).fields
        _ref_cache[name] = (fields["tokenizer.ggml.scores"].contents(), ids_of)
    return _ref_cache[name]


@pytest.mark.parametrize("name", SPM)
@given(data=st.data())
def test_spm_encode_equals_llama_cpp_algorithm(name, data):
    t = tok(name)
    scores, ids_of = spm_reference_data(name)
    # texts glued from vocabulary pieces exercise long merge chains; plain text covers the rest
    words = st.sampled_from(t.tokens[259:]).map(lambda p: p.replace("▁", " "))
    s = data.draw(st.one_of(st.lists(words, max_size=12).map("".join),
                            st.text(st.characters(exclude_categories=["Cs"]), max_size=40)))
    s = s.replace("<", "")          # keep user-defined pieces like "</s>" out: they split fragments
    assert t.encode(s, add_bos=False) == spm_reference(t, scores, ids_of, s)


# ------------------------------------------------------------------------------------------------
# Byte-level BPE: equal to llama.cpp's llm_tokenizer_bpe, re-implemented with the `regex` module
# ------------------------------------------------------------------------------------------------
def regex_split(text, exprs):
    """llama.cpp's unicode_regex_split: each regex in turn cuts every piece into its matches and
    the text between them."""
    regex = pytest.importorskip("regex")
    pieces = [text] if text else []
    for expr in exprs:
        out = []
        for p in pieces:
            at = 0
            for m in regex.finditer(expr, p):
                out += [p[at:m.start()]] if m.start() > at else []
                out += [m.group()] if m.end() > m.start() else []
                at = m.end()
            out += [p[at:]] if at < len(p) else []
        pieces = out
    return pieces


def bpe_reference(t, ranks, exprs, text):
    """Merge the adjacent pair of lowest merge rank (leftmost on ties) until none is left."""
    to_char = {b: c for c, b in _BYTE_LEVEL.items()}
    ids_of = {p: i for i, p in reversed(list(enumerate(t.tokens)))}
    out = []
    for word in regex_split(text, exprs):
        syms = [to_char[b] for b in word.encode()]
        while len(syms) > 1:
            best = min(range(len(syms) - 1), key=lambda k: (ranks.get((syms[k], syms[k + 1]), 1 << 30), k))
            if (syms[best], syms[best + 1]) not in ranks:
                break
            syms[best:best + 2] = [syms[best] + syms[best + 1]]
        out += [ids_of[s] for s in syms]
    return out


# a mixed alphabet: the regex module, Oniguruma (HF) and llama.cpp carry different Unicode
# versions, so code points assigned recently could be classed differently; these are stable
MIXED = st.lists(st.sampled_from(list("aZé ß\t\n\r  09١٢'’sStTdDmM.,!?-—()[]#$^~|+<=>_\\") +
                                 ["東", "京", "😀", "ünï", "\u00a0", "\u3000", "ж", "Ω", "✓", "'re", "'LL", "the"]),
                 max_size=30).map("".join)


@given(s=MIXED)
def test_gpt2_encode_equals_llama_cpp_algorithm(s):
    t = tok("vocab/" + VOCABS[2])
    if "ranks" not in _ref_cache:
        fields = gguf.GGUFReader(shared_fixture("vocab/" + VOCABS[2])).fields
        merges = fields["tokenizer.ggml.merges"].contents()
        _ref_cache["ranks"] = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
    assert t.encode(s) == bpe_reference(t, _ref_cache["ranks"], PRE_REGEXES["gpt2"], s)


# ---- the shipped vocabulary: no ../shared needed ----------------------------------------------
PYDOC = ROOT / "models" / "minisparse-pydoc.gguf"
PYDOC_VECTORS = json.loads((LOCAL_FIXTURES / "minisparse_pydoc_vocab.json").read_text(encoding="utf-8"))["vectors"]


def pydoc_reference():
    if "pydoc" not in _ref_cache:
        merges = gguf.GGUFReader(PYDOC).fields["tokenizer.ggml.merges"].contents()
        _ref_cache["pydoc"] = (load_tokenizer(PYDOC), {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)})
    return _ref_cache["pydoc"]


@pytest.mark.parametrize("i", range(len(PYDOC_VECTORS)))
def test_shipped_vocab_encodes_to_the_reference_vectors(i):
    # ids written by tests/fixtures/make_shipped_goldens.py with bpe_reference (not minisparse's
    # tokenizer) on llama.cpp's test-tokenizer-0 inputs and code-like texts
    t, _ = pydoc_reference()
    text, ids = PYDOC_VECTORS[i]["text"], PYDOC_VECTORS[i]["ids"]
    assert t.encode(text, add_bos=False) == ids
    assert t.decode(ids) == expected_text(t, text)


@given(s=MIXED)
def test_shipped_vocab_encode_equals_llama_cpp_algorithm(s):
    t, ranks = pydoc_reference()
    assert t.encode(s, add_bos=False) == bpe_reference(t, ranks, PRE_REGEXES["gpt2"], s)


@pytest.fixture(scope="module")
def tiny_bpe_by_pre(tmp_path_factory):
    d = tmp_path_factory.mktemp("pre")
    pres = ["default", "gpt-2", "llama-bpe", "qwen2", "smollm"]
    return {pre: load_tokenizer(tiny_bpe(d, pre)) for pre in pres}


@pytest.mark.parametrize("pre,key", [("default", "default"), ("gpt-2", "gpt2"), ("llama-bpe", "llama3"),
                                     ("qwen2", "qwen2"), ("smollm", "starcoder")])
@given(s=MIXED)
def test_pre_tokeniser_splits_like_llama_cpp_regex_list(tiny_bpe_by_pre, pre, key, s):
    # checks that the tokenizers library's Split sequence (which ByteLevelBPE cuts words with) cuts
    # text as llama.cpp's unicode_regex_split does with the same regex list; which list a `pre`
    # name gets is pinned by test_pre_tokeniser_follows_pre_name
    pre_tokenizer = tiny_bpe_by_pre[pre].bpe.pre_tokenizer
    assert [p for p, _ in pre_tokenizer.pre_tokenize_str(s)] == regex_split(s, PRE_REGEXES[key])


# ------------------------------------------------------------------------------------------------
# Metadata rules: BOS/EOS/EOG, special tokens, chat template
# ------------------------------------------------------------------------------------------------
def test_metadata_of_each_vocab():
    spm, phi, gpt = (tok("vocab/" + v) for v in VOCABS)
    assert (spm.model, spm.bos_id, spm.eos_id, spm.vocab_size, spm.add_bos) == ("llama", 1, 2, 32000, True)
    assert (phi.model, phi.eos_id, phi.vocab_size) == ("llama", 32000, 32064)
    assert {32000, 32007} <= phi.eot_ids          # <|endoftext|>, <|end|>
    assert (gpt.model, gpt.pre, gpt.bos_id, gpt.eos_id, gpt.add_bos) == ("gpt2", "gpt-2", 50256, 50256, False)
    assert gpt.eot_ids == {50256} and spm.eot_ids == {2}
    assert phi.chat_template.startswith("{{ bos_token }}") and spm.chat_template is None
    assert spm.hf.get_vocab_size() == 32000


def test_bos_follows_gguf_rule():
    spm, gpt = tok("vocab/" + VOCABS[0]), tok("vocab/" + VOCABS[2])
    assert spm.encode("Hello world") == [1, 15043, 3186]          # add_bos_token = true
    assert spm.encode("Hello world", add_bos=False) == [15043, 3186]
    assert gpt.encode("Hello world") == gpt.encode("Hello world", add_bos=False)
    assert gpt.encode("Hello world", add_bos=True)[0] == 50256


def test_control_tokens_parsed_only_when_asked():
    spm = tok("vocab/" + VOCABS[0])
    assert 1 not in spm.encode("<s> hi </s>", add_bos=False)          # llama.cpp parse_special=false
    assert spm.encode("<s>", add_bos=False, parse_special=True) == [1]
    assert spm.decode(spm.encode("<s> hi", add_bos=False)) == "<s> hi"
    assert spm.decode([1, 15043, 2]) == "Hello"                         # control tokens render as nothing


def test_phi3_chat_tokens_strip_following_whitespace():
    # llama.cpp marks Phi-3's chat tokens RSTRIP (by general.name): the "\n" after <|user|> is dropped
    # and the next fragment gets SentencePiece's prefix space, like the start of a text
    phi = tok("vocab/" + VOCABS[1])
    assert phi.encode("<|user|>\nHi<|end|>", add_bos=False, parse_special=True) == \
        [32010] + phi.encode("Hi", add_bos=False) + [32007]


# ------------------------------------------------------------------------------------------------
# Round trip and streaming properties
# ------------------------------------------------------------------------------------------------
any_text = st.lists(st.one_of(st.characters(), st.sampled_from(" \t\n\r▁\x00"),
                              st.integers(0xD800, 0xDFFF).map(chr)), max_size=40).map("".join)


@pytest.mark.parametrize("name", ALL)
@given(s=any_text)
def test_decode_inverts_encode_for_any_text(name, s):
    t = tok(name)
    ids = t.encode(s, add_bos=False)
    assert all(0 <= i < t.vocab_size for i in ids)
    assert t.decode(ids) == expected_text(t, s)


@pytest.mark.parametrize("name", ALL)
@given(s=any_text)
def test_stream_pieces_concatenate_to_decode(name, s):
    t = tok(name)
    ids = t.encode(s)
    assert "".join(stream(t, ids)) == t.decode(ids)
    # the per-token bytes are the same text (an independent path from the HF decoder chain)
    text = b"".join(t.token_bytes(i) for i in ids).decode("utf-8")
    assert (text[1:] if t.model == "llama" and text.startswith(" ") else text) == t.decode(ids)


def test_stream_holds_back_a_character_split_over_byte_tokens():
    spm = tok("vocab/" + VOCABS[0])
    ids = spm.encode("😀", add_bos=False)
    assert ids == [29871, 243, 162, 155, 131]   # "▁" then the 4 UTF-8 bytes <0xF0><0x9F><0x98><0x80>
    assert stream(spm, ids) == ["", "", "", "", "😀", ""]   # the prefix space is dropped, as in decode
    assert stream(spm, [15043, 3186]) == ["Hello", " world", ""]


def test_lone_surrogates_are_encoded_as_replacement_character():
    for name in ALL:
        t = tok(name)
        assert t.encode("a\ud800b\udfff") == t.encode("a\ufffdb\ufffd")
        assert t.decode(t.encode("a\ud800b")) == "a\ufffdb"


@pytest.mark.parametrize("name", ["vocab/" + VOCABS[0], "vocab/" + VOCABS[2], "stories260K.gguf"])
def test_very_long_input_round_trips(name):
    t = tok(name)
    s = ("Once upon a time, ünïcödé 😀 \t\n 12345 — 東京 " * 3000)[:100_000]
    ids = t.encode(s, add_bos=False)
    assert t.decode(ids) == s


def test_stories_text_round_trips():
    t = tok("stories260K.gguf")
    text = shared_fixture("stories260K.greedy200.txt").read_text(encoding="utf-8")
    ids = t.encode(text)
    assert t.vocab_size == 512 and ids[0] == 1 and max(ids) < 512
    assert t.decode(ids) == text
    assert "".join(stream(t, ids)) == text


# ------------------------------------------------------------------------------------------------
# Pre-tokeniser choice and bad files, on tiny GGUFs written here
# ------------------------------------------------------------------------------------------------
BYTE_CHARS = sorted(_BYTE_LEVEL)   # the 256 printable stand-ins of byte-level BPE


def write_gguf(path, **kv):
    """A GGUF with only the given tokenizer metadata (no tensors)."""
    w = gguf.GGUFWriter(str(path), arch="llama")
    if "model" in kv:
        w.add_tokenizer_model(kv["model"])
    if "tokens" in kv:
        w.add_token_list(kv["tokens"])
    if "merges" in kv:
        w.add_token_merges(kv["merges"])
    if "pre" in kv:
        w.add_tokenizer_pre(kv["pre"])
    if "bad_tokens" in kv:
        w.add_array("tokenizer.ggml.tokens", kv["bad_tokens"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_bpe(tmp_path, pre):
    # 256 byte-level tokens plus "12" and "123"; merges "1 2", "12 3"
    return write_gguf(tmp_path / f"{pre}.gguf", model="gpt2", tokens=BYTE_CHARS + ["12", "123"],
                      merges=["1 2", "12 3"], pre=pre)


@pytest.mark.parametrize("pre,pieces", [
    ("gpt-2", ["123", "123"]),              # \p{N}+ keeps the digit run together
    ("llama-bpe", ["123", "123"]),          # \p{N}{1,3}
    ("qwen2", list("123123")),              # digits one by one
    ("smollm", list("123123")),             # starcoder style: \p{N} first
])
def test_pre_tokeniser_follows_pre_name(tmp_path, pre, pieces):
    t = load_tokenizer(tiny_bpe(tmp_path, pre))
    ids = t.encode("123123", add_bos=False)
    assert [t.decode([i]) for i in ids] == pieces
    assert t.decode(t.encode("hi 123 there\n")) == "hi 123 there\n"


def test_unknown_pre_warns_and_uses_gpt2_regex(tmp_path):
    with pytest.warns(UserWarning, match="'mystery-pre'"):
        t = load_tokenizer(tiny_bpe(tmp_path, "mystery-pre"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = load_tokenizer(tiny_bpe(tmp_path, "gpt2"))
    assert t.encode("x 123123 y!") == ref.encode("x 123123 y!")


def test_accepts_an_open_gguf_file():
    from minisparse.gguf_io import open_gguf
    path = shared_fixture("stories260K.gguf")
    from_file = load_tokenizer(open_gguf(path))
    assert from_file.encode("Once upon") == tok("stories260K.gguf").encode("Once upon")
    with pytest.raises(TypeError, match="expected a path or a minisparse GGUFFile"):
        load_tokenizer(gguf.GGUFReader(path))      # gguf-py's reader is not ours: said, not misread


def test_missing_tokenizer_fields_name_the_field(tmp_path):
    from minisparse.gguf_io import open_gguf
    p = write_gguf(tmp_path / "none.gguf")
    with pytest.raises(GGUFError, match=r"none\.gguf: field 'tokenizer\.ggml\.model': missing"):
        load_tokenizer(p)
    with pytest.raises(GGUFError, match=r"none\.gguf: field 'tokenizer\.ggml\.model'"):
        load_tokenizer(open_gguf(p))           # an open file: the message still names the file
    p = write_gguf(tmp_path / "notokens.gguf", model="llama")
    with pytest.raises(GGUFError, match=r"field 'tokenizer\.ggml\.tokens': missing; expected an array of strings"):
        load_tokenizer(p)


def test_ill_typed_and_unsupported_fields_are_named(tmp_path):
    p = write_gguf(tmp_path / "ints.gguf", model="llama", bad_tokens=[1, 2, 3])
    with pytest.raises(GGUFError, match=r"field 'tokenizer\.ggml\.tokens': got an array of INT32 \(3 items\); "
                                        r"expected an array of strings"):
        load_tokenizer(p)      # the stored type is checked before the array is read
    w = gguf.GGUFWriter(str(tmp_path / "intmodel.gguf"), arch="llama")
    w.add_uint32("tokenizer.ggml.model", 5)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(GGUFError, match=r"field 'tokenizer\.ggml\.model': got a UINT32 \(5\); expected a string"):
        load_tokenizer(tmp_path / "intmodel.gguf")
    p = write_gguf(tmp_path / "bert.gguf", model="bert", tokens=["a"])
    with pytest.raises(GGUFError, match=r"'bert' is not supported; expected one of llama, gpt2"):
        load_tokenizer(p)
    p = write_gguf(tmp_path / "nomerges.gguf", model="gpt2", tokens=BYTE_CHARS)
    with pytest.raises(ValueError, match=r"field 'tokenizer\.ggml\.merges': missing"):
        load_tokenizer(p)   # GGUFError is a ValueError too
    with pytest.raises(GGUFError, match="no such file"):
        load_tokenizer(tmp_path / "absent.gguf")


# ---------------------------------------------------------------------------------------------
# The compact vocabulary tables (Pieces: one blob + offsets instead of lists of Python objects)
# ---------------------------------------------------------------------------------------------
@given(st.lists(st.text(st.characters(blacklist_categories=["Cs"]), max_size=6), max_size=40))
def test_pieces_hold_every_item(items):
    """Text and bytes Pieces give back each item exactly, by positive and negative index, as a
    slice and by iteration; an index outside the list raises IndexError as a list's does."""
    p, b = Pieces(items), Pieces([s.encode("utf-8") for s in items], text=False)
    assert len(p) == len(b) == len(items)
    assert list(p) == items and p[:] == items and p[1::2] == items[1::2]
    assert [b[i] for i in range(len(items))] == [s.encode("utf-8") for s in items]
    for i in range(-len(items), len(items)):
        assert p[i] == items[i]
    for i in (len(items), -len(items) - 1):
        with pytest.raises(IndexError):
            p[i]


@pytest.mark.parametrize("name", ALL)
def test_compact_tables_match_the_gguf_lists(name):
    """tokens and types as stored compactly are the file's own lists, item for item, and each
    token's bytes, read back from the blob, are the bytes computed from the file's text and type."""
    t = tok(name)
    f = open_gguf(shared_fixture(name))
    stored = f.get("tokenizer.ggml.tokens")
    assert t.vocab_size == len(stored) and list(t.tokens) == stored
    types = f.get("tokenizer.ggml.token_type")
    if types is not None:     # the loader marks end-of-generation texts as control tokens
        assert [int(x) for x in t.types] == [3 if s in _EOG_TEXTS else int(ty) for s, ty in zip(stored, types)]
    assert [t.token_bytes(i) for i in range(t.vocab_size)] == \
        [t._piece_bytes(s, int(ty)) for s, ty in zip(stored, t.types)]


def test_token_types_outside_int8_are_kept_as_written(tmp_path):
    # the six known types fit the compact int8 array; a file may hold other values (llama.cpp
    # reads them as undefined): they are kept exactly, not wrapped to another type's code
    path = tmp_path / "odd_types.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    n = 300
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [f"\u2581t{i}" for i in range(n - 259)]
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * n)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (n - 260) + [184])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    tok = load_tokenizer(path)
    assert int(tok.types[-1]) == 184 and int(tok.types[0]) == 2
    assert tok.tokens[n - 1] == toks[n - 1]
