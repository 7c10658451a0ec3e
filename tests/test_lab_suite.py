"""The long-context harness: variants parsed, smoke check, rows with every field on the embedded
model under both protocols, dense as the baseline, uninformative cells marked."""
from pathlib import Path

import numpy as np
import pytest

import minisparse
from minisparse.lab.stats import wilson
from minisparse.lab.suite import (PROTOCOLS, Variant, found, markdown_table, parse_variant,
                                  perplexity_rows, run_suite, smoke_check, summarize)
from minisparse.lab.tasks import long_texts, make_task_set

MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.fixture(scope="module")
def model():
    return minisparse.load_model(MODELS / "minisparse-pydoc.gguf")


def test_parse_variant_reads_modifiers_and_names_bad_ones():
    v = parse_variant("topk=16@dl=0,1@prefill=sparse@cache=streaming=4+60")
    assert v == Variant("topk=16@dl=0,1@prefill=sparse@cache=streaming=4+60", "topk=16",
                        "streaming=4+60", (0, 1), True)
    assert parse_variant("dense").attention is None
    assert parse_variant("topk=8", dense_layers=(2,)).dense_layers == (2,)
    with pytest.raises(ValueError, match="unknown modifier 'foo'"):
        parse_variant("topk=8@foo=1")
    with pytest.raises(ValueError, match="prefill= takes"):
        parse_variant("topk=8@prefill=half")
    with pytest.raises(ValueError):
        parse_variant("nosuchselector=3")
    assert parse_variant("magicpig=K8L75@dl=0,1@uncorrected").uncorrected
    with pytest.raises(ValueError, match="dense has none"):
        parse_variant("dense@uncorrected")


def test_smoke_check_flags_degenerate_output():
    assert smoke_check("") == ["empty"] and smoke_check("   ") == ["empty"]
    assert smoke_check("\n\n\n") == ["newline-only"]
    assert smoke_check(" is is is is") == ["loop"]
    assert smoke_check("a b c a b c a b c a b c") == ["loop"]
    assert smoke_check("=" * 30) == ["loop"]
    for ok in (" 4839201.", " cf02df34-d64d-46a8-10dc-d8d57c1417f2", " 1000000 is the number", "\nMNTYA, DVYGI"):
        assert smoke_check(ok) == [], ok


def test_found_matches_whole_words_only():
    assert found("fall", "Fall, then rise") and not found("fall", "fallback")
    assert found("4839201", "is 4839201.") and not found("483920", "is 4839201.")


def test_suite_rows_have_every_field_on_the_embedded_model(model):
    exs = make_task_set(["niah_single_digits"], model.tokenizer, 256, [0.25, 0.75], n=2, seed=0)
    out = run_suite(model, exs, ["topk=16", "dense@cache=streaming=4+60"], PROTOCOLS)
    recs, rows = out["records"], out["rows"]
    assert len(recs) == 2 * 3 * 2                       # examples x (dense added + 2) x protocols
    assert {r["variant"] for r in recs} == {"dense", "topk=16", "dense@cache=streaming=4+60"}
    for r in recs:
        assert r["protocol"] in PROTOCOLS and isinstance(r["output"], str) and isinstance(r["degenerate"], list)
        assert r["keys_read"] is not None and r["keys_read"] <= r["positions"] + 1e-9
        if r["variant"] == "dense":                     # dense reads every key before the query
            assert r["keys_read"] == r["keys_causal"] == r["positions"]
        if r["variant"] == "topk=16":
            assert r["keys_read"] == 16
        if r["variant"].startswith("dense@cache"):      # 4 sinks + 60 window (+ the query's own key)
            assert r["keys_causal"] <= 4 + 60 + 1
    assert len(rows) == 3 * 2
    fields = {"task", "length", "protocol", "variant", "n", "k", "acc", "lo", "hi", "seeds", "depths",
              "keys_read", "keys_causal", "positions", "density", "degenerate", "degenerate_kinds",
              "dense_acc", "dense_n", "uninformative", "vs_dense", "dense_layers", "cache", "attention"}
    for row in rows:
        assert fields <= set(row)
        assert row["n"] == 2 and row["seeds"] == [0, 1] and (row["lo"], row["hi"]) == wilson(row["k"], 2)
        assert row["uninformative"] == (row["dense_acc"] < 0.5)
    table = markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and "query-agnostic" in table
    # one pooled row per (protocol, variant) where dense is informative on the one task
    informative = {r["protocol"] for r in rows if r["variant"] == "dense" and not r["uninformative"]}
    assert sorted((r["protocol"], r["variant"]) for r in out["pooled"]) == sorted(
        (p, v) for p in informative for v in ("dense", "topk=16", "dense@cache=streaming=4+60"))


def _rec(variant, correct, seed, output="x", attention="a", task="t"):
    return {"task": task, "target_tokens": 256, "protocol": "query-aware", "variant": variant,
            "attention": None if variant == "dense" else attention, "cache": None, "dense_layers": [],
            "seed": seed, "depth": 0.5, "correct": correct, "score": float(correct), "n_tokens": 250,
            "degenerate": smoke_check(output), "keys_read": 10.0, "keys_causal": 100.0,
            "positions": 100.0, "density": 0.1}


def test_summary_marks_uninformative_cells_and_counts_degenerate_output():
    recs = [_rec("dense", s < 1, s) for s in range(4)]                   # dense 1/4 < 50%
    recs += [_rec("topk=8", False, s, output="\n\n") for s in range(4)]
    rows = {r["variant"]: r for r in summarize(recs)}
    assert rows["dense"]["uninformative"] and rows["topk=8"]["uninformative"]
    assert rows["topk=8"]["degenerate"] == 4 and rows["topk=8"]["degenerate_kinds"] == {"newline-only": 4}
    assert rows["topk=8"]["vs_dense"]["ratio"] == 0.0
    table = markdown_table(list(rows.values()))
    assert "uninformative (dense < 50%)" in table and "newline-only 4" in table


def test_perplexity_rows_give_a_ratio_with_an_interval(model):
    texts = {"code": long_texts()["code:xmlrpc.client"]}
    (row,) = perplexity_rows(model, texts, ["sinks=4,window=32"], n_tokens=256)
    assert row["n"] == 255 and row["lo"] <= row["ratio"] <= row["hi"]
    # the same variant as dense reads the same keys: a ratio of exactly 1 (same code path)
    (same,) = perplexity_rows(model, texts, ["dense"], n_tokens=256)
    assert same["ratio"] == 1.0


def test_last_token_perplexity_of_dense_is_one_and_rows_name_protocol_and_keys(model):
    texts = {"code": long_texts()["code:xmlrpc.client"]}
    rows = {r["variant"]: r for r in perplexity_rows(
        model, texts, ["dense", "sinks=4,window=32", "dense@cache=streaming=4+28",
                       "sinks=4,window=32@prefill=sparse"],
        n_tokens=256, last=64)}
    d = rows["dense"]
    # dense through the same shared prefix and the same scoring calls as the baseline: exactly 1
    assert d["ratio"] == 1.0 and d["n"] == 64 and d["protocol"] == "last-tokens" and d["last"] == 64
    assert d["keys_read"] == d["positions"]                         # dense reads every key before the query
    assert 192 < d["positions"] <= 256                              # the scored queries sit at 192..255
    for name in ("sinks=4,window=32", "sinks=4,window=32@prefill=sparse"):
        assert rows[name]["keys_read"] <= 4 + 32 + 1 and rows[name]["lo"] <= rows[name]["ratio"] <= rows[name]["hi"]
    assert rows["dense@cache=streaming=4+28"]["keys_causal"] <= 4 + 28 + 64     # the cache bounds what is kept
    (whole,) = perplexity_rows(model, texts, ["dense"], n_tokens=256)
    assert whole["protocol"] == "whole-text" and whole["last"] is None and whole["n"] == 255


def test_uncorrected_magicpig_reads_the_same_keys_with_another_nll(model):
    from minisparse.lab.runner import Uncorrected
    from minisparse.lab.suite import _selector, last_nll
    from minisparse.lab.tasks import context_ids
    # every layer but the last kept dense: the last sees the same queries and keys in both runs
    dl = ",".join(str(l) for l in range(model.config.n_layers - 1))
    spec = f"magicpig=K3L10,seed=1@dl={dl}"
    assert isinstance(_selector(parse_variant(spec + "@uncorrected")), Uncorrected)
    ids = context_ids(model.tokenizer, long_texts()["code:xmlrpc.client"])[:256]
    st_c, st_u = [], []
    corrected = last_nll(model, ids, parse_variant(spec), 64, stats=st_c)
    uncorrected = last_nll(model, ids, parse_variant(spec + "@uncorrected"), 64, stats=st_u)
    # the same seeded sample of keys in every row: only the weights differ
    for a, b in zip(st_c, st_u, strict=True):
        np.testing.assert_array_equal(a["n_attended"], b["n_attended"])
    last = [r for r in st_c if r["layer"] == model.config.n_layers - 1]
    assert last and all(r["n_attended"].mean() < r["n_causal"].mean() for r in last)    # a sample, not all
    assert not np.array_equal(corrected, uncorrected)


def test_a_shared_dense_prefix_gives_the_nll_of_a_prefix_prefilled_per_variant(model, monkeypatch):
    from minisparse.lab import suite
    texts = {"code": long_texts()["code:xmlrpc.client"]}
    variants = ["topk=16", "sinks=2,window=16@dl=0", "topk=16@prefill=sparse", "dense@cache=streaming=4+60"]
    alone = perplexity_rows(model, texts, variants, n_tokens=256, last=64, share_prefill=False)
    prefills = []
    real = suite.prefix_prefill
    monkeypatch.setattr(suite, "prefix_prefill", lambda *a, **kw: prefills.append(a[2]) or real(*a, **kw))
    shared = perplexity_rows(model, texts, variants, n_tokens=256, last=64, share_prefill=True)
    # the copied cache holds the very numbers a per-variant dense prefill writes: equal rows
    assert shared == alone
    # one dense prefix for dense and the two variants that prefill dense; the others their own
    assert prefills.count(None) == 1 and len(prefills) == 3


def test_last_token_nll_equals_the_whole_text_nll_of_those_tokens(model):
    from minisparse.lab.suite import last_nll, token_nll
    from minisparse.lab.tasks import context_ids
    ids = context_ids(model.tokenizer, long_texts()["code:xmlrpc.client"])[:256]
    whole = token_nll(model, ids, Variant("dense"))[-64:]            # one 255-token forward
    last = last_nll(model, ids, Variant("dense"), 64, chunk=40)      # a 191-token prefill, then 40 + 24
    logits = model.forward(ids[:-1])                                 # (255, V)
    # Both do the same float32 operations; only matmul shapes (chunks) differ, so sums run in
    # another order: per dot product of length n <= F ~ sqrt(n) u relative (u = 2^-24), L layers
    # x 7 matmuls adding independent errors: each logit moves by <= e = sqrt(7 L) sqrt(F) u
    # max|logit| (tests/test_models.py cache_tol). nll = lse - logit[target] and lse moves by
    # <= e too, so the nll by <= 2e. A wrong prefix (a token off, a stale key) moves it by O(1).
    cfg = model.config
    e = np.sqrt(7 * cfg.n_layers) * np.sqrt(cfg.ffn_dim) * 2.0**-24 * np.abs(logits).max()
    np.testing.assert_allclose(last, whole, rtol=0, atol=2 * e)
    with pytest.raises(ValueError, match="last=256"):
        last_nll(model, ids, Variant("dense"), 256)


def test_pooled_rows_pool_the_informative_tasks_with_counts_known_by_construction():
    from minisparse.lab.suite import POOLED, pooled_rows
    dense = {"A": [1, 1, 1, 1], "B": [1, 1, 1, 0], "C": [1, 0, 0, 0]}     # C: dense 1/4 < 50%
    topk = {"A": [1, 1, 0, 0], "B": [1, 1, 1, 0], "C": [1, 1, 1, 1]}
    recs = [_rec(v, bool(c), s, task=t) for v, table in (("dense", dense), ("topk=8", topk))
            for t, cs in table.items() for s, c in enumerate(cs)]       # the same seeds in every task
    rows = {r["variant"]: r for r in pooled_rows(recs)}
    t, d = rows["topk=8"], rows["dense"]
    assert t["task"] == d["task"] == POOLED and t["tasks"] == ["A", "B"]
    assert (t["n"], t["k"]) == (8, 5) and (t["lo"], t["hi"]) == wilson(5, 8)
    assert (d["n"], d["k"]) == (8, 7) and t["dense_acc"] == 7 / 8 and t["uninformative"] is False
    # pairs are matched by (task, seed, depth): matched by seed alone, B's dense answers would
    # overwrite A's and the ratio would be 5/6
    assert t["vs_dense"]["ratio"] == pytest.approx(5 / 7) and t["vs_dense"]["n"] == 8
    assert d["vs_dense"]["ratio"] == d["vs_dense"]["lo"] == d["vs_dense"]["hi"] == 1.0
    table = markdown_table(list(rows.values()))
    assert "pooled: A, B" in table and "| all tasks |" in table
    # no informative task, no pooled row
    assert pooled_rows([r for r in recs if r["task"] == "C"]) == []


class _CharTok:
    """Characters as ids (BOS = 0), enough for the harness."""
    bos_id, eot_ids = 0, (0,)

    def encode(self, text, add_bos=None):
        return ([0] if add_bos is not False else []) + [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i)


class _ScriptedModel:
    """Records each forward call (tokens, attention) and answers with a scripted continuation."""

    def __init__(self, script):
        self.tokenizer, self.calls, self.script = _CharTok(), [], [ord(c) for c in script]
        self.config = type("C", (), {"context_length": 1000, "n_layers": 1})()

    def new_cache(self):
        return []

    def forward(self, tokens, cache, attention=None, dense_layers=(), stats=None, last_only=False):
        import numpy as np
        self.calls.append((list(tokens), attention))
        cache.extend(tokens)
        if stats is not None:
            stats.append({"layer": 0, "q_pos": np.array([len(cache) - 1]), "n_attended": np.full((1, 1), 3),
                          "n_causal": np.full((1, 1), len(cache))})
        n_gen = len(cache) - 6              # answer tokens fed so far (the toy prompt has 6 ids)
        logits = np.zeros((1, 256))
        logits[0, self.script[min(max(n_gen, 0), len(self.script) - 1)]] = 1.0
        return logits


def _toy_example(question="?Q"):
    from minisparse.lab.tasks import Example
    return Example("toy", "ctx" + question, "ctx", question, ["42"], 0, 10, 7, 0.5, max_new_tokens=8)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_protocols_feed_the_question_before_or_after_the_keys_are_chosen(protocol, monkeypatch):
    import minisparse.lab.suite as suite
    monkeypatch.setattr(suite, "parse_attention_spec", lambda spec: f"SEL<{spec}>")
    m = _ScriptedModel(" 42\nnever")
    r = suite.run_example(m, _toy_example(), Variant("topk=1", "topk=1"), protocol)
    ctx, q = [0, ord("c"), ord("t"), ord("x")], [ord("?"), ord("Q")]
    if protocol == "query-aware":       # context + question prefilled dense in one call
        assert m.calls[0] == ((ctx + q)[:-1], None) and m.calls[1] == ([q[-1]], "SEL<topk=1>")
        answer_calls = m.calls[2:]
    else:                               # the context alone, then the question one token at a time
        assert m.calls[0] == (ctx[:-1], None)
        assert m.calls[1:4] == [([ctx[-1]], "SEL<topk=1>"), ([q[0]], "SEL<topk=1>"), ([q[1]], "SEL<topk=1>")]
        answer_calls = m.calls[4:]
    # greedy answer " 42" then a newline: decoding stops there, after visible text
    assert [c[0] for c in answer_calls] == [[ord(" ")], [ord("4")], [ord("2")]]
    assert r["output"] == " 42\n" and r["correct"] and r["degenerate"] == []
    assert r["keys_read"] == 3 and r["protocol"] == protocol


def test_leading_whitespace_does_not_stop_decoding(monkeypatch):
    import minisparse.lab.suite as suite
    monkeypatch.setattr(suite, "parse_attention_spec", lambda spec: spec)
    r = suite.run_example(_ScriptedModel(" \n\n42\n"), _toy_example(), Variant("x", "x"), "query-aware")
    assert r["output"] == " \n\n42\n" and r["correct"]
    r = suite.run_example(_ScriptedModel("\n"), _toy_example(), Variant("x", "x"), "query-aware")
    assert r["output"] == "\n" * 8 and r["degenerate"] == ["newline-only"] and not r["correct"]


def test_sharing_the_dense_prefill_gives_the_same_records(model, monkeypatch):
    # the variants that prefill dense into the full cache start from one copied prefill per
    # example and protocol; a sparse prefill and a bounded cache still prefill their own
    from minisparse.lab import suite
    exs = make_task_set(["niah_single_digits"], model.tokenizer, 256, [0.25, 0.75], n=1, seed=0)
    variants = ["topk=16", "sinks=2,window=16@dl=0", "ivf=4/p2/c8,seed=1", "topk=16@prefill=sparse",
                "dense@cache=streaming=4+60"]
    alone = run_suite(model, exs, variants, PROTOCOLS, share_prefill=False)["records"]
    prefills = []
    real = suite.dense_prefill
    monkeypatch.setattr(suite, "dense_prefill", lambda *a, **kw: prefills.append(1) or real(*a, **kw))
    shared = run_suite(model, exs, variants, PROTOCOLS, share_prefill=True)["records"]
    assert shared == alone                                # every field, outputs and keys read
    assert len(prefills) == len(exs) * len(PROTOCOLS)     # one dense prefill per example, protocol


def test_shares_dense_prefill_only_for_a_dense_prefill_into_the_full_cache():
    from minisparse.lab.suite import shares_dense_prefill
    assert shares_dense_prefill(parse_variant("dense"))
    assert shares_dense_prefill(parse_variant("topk=16@dl=0"))
    assert not shares_dense_prefill(parse_variant("topk=16@prefill=sparse"))
    assert not shares_dense_prefill(parse_variant("dense@cache=streaming=4+60"))


def _script(name):
    import importlib.util
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_suite_script_writes_last_token_perplexity_json_and_plot(tmp_path):
    import json
    bench = _script("long_context_suite")
    out, png = tmp_path / "ppl.json", tmp_path / "ppl.png"
    bench.main(["--model", str(MODELS / "minisparse-pydoc.gguf"), "--perplexity", "--length", "256",
                "--ppl-last", "64", "--variants", "dense;topk=16", "--out", str(out), "--plot", str(png)])
    rows = json.loads(out.read_text())["rows"]
    assert {r["variant"] for r in rows} == {"dense", "topk=16"} and {r["protocol"] for r in rows} == {"last-tokens"}
    assert all(r["n"] == 64 for r in rows) and png.stat().st_size > 1000
    with pytest.raises(SystemExit, match="--ppl-last"):
        bench.main(["--model", str(MODELS / "minisparse-pydoc.gguf"), "--perplexity", "--length", "256",
                    "--ppl-last", "256", "--variants", "topk=16", "--out", str(out)])


def test_plot_script_summarises_records_anew_and_draws(tmp_path, capsys):
    # a task JSON without pooled rows (written before they existed) gets them from its records
    import json
    bench = _script("long_context_suite")
    out, png = tmp_path / "t.json", tmp_path / "t.png"
    bench.main(["--model", "passkey", "--tasks", "passkey", "--length", "256", "--protocol", "query-aware",
                "--variants", "dense;topk=8", "--n", "2", "--out", str(out)])
    d = json.loads(out.read_text())
    d.pop("pooled")
    out.write_text(json.dumps(d))
    capsys.readouterr()
    _script("long_context_plot").main([str(out), "--png", str(png)])
    table = capsys.readouterr().out
    assert "| all tasks |" in table and "`topk=8`" in table and png.stat().st_size > 1000
    _script("long_context_plot").main([str(out), "--matrix"])
    rows = {l.split(" | ")[0]: l for l in capsys.readouterr().out.splitlines() if l.startswith("| `")}
    right = {r["variant"]: sum(x["correct"] for x in d["records"] if x["variant"] == r["variant"])
             for r in d["rows"]}
    for v, k in right.items():                    # each variant's right answers out of its 2
        assert f" {k}/2 " in rows[f"| `{v}`"]
    both = sum(x["correct"] and any(y["variant"] == "dense" and y["correct"] and y["seed"] == x["seed"]
                                    for y in d["records"]) for x in d["records"] if x["variant"] == "topk=8")
    assert rows["| `dense`"].endswith(f" {right['dense']}/{right['dense']} |")   # dense keeps all its own
    assert rows["| `topk=8`"].endswith(f" {both}/{right['dense']} |")
    with pytest.raises(SystemExit):                    # a title without a plot is refused
        _script("long_context_plot").main([str(out), "--title", "t"])
    assert "--png" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="expected 'records'"):
        (tmp_path / "bad.json").write_text("{}")
        _script("long_context_plot").main([str(tmp_path / "bad.json")])


# ----------------------------------------------------------------------------- the claims script


def _claims_records(length=4096, protocol="query-aware", n=20, layers=4):
    """Made-up suite records whose verdicts are known by construction: task A where dense is
    always right, task B where it never is (uninformative, left out of every claim)."""
    from minisparse.lab.suite import parse_variant
    right = {                            # variant: (examples of A answered right, sparse keys read)
        "dense": (range(n), None),
        "topk=82": (range(n), 82),                      # 100% of dense at 2%: holds
        "topk=41": (range(n // 2), 41),                 # 50% of dense at 1%: does not hold
        "topk=256": (range(n), 256),
        "quest=16/256": (range(n - 1), 256),            # 95% of dense: the interval straddles 0.95
        "quest=16/256@dl=0,1": (range(n), 256),
        "magicpig=K8L75": (range(8), 250),              # 8/20 against Quest's 19/20: does not hold
        "magicpig=K8L75@uncorrected": (range(2), 250),  # a subset of the corrected right answers
        "sinks=4,window=252": (range(n // 2), 257),
        "window=256": ((), 257),                        # never right: sinks beat it
        "random=1%x70": (range(n), 0.5 * length),        # as good as dense, not better
        "dense@cache=streaming=4+252": (range(3), 256),
    }
    recs = []
    for name, (ok, keys) in right.items():
        v = parse_variant(name)
        for task in ("A", "B"):
            for s in range(n):
                pos = length - 10.0
                per = [1.0 if (keys is None or l in v.dense_layers) else keys / pos for l in range(layers)]
                recs.append({"task": task, "target_tokens": length, "protocol": protocol, "variant": name,
                             "attention": v.attention, "cache": v.cache, "dense_layers": list(v.dense_layers),
                             "uncorrected": v.uncorrected, "sparse_prefill": False, "seed": s, "depth": 0.5,
                             "correct": task == "A" and s in ok, "score": 0.0, "n_tokens": length - 10,
                             "degenerate": [], "keys_read": sum(per) / layers * pos, "keys_causal": pos,
                             "positions": pos, "density": sum(per) / layers, "layer_density": per})
    return recs


def _ppl_row(variant, ratio, lo, hi, keys):
    from dataclasses import asdict
    from minisparse.lab.suite import parse_variant
    return {"text": "code:argparse", "length": 8192, "variant": variant, **asdict(parse_variant(variant)),
            "ratio": ratio, "lo": lo, "hi": hi, "ppl_sparse": 0.0, "ppl_dense": 0.0, "n": 512,
            "protocol": "last-tokens", "last": 512, "keys_read": keys, "positions": 8000.0,
            "density": keys / 8000, "layer_density": [keys / 8000] * 4}


def test_claims_script_keeps_two_models_cells_apart(tmp_path):
    # the same length and protocol on two models are two cells: model A's dense right on every
    # example must not pool with model B's records where top-k is right on half
    import json
    claims = _script("long_context_claims")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    recs = _claims_records()
    a.write_text(json.dumps({"model": "models/alpha.gguf", "records": recs}))
    b.write_text(json.dumps({"model": "models/beta.gguf", "records": recs}))
    lines = claims.main([str(a), str(b)])
    topk = [l for l in lines if l["claim"] == "topk2" and "`topk=82`" in l["figures"]]
    assert sorted(l["where"].split(",")[0] for l in topk) == ["alpha", "beta"]
    assert all("(n=20)" in l["figures"] for l in topk)     # not 40: nothing pooled across models


def test_claims_script_gives_the_verdicts_known_by_construction(tmp_path):
    import json
    claims = _script("long_context_claims")
    tasks, ppl = tmp_path / "tasks.json", tmp_path / "ppl.json"
    tasks.write_text(json.dumps({"records": _claims_records(), "rows": []}))
    ppl.write_text(json.dumps({"rows": [
        _ppl_row("dense", 1.0, 1.0, 1.0, 8000.0),
        _ppl_row("sinks=4,window=252", 1.10, 1.05, 1.15, 257.0),
        _ppl_row("window=256", 1.50, 1.40, 1.60, 257.0),                   # disjoint: sinks hold
        _ppl_row("magicpig=K8L75", 1.30, 1.20, 1.40, 250.0),
        _ppl_row("magicpig=K8L75@uncorrected", 1.35, 1.25, 1.45, 250.0),   # overlapping: undecided
    ]}))
    md = tmp_path / "claims.md"
    lines = claims.main([str(tasks), str(ppl), "--markdown", str(md), "--out", str(tmp_path / "c.json")])

    def verdict(claim, *names, where="4096"):
        hits = [l for l in lines if l["claim"] == claim and where in l["where"]
                and all(f"`{n}`" in l["figures"] for n in names)]
        assert len(hits) == 1, (claim, names, hits)
        return hits[0]["verdict"]

    assert verdict("topk2", "topk=82") == "holds"                   # 20/20: ratio 1 [1, 1]
    assert verdict("topk2", "topk=41") == "does not hold"           # 10/20: the interval is below 0.95
    assert not [l for l in lines if l["claim"] == "topk2" and "`topk=256`" in l["figures"]]   # 6% of the keys
    assert verdict("quest256", "quest=16/256") == "undecided"       # 19/20: [0.85, 1] straddles 0.95
    assert verdict("quest256", "quest=16/256@dl=0,1") == "holds"
    assert verdict("quest_topk", "quest=16/256", "topk=256") == "undecided"   # -0.05 [-0.15, 0]
    assert verdict("magicpig_quest", "magicpig=K8L75", "quest=16/256") == "does not hold"
    # 6 examples where only the corrected sampler is right, none the other way: +0.30; a resample
    # without any of them has probability (14/20)^20 < 0.001, far below 2.5%, so lo > 0
    assert verdict("correction", "magicpig=K8L75", "magicpig=K8L75@uncorrected") == "holds"
    assert verdict("sinks", "sinks=4,window=252", "window=256") == "holds"
    assert verdict("ris", "random=1%x70") == "does not hold"        # ratio 1 [1, 1]: not above dense
    assert "expected coverage 0.505" in next(l["figures"] for l in lines if l["claim"] == "ris")
    assert verdict("bounded", "topk=256", "dense@cache=streaming=4+252") == "holds"
    assert verdict("paper_layers", "quest=16/256@dl=0,1", "quest=16/256") == "undecided"   # +0.05 [0, 0.15]
    assert verdict("sinks", "sinks=4,window=252", "window=256", where="argparse") == "holds"
    assert verdict("correction", "magicpig=K8L75", "magicpig=K8L75@uncorrected", where="argparse") == "undecided"
    # task B (dense never right) is in no figure: every n is A's 20
    assert all("n=40" not in l["figures"] for l in lines)
    text = md.read_text()
    assert "python3 benchmarks/long_context_claims.py" in text and "| claim | where |" in text
    assert json.loads((tmp_path / "c.json").read_text())["claims"] == lines
