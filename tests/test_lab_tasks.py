"""The long-context task generators: the needle is where the example says, the answer is in the
text (and, for needles, only there), seeds reproduce, lengths fit."""
import re
from collections import Counter
from pathlib import Path

import pytest

import minisparse
from minisparse.lab.tasks import (TASKS, context_ids, long_texts, make_example, make_task_set,
                                  prose_sentences, question_ids)

MODELS = Path(__file__).resolve().parent.parent / "models"
NEEDLE_TASKS = ["niah_single_digits", "niah_single_uuid", "niah_single_word", "niah_multikey",
                "niah_multivalue", "variable_tracking", "qa_stdlib"]


@pytest.fixture(scope="module")
def tok():
    return minisparse.load_tokenizer(MODELS / "minisparse-pydoc.gguf")


@pytest.fixture(scope="module")
def passkey_tok():
    return minisparse.load_tokenizer(MODELS / "minisparse-passkey.gguf")


def _tok_for(task, tok, passkey_tok):
    return passkey_tok if task == "passkey" else tok


def _strip_bos(tok, ids):
    return ids[1:] if ids and ids[0] == tok.bos_id else ids


@pytest.mark.parametrize("task", NEEDLE_TASKS + ["passkey"])
@pytest.mark.parametrize("depth", [0.2, 0.8])
def test_needle_is_at_its_stated_char_and_token_position(task, depth, tok, passkey_tok):
    t = _tok_for(task, tok, passkey_tok)
    ex = make_example(task, t, 384, depth, seed=3)
    ids = context_ids(t, ex.context)
    assert ex.needle_tokens and len(ex.needle_tokens) == len(ex.needle_chars) == len(ex.needle_texts)
    for p, c, text in zip(ex.needle_tokens, ex.needle_chars, ex.needle_texts):
        # the ids before the needle are exactly the text before it, and the needle's ids start it
        assert t.decode(_strip_bos(t, ids[:p])) == ex.context[:c]
        assert t.decode(ids[p:]).lstrip(" \n").startswith(text)
        assert ex.context[c:].lstrip(" \n").startswith(text)
    assert ex.prompt == ex.context + ex.question
    assert ex.n_tokens == len(ids) + len(question_ids(t, ex.question))


@pytest.mark.parametrize("task", NEEDLE_TASKS + ["passkey"])
def test_answer_is_in_the_needles_and_nowhere_else(task, tok, passkey_tok):
    t = _tok_for(task, tok, passkey_tok)
    ex = make_example(task, t, 384, 0.5, seed=11)
    for a in ex.answers:
        assert re.search(rf"(?<!\w){re.escape(a)}(?!\w)", ex.context), f"answer {a!r} not in the context"
    if task == "qa_stdlib":
        # a question over real code: the quoted docstring line is there once, in the gold
        # function, which is the function named by the answer
        line = ex.meta["docstring_line"]
        assert ex.context.count(line) == 1 and line in ex.needle_texts[0]
        assert f"def {ex.answers[0]}(" in ex.needle_texts[0]
        return
    rest = ex.context
    for text in ex.needle_texts:
        assert ex.context.count(text) == 1
        rest = rest.replace(text, "")
    for a in ex.answers:
        assert not re.search(rf"(?<!\w){re.escape(a)}(?!\w)", rest), f"answer {a!r} outside its needle"


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_needle_depth_is_the_requested_one(depth, tok):
    ex = make_example("niah_single_digits", tok, 1024, depth, seed=5)
    ids = context_ids(tok, ex.context)
    sents = prose_sentences()
    used = [sents[(ex.meta["haystack_start"] + i) % len(sents)] for i in range(ex.meta["haystack_sentences"])]
    # the needle goes between sentences at round(depth * m), after the intro: its token offset is
    # off depth * len by at most the intro, half a sentence of rounding plus one sentence of
    # boundary, and the distractor-free needle itself, so one longest sentence + intro + needle
    longest = max(len(question_ids(tok, " " + s)) for s in used)
    intro = len(context_ids(tok, ex.context[:ex.context.index("\n") + 1]))
    needle = len(question_ids(tok, " " + ex.needle_texts[0]))
    assert abs(ex.depth_actual - depth) <= (longest + intro + needle) / len(ids)


@pytest.mark.parametrize("task", list(TASKS))
def test_seeds_reproduce_and_differ(task, tok, passkey_tok):
    t = _tok_for(task, tok, passkey_tok)
    a, b = make_example(task, t, 300, 0.5, seed=1), make_example(task, t, 300, 0.5, seed=1)
    assert a.to_dict() == b.to_dict()
    c = make_example(task, t, 300, 0.5, seed=2)
    assert c.prompt != a.prompt and c.seed == 2


@pytest.mark.parametrize("task", ["niah_single_digits", "niah_multivalue", "variable_tracking"])
@pytest.mark.parametrize("n", [384, 1024])
def test_length_fits_to_one_haystack_sentence(task, n, tok):
    ex = make_example(task, tok, n, 0.5, seed=7)
    assert ex.n_tokens + ex.max_new_tokens <= n          # RULER: the answer's budget is in the length
    sents = prose_sentences()
    refused = sents[(ex.meta["haystack_start"] + ex.meta["haystack_sentences"]) % len(sents)]
    # the fit stopped because the next sentence (joined by a space) would overflow; BPE merges at
    # the two joins and a needle moving to the next boundary change the count by a few tokens (3)
    assert n - ex.max_new_tokens - ex.n_tokens <= len(question_ids(tok, " " + refused)) + 3


def test_passkey_length_is_exact_with_the_answer(passkey_tok):
    ex = make_example("passkey", passkey_tok, 512, 0.5, seed=0)
    answer = question_ids(passkey_tok, " " + ex.answers[0])
    assert ex.n_tokens + len(answer) == 512


def test_common_words_counts(tok):
    ex = make_example("common_words", tok, 1024, 0.5, seed=4)
    counts = Counter(re.findall(r"\d+\. ([a-z]+)", ex.context))
    assert all(counts[w] == ex.meta["freq_common"] for w in ex.answers)
    others = [c for w, c in counts.items() if w not in ex.answers]
    assert others and max(others) == ex.meta["freq_rare"] < ex.meta["freq_common"]
    # one more rare word ("N. word", <= 16 tokens) would overflow the prompt's share
    assert 1024 - ex.max_new_tokens - 16 <= ex.n_tokens <= 1024 - ex.max_new_tokens


def test_task_set_records_seeds_and_depths(tok):
    exs = make_task_set(["niah_single_word", "common_words"], tok, 384, [0.25, 0.75], n=3, seed=10)
    assert [(e.task, e.seed) for e in exs][:3] == [("niah_single_word", s) for s in (10, 11, 12)]
    assert [e.depth for e in exs[:3]] == [0.25, 0.75, 0.25]


def test_long_texts_are_at_least_8k_tokens(tok):
    texts = long_texts(8192, tokenizer=tok)
    assert {k.split(":")[0] for k in texts} == {"prose", "code"}
    assert all(len(tok.encode(t)) >= 8192 for t in texts.values())


def test_bad_arguments_are_named(tok):
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        make_example("nope", tok, 256, 0.5, 0)
    with pytest.raises(ValueError, match="depth must be in"):
        make_example("niah_single_digits", tok, 256, 1.5, 0)
    with pytest.raises(ValueError, match="too short"):
        make_example("niah_single_digits", tok, 20, 0.5, 0)
