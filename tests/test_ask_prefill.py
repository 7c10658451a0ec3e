"""`ask --attention SPEC` prefills the document dense by default, so one saved cache serves every
attention spec (the top-k attention paper's protocol); `--prefill sparse` runs the selector in the
prefill too, under its own cache key."""
import json

import pytest

from minisparse.cli import main


@pytest.fixture
def doc(tmp_path):
    d = tmp_path / "doc.txt"
    d.write_text("def add(a, b):\n    return a + b\n\ndef mul(a, b):\n    return a * b\n")
    return d


def _ask(doc, *extra):
    return ["ask", "-m", "default", "--context", str(doc), "-p", "What does add do?", "-n", "3",
            "--temp", "0", *extra]


def _headers(kv):
    return sorted((json.loads((f / "header.json").read_text())["extra"] for f in kv.iterdir()),
                  key=lambda e: e["attention"])


def test_dense_prefill_cache_serves_every_attention_spec(kv, doc, capsys):
    assert main(_ask(doc)) == 0                                   # dense ask saves the cache
    assert "prefill [" in capsys.readouterr().err
    for spec in ("topk=4", "sinks=2,window=8"):
        assert main(_ask(doc, "--attention", spec)) == 0
        err = capsys.readouterr().err
        assert "no prefill" in err and "prefill [" not in err, spec
    (h,) = _headers(kv)                                           # one cache, keyed dense
    assert h["attention"] == "dense" and h["dense_layers"] == []


def test_sparse_prefill_runs_the_selector_under_its_own_key(kv, doc, capsys):
    assert main(_ask(doc, "--attention", "topk=4")) == 0          # dense prefill, saved
    capsys.readouterr()
    assert main(_ask(doc, "--attention", "topk=4", "--prefill", "sparse",
                     "--dense-layers", "0")) == 0
    err = capsys.readouterr().err
    assert "prefill [" in err and "no prefill" not in err
    dense, sparse = _headers(kv)
    assert dense["attention"] == "dense"
    assert sparse["attention"] == "topk=4" and sparse["dense_layers"] == [0]
    assert main(_ask(doc, "--attention", "topk=4", "--prefill", "sparse",
                     "--dense-layers", "0")) == 0                 # now saved: no prefill
    assert "no prefill" in capsys.readouterr().err


def test_sparse_prefill_without_attention_is_refused(kv, doc, capsys):
    rc = main(_ask(doc, "--prefill", "sparse"))
    err = capsys.readouterr().err
    assert rc == 2 and "--prefill sparse" in err and "--attention" in err and err.count("\n") == 1
    assert not kv.exists() or not any(kv.iterdir())


def test_prepare_refuses_an_unknown_prefill_mode():
    import minisparse
    from minisparse.ask import prepare
    from minisparse.errors import MinisparseError
    model = minisparse.load_model("default")
    with pytest.raises(MinisparseError, match="--prefill"):
        prepare(model, model.path, "text", "q", prefill="half")
