"""Long-context tasks, generated and seeded: the RULER set (Hsieh et al., "RULER: What's the Real
Context Size of Your Long-Context Language Models?", 2024) rebuilt from text that ships with Python.

Leaves out running and scoring (suite.py) and anything downloaded: RULER's essay haystack becomes
Python's own documentation (`pydoc_data.topics`), its SQuAD questions become questions about real
standard-library source, and the pass-key task is needle.py's. Lengths are in tokens of the model's
own tokenizer; `Example.n_tokens` is the length the harness feeds (context ids, then question ids).

    >>> tok = minisparse.load_tokenizer("models/minisparse-pydoc.gguf")          # doctest: +SKIP
    >>> ex = make_example("niah_single_digits", tok, n_tokens=2048, depth=0.5, seed=0)  # doctest: +SKIP
    >>> ex.prompt == ex.context + ex.question, ex.answers                      # doctest: +SKIP
    (True, ['4839201'])
"""
from __future__ import annotations

import importlib
import inspect
import re
import string
import textwrap
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np

from .needle import QUESTION as PASSKEY_QUESTION
from .needle import build_kit, make_passkey_example


@dataclass
class Example:
    """One generated example. prompt == context + question; the harness tokenises the two parts
    separately (context with BOS, question without) so both protocols feed the same ids."""
    task: str
    prompt: str
    context: str
    question: str
    answers: list[str]            # every one must appear in the output for `correct`
    seed: int
    target_tokens: int            # the length asked for: prompt + answer budget
    n_tokens: int                 # the prompt fed: len(context ids) + len(question ids)
    depth: float | None           # the depth asked for (0 = start of the context), None if none
    needle_chars: list[int] = field(default_factory=list)    # where each needle starts in `context`
    needle_tokens: list[int] = field(default_factory=list)   # ... and in the context's ids
    needle_texts: list[str] = field(default_factory=list)
    depth_actual: float | None = None   # first needle token / context tokens
    max_new_tokens: int = 32
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- tokens


def context_ids(tok, context: str) -> list[int]:
    """The ids of a context as the harness feeds them: with the tokenizer's BOS rule."""
    return list(tok.encode(context))


def question_ids(tok, question: str) -> list[int]:
    return list(tok.encode(question, add_bos=False))


def _count(tok, context: str, question: str) -> int:
    return len(context_ids(tok, context)) + len(question_ids(tok, question))


def _fit(build, tok, question: str, n_tokens: int, hi: int, max_new: int):
    """The largest m in [0, hi] whose context build(m) fits n_tokens together with the question
    and max_new answer tokens (token counts grow with m, so a bisection finds it); returns
    (m, context)."""
    lo_m, hi_m, fixed = 0, hi, _count(tok, build(0), question)
    if fixed + max_new > n_tokens:
        raise ValueError(f"n_tokens={n_tokens} is too short: the task's fixed text takes {fixed} tokens "
                         f"and its answer {max_new} more")
    n_tokens -= max_new
    while lo_m < hi_m:
        mid = (lo_m + hi_m + 1) // 2
        if _count(tok, build(mid), question) <= n_tokens:
            lo_m = mid
        else:
            hi_m = mid - 1
    return lo_m, build(lo_m)


def _locate(ex: Example, tok) -> Example:
    """Fill needle_tokens, depth_actual and n_tokens from needle_chars."""
    ids = context_ids(tok, ex.context)
    ex.needle_tokens = [len(context_ids(tok, ex.context[:c])) for c in ex.needle_chars]
    ex.n_tokens = len(ids) + len(question_ids(tok, ex.question))
    if ex.needle_tokens:
        ex.depth_actual = ex.needle_tokens[0] / max(len(ids), 1)
    return ex


# ----------------------------------------------------------------------------- real text


@lru_cache(maxsize=1)
def prose_sentences() -> tuple[str, ...]:
    """Sentences of Python's bundled documentation (pydoc_data.topics), whitespace collapsed:
    the haystack, as RULER uses Paul Graham's essays. Code and tables are dropped by keeping
    sentences of 30-300 characters that start with a capital and end with a period."""
    from pydoc_data.topics import topics
    text = " ".join(re.sub(r"\s+", " ", topics[k]) for k in sorted(topics))
    parts = re.split(r"(?<=[.!?]) (?=[A-Z])", text)
    return tuple(s for s in parts if 30 <= len(s) <= 300 and s[0].isupper() and s.endswith(".")
                 and not re.search(r"\d{4,}", s))   # no long digit runs: needles' values are digits


@lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """Lower-case English words of 4-10 letters from the documentation, sorted (the word pool of
    keys, values and the common-words task)."""
    words = set(re.findall(r"\b[a-z]{4,10}\b", " ".join(prose_sentences())))
    return tuple(sorted(words))


# Modules whose source the QA task reads: pure-Python, present in every CPython 3.11 install.
QA_MODULES = ("argparse", "ast", "calendar", "configparser", "csv", "difflib", "email.message",
              "fractions", "ftplib", "gettext", "gzip", "heapq", "imaplib", "inspect",
              "ipaddress", "json.decoder", "logging", "mailbox", "optparse", "pathlib", "pickle",
              "pprint", "shlex", "shutil", "smtplib", "statistics", "string", "tarfile",
              "textwrap", "threading", "tokenize", "traceback", "typing", "uuid", "wave",
              "zipfile")


@lru_cache(maxsize=1)
def stdlib_functions() -> tuple[tuple[str, str, str], ...]:
    """(module, function name, source) of every module-level function or method with a docstring
    in QA_MODULES, at most 1,500 characters of source; sorted, so a seed picks the same ones."""
    out = []
    with warnings.catch_warnings():   # getmembers touches deprecated aliases such as typing.io
        warnings.simplefilter("ignore", DeprecationWarning)
        for mod_name in QA_MODULES:
            out += _functions_of(mod_name)
    return tuple(sorted(set(out)))


def _functions_of(mod_name: str) -> list[tuple[str, str, str]]:
    out = []
    mod = importlib.import_module(mod_name)
    objs = [o for _, o in inspect.getmembers(mod, inspect.isfunction)]
    for _, cls in inspect.getmembers(mod, inspect.isclass):
        objs += [o for _, o in inspect.getmembers(cls, inspect.isfunction)]
    for o in objs:
        if getattr(o, "__module__", None) != mod.__name__ or not o.__doc__:
            continue
        try:
            src = inspect.getsource(o)
        except (OSError, TypeError):
            continue
        src = textwrap.dedent(src)   # methods are indented
        if len(src) <= 1500 and src.startswith("def "):
            out.append((mod_name, o.__name__, src.rstrip() + "\n"))
    return out


def long_texts(min_tokens: int = 8192, tokenizer=None) -> dict[str, str]:
    """Long real texts for perplexity, each at least `min_tokens` long when a tokenizer is given
    (checked; None skips the check): prose (the documentation) and code (two modules' source;
    xmlrpc.client is held out of the pydoc model's training; argparse and the documentation are in it).

    >>> sorted(long_texts(tokenizer=None))
    ['code:argparse', 'code:xmlrpc.client', 'prose:pydoc']
    """
    from pydoc_data.topics import topics
    texts = {"prose:pydoc": "\n\n".join(topics[k].strip() for k in sorted(topics))}
    for mod in ("xmlrpc.client", "argparse"):
        texts[f"code:{mod}"] = inspect.getsource(importlib.import_module(mod))
    if tokenizer is not None:
        for name, text in texts.items():
            n = len(tokenizer.encode(text))
            if n < min_tokens:
                raise ValueError(f"long text {name!r} has {n} tokens, fewer than min_tokens={min_tokens}")
    return texts


# ----------------------------------------------------------------------------- needles in a haystack


def _digits(rng, n=7):
    return str(int(rng.integers(10 ** (n - 1), 10 ** n)))


def _uuid(rng):
    h = "".join(rng.choice(list("0123456789abcdef"), 32))
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _word_key(rng, vocab):
    return f"{vocab[rng.integers(len(vocab))]}-{vocab[rng.integers(len(vocab))]}"


def _value(kind, rng, vocab):
    return {"digits": lambda: _digits(rng), "uuid": lambda: _uuid(rng),
            "word": lambda: vocab[rng.integers(len(vocab))]}[kind]()


NOUNS = {"digits": "number", "uuid": "uuid", "word": "word"}


def _haystack_build(sentences, start, needles, depths, intro):
    """A builder m -> context: the intro, m haystack sentences from `start` (cycling), and each
    needle inserted before the sentence at round(depth * m)."""
    def build(m):
        body = [sentences[(start + i) % len(sentences)] for i in range(m)]
        for nd, dp in sorted(zip(needles, depths), key=lambda p: -p[1]):   # back to front
            body.insert(int(round(dp * m)), nd)
        return intro + " ".join(body)
    return build


def _needle_char(context: str, needle: str) -> int:
    """Where a needle's ids start: at its leading space when it has one (byte-level BPEs fold the
    space, or a newline, into the next token), else at its first character."""
    c = context.index(needle)
    return c - 1 if c > 0 and context[c - 1] in " \n" else c


def _needle_task(name, tok, n_tokens, depth, seed, *, value_kind, n_keys=1, n_values=1,
                 query_value_kind=None):
    rng = np.random.default_rng(seed)
    vocab, sents = vocabulary(), prose_sentences()
    noun = NOUNS[value_kind]
    keys = []
    while len(keys) < n_keys:                          # distinct keys
        k = _word_key(rng, vocab)
        if k not in keys:
            keys.append(k)
    values = {k: [] for k in keys}
    for k in keys:
        while len(values[k]) < (n_values if k == keys[0] else 1):
            v = _value(value_kind, rng, vocab)
            if all(v not in vs for vs in values.values()):
                values[k].append(v)
    needles = [f"One of the special magic {noun}s for {k} is: {v}." for k in keys for v in values[k]]
    target = [nd for nd in needles if f" for {keys[0]} is" in nd]
    # the queried key's needles sit at `depth` (several values spread just after it); distractors anywhere
    depths = [min(1.0, depth + 0.02 * i) for i in range(len(target))]
    depths += list(rng.random(len(needles) - len(target)))
    order = target + [nd for nd in needles if nd not in target]
    intro = (f"Some special magic {noun}s are hidden within the following text. Make sure to "
             f"memorize it. I will quiz you about the {noun}s afterwards.\n")
    many = "are all the special magic" if n_values > 1 else "is the special magic"
    question = (f"\nWhat {many} {noun}s for {keys[0]} mentioned in the provided text? The special "
                f"magic {noun}{'s' if n_values > 1 else ''} for {keys[0]} mentioned in the provided text "
                f"{'are' if n_values > 1 else 'is'}")
    start = int(rng.integers(len(sents)))
    build = _haystack_build(sents, start, order, depths, intro)
    max_new = 16 + 16 * n_values + (24 if value_kind == "uuid" else 0)
    m, context = _fit(build, tok, question, n_tokens, hi=len(sents), max_new=max_new)
    chars = [_needle_char(context, nd) for nd in target]
    ex = Example(name, context + question, context, question, list(values[keys[0]]), seed, n_tokens,
                 0, depth, chars, [], target, max_new_tokens=max_new,
                 meta={"keys": keys, "distractors": [nd for nd in needles if nd not in target],
                       "haystack_sentences": m, "haystack_start": start})
    return _locate(ex, tok)


def variable_tracking(tok, n_tokens, depth, seed, n_hops=4):
    """RULER's variable tracking: a chain VAR A = 12345, VAR B = VAR A, ... hidden in the haystack;
    the answer is every name in the chain."""
    rng = np.random.default_rng(seed)
    names = []
    while len(names) < n_hops + 1:
        nm = "".join(rng.choice(list(string.ascii_uppercase), 5))
        if nm not in names:
            names.append(nm)
    value = _digits(rng, 5)
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))]
    # the chain in order, from `depth` to the end of the context, evenly spaced
    depths = [depth + (1.0 - depth) * i / len(needles) for i in range(len(needles))]
    intro = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
    question = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
                f"Answer: According to the chain(s) of variable assignment in the text above, "
                f"{len(names)} variables are assigned the value {value}, they are:")
    sents = prose_sentences()
    start = int(rng.integers(len(sents)))
    build = _haystack_build(sents, start, needles, depths, intro)
    m, context = _fit(build, tok, question, n_tokens, hi=len(sents), max_new=40)
    chars = [_needle_char(context, nd) for nd in needles]
    ex = Example("variable_tracking", context + question, context, question, names, seed, n_tokens, 0,
                 depth, chars, [], needles, max_new_tokens=40,
                 meta={"value": value, "haystack_sentences": m, "haystack_start": start})
    return _locate(ex, tok)


def common_words(tok, n_tokens, depth, seed, n_common=10):
    """RULER's common-words extraction: a numbered list where `n_common` words appear many times
    and the others rarely; the answer is the common words. No needle (depth is ignored)."""
    rng = np.random.default_rng(seed)
    vocab = vocabulary()
    pool = [vocab[i] for i in rng.permutation(len(vocab))]
    common, rare = pool[:n_common], pool[n_common:]
    # RULER's frequencies (30 vs 3) need thousands of tokens; shorter lists keep a gap of 3x or more
    f_common, f_rare = (30, 3) if n_tokens >= 4096 else (10, 1) if n_tokens >= 1024 else (3, 1)
    intro = ("Below is a numbered list of words. In these words, some appear more often than others. "
             "Memorize the ones that appear most often.\n")
    question = (f"\nQuestion: What are the {n_common} most common words in the above list? Answer: The top "
                f"{n_common} words that appear most often in the list are:")

    def build(m):
        words = common * f_common + [w for w in rare[:m] for _ in range(f_rare)]
        perm = np.random.default_rng([seed, 2, m]).permutation(len(words))
        return intro + " ".join(f"{i + 1}. {words[j]}" for i, j in enumerate(perm))
    m, context = _fit(build, tok, question, n_tokens, hi=len(rare), max_new=60)
    ex = Example("common_words", context + question, context, question, common, seed, n_tokens, 0, None,
                 max_new_tokens=60, meta={"freq_common": f_common, "freq_rare": f_rare, "n_rare": m})
    return _locate(ex, tok)


def qa_stdlib(tok, n_tokens, depth, seed):
    """Question answering over real code: functions from the standard library's source, one of
    them the gold function at `depth`; the question quotes its docstring's first line and asks
    its name (the docstring line appears once in the context)."""
    rng = np.random.default_rng(seed)
    funcs = stdlib_functions()
    # a function's source is at most a sixth of the length (a third for the gold one), so short
    # contexts still hold several functions and the fit lands close to n_tokens (~3.5 chars a token)
    max_chars = 3.5 * n_tokens
    while True:
        gold = funcs[int(rng.integers(len(funcs)))]
        line = _doc_line(gold[2])
        if line and len(line.split()) >= 5 and len(gold[2]) <= max_chars / 3:
            break
    others = [funcs[i] for i in rng.permutation(len(funcs)) if funcs[i] != gold and len(funcs[i][2])
              <= max_chars / 6 and line not in funcs[i][2] and funcs[i][1] != gold[1]]
    unit = lambda f: f"# {f[0]}\n{f[2]}"   # noqa: E731
    intro = "Answer the question based on the Python source code below.\n\n"
    question = (f"\nQuestion: Which function above has a docstring that begins \"{line}\"? "
                f"Answer: The function is named")

    def build(m):
        body = [unit(f) for f in others[:m]]
        body.insert(int(round(depth * m)), unit(gold))
        return intro + "\n".join(body)
    m, context = _fit(build, tok, question, n_tokens, hi=len(others), max_new=16)
    ex = Example("qa_stdlib", context + question, context, question, [gold[1]], seed, n_tokens, 0, depth,
                 [_needle_char(context, unit(gold))], [], [unit(gold)], max_new_tokens=16,
                 meta={"module": gold[0], "docstring_line": line, "n_functions": m + 1})
    return _locate(ex, tok)


def _doc_line(src: str) -> str | None:
    m = re.search(r'^def [^\n]*:\n\s+(?:[rbu]?)("""|\'\'\')\s*([^\n]*)', src)
    if not m:
        return None
    line = m.group(2).replace('"""', "").replace("'''", "").strip()
    return line if line else None


def passkey(tok, n_tokens, depth, seed):
    """needle.py's pass-key example (Mohtashami & Jaggi) as an Example: exactly n_tokens long with
    the answer, so the prompt fed is n_tokens minus the key's tokens. As in needle.py, exactly the
    key's tokens are decoded: the pass-key model was trained to write the key, not to stop after it."""
    kit = _kit(tok)
    ex = make_passkey_example(kit, n_tokens, depth, seed)
    q_start = ex["answer_start"] - len(kit["question"])
    body = ex["tokens"][1:q_start]                         # BOS is added back by the tokenizer
    context = tok.decode([int(t) for t in body])
    question = PASSKEY_QUESTION
    n_needle = (len(kit["needle_pre"]) + 2 * len(ex["answer"]) + len(kit["needle_mid"])
                + len(kit["needle_post"]))   # "The pass key is K. Remember it. K is the pass key."
    needle_ids = ex["tokens"][ex["needle_start"]:ex["needle_start"] + n_needle]
    needle_text = tok.decode([int(t) for t in needle_ids]).strip()
    char = len(tok.decode([int(t) for t in ex["tokens"][1:ex["needle_start"]]]))
    out = Example("passkey", context + question, context, question, [str(ex["key"])], seed, n_tokens, 0,
                  depth, [char], [], [needle_text], max_new_tokens=len(ex["answer"]),
                  meta={"source": "minisparse.lab.needle.make_passkey_example"})
    return _locate(out, tok)


_KITS: dict[int, tuple] = {}   # id -> (tokenizer, kit): holding the tokenizer keeps its id unique


def _kit(tok):
    if id(tok) not in _KITS:
        _KITS[id(tok)] = (tok, build_kit(tok))
    return _KITS[id(tok)][1]


TASKS = {
    "niah_single_digits": lambda tok, n, d, s: _needle_task("niah_single_digits", tok, n, d, s, value_kind="digits"),
    "niah_single_uuid": lambda tok, n, d, s: _needle_task("niah_single_uuid", tok, n, d, s, value_kind="uuid"),
    "niah_single_word": lambda tok, n, d, s: _needle_task("niah_single_word", tok, n, d, s, value_kind="word"),
    "niah_multikey": lambda tok, n, d, s: _needle_task("niah_multikey", tok, n, d, s, value_kind="digits", n_keys=4),
    "niah_multivalue": lambda tok, n, d, s: _needle_task("niah_multivalue", tok, n, d, s, value_kind="digits",
                                                         n_values=4),
    "variable_tracking": variable_tracking,
    "common_words": common_words,
    "qa_stdlib": qa_stdlib,
    "passkey": passkey,
}


def make_example(task: str, tokenizer, n_tokens: int, depth: float, seed: int) -> Example:
    """One example of `task` (a TASKS name) in at most n_tokens of `tokenizer`'s tokens with its
    answer budget (as RULER counts: prompt + max_new_tokens <= n_tokens, so a model's whole
    context can be asked for), the needle at `depth` in [0, 1]; the same arguments give the same
    example."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    return TASKS[task](tokenizer, int(n_tokens), float(depth), int(seed))


def make_task_set(tasks, tokenizer, n_tokens: int, depths, n: int, seed: int = 0) -> list[Example]:
    """n examples per task, the depths taken in turn, seeds seed, seed+1, ... (recorded)."""
    out = []
    for task in tasks:
        for i in range(n):
            out.append(make_example(task, tokenizer, n_tokens, float(depths[i % len(depths)]), seed + i))
    return out
