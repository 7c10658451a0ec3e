"""One CLI: generate, chat and ask share one definition of the sampling and attention flags and
honour them (what is computed changes with each flag), and refuse what cannot work with one
line and exit code 2. Runs on the embedded model (6 layers, trained context 2048)."""
import re

import pytest

import minisparse
from minisparse.cli import build_parser, main
from minisparse.model import Model

SAMPLING = {"-n": ("max_new_tokens", "3"), "--temp": ("temperature", "0.5"), "--top-k": ("top_k", "7"),
            "--top-p": ("top_p", "0.5"), "--min-p": ("min_p", "0.25"),
            "--repeat-penalty": ("repeat_penalty", "1.5"), "--seed": ("seed", "11")}
SHARED = [*SAMPLING, "--attention", "--dense-layers"]


def _argv(command, tmp_path, *extra):
    """A short run of `command` on the embedded model."""
    if command == "ask":
        doc = tmp_path / "doc.txt"
        doc.write_text("def add(a, b):\n    return a + b\n")
        return ["ask", "-m", "default", "--context", str(doc), "-p", "What does add do?", "--no-cache", *extra]
    return [command, "-m", "default", "-p", "def add(a, b):", *extra]


def _subparser(command):
    ap = build_parser()
    sub = next(a for a in ap._actions if a.dest == "command")
    return sub.choices[command]


def _option(parser, flag):
    a = next(a for a in parser._actions if flag in a.option_strings)
    return (tuple(a.option_strings), a.default, a.type, a.help)


def test_generate_chat_and_ask_define_the_shared_flags_identically():
    parsers = {c: _subparser(c) for c in ("generate", "chat", "ask")}
    for flag in SHARED:
        assert len({_option(p, flag) for p in parsers.values()}) == 1, flag
    assert _option(parsers["generate"], "-c") == _option(parsers["chat"], "-c")


@pytest.mark.parametrize("command", ["generate", "chat", "ask"])
def test_every_sampling_flag_reaches_generate(command, tmp_path, monkeypatch, capsys):
    seen = []

    def record(self, prompt, **kw):
        seen.append(kw)
        self.last_seed = kw["seed"]
        return iter(())
    monkeypatch.setattr(Model, "generate", record)
    argv = _argv(command, tmp_path)
    for flag, (_, value) in SAMPLING.items():
        argv += [flag, value]
    assert main(argv) == 0, capsys.readouterr().err
    (kw,) = seen
    for flag, (name, value) in SAMPLING.items():
        assert kw[name] == type(kw[name])(value), flag


def _density(err):
    m = re.search(r"density \(keys read / causal keys\): ([\d.]+) overall, .*\[(.*)\]", err)
    assert m, err
    return float(m.group(1)), dict(p.split(":") for p in m.group(2).split())


@pytest.mark.parametrize("command", ["generate", "chat", "ask"])
def test_attention_and_dense_layers_change_what_is_computed(command, tmp_path, capsys):
    base = _argv(command, tmp_path, "-n", "4", "--temp", "0")
    assert main(base) == 0
    dense_out, dense_err = capsys.readouterr()
    assert "density" not in dense_err                  # dense: nothing to report
    assert main(base + ["--attention", "window=4"]) == 0
    out, err = capsys.readouterr()
    overall, per_layer = _density(err)
    # every prompt here is longer than 5 tokens, so a 4-key window reads fewer than all causal keys
    assert overall < 1 and all(float(d) < 1 for d in per_layer.values())
    assert main(base + ["--attention", "window=4", "--dense-layers", "0,2"]) == 0
    _, err = capsys.readouterr()
    _, per_layer = _density(err)
    assert per_layer["0"] == per_layer["2"] == "1.000" and float(per_layer["1"]) < 1


def test_chat_with_a_window_computes_with_it(monkeypatch, capsys):
    logits = {}
    real = Model.forward

    def spy(self, tokens, cache=None, attention=None, dense_layers=(), *a, **kw):
        out = real(self, tokens, cache, attention, dense_layers, *a, **kw)
        logits.setdefault(str(attention), out[-1].copy())
        return out
    monkeypatch.setattr(Model, "forward", spy)
    for extra in ([], ["--attention", "window=8"]):
        assert main(["chat", "-m", "default", "-p", "What is a list?", "-n", "1", "--temp", "0", *extra]) == 0
    dense, window = logits["None"], next(v for k, v in logits.items() if k != "None")
    assert abs(dense - window).max() > 1e-3          # a different attention, different logits


def test_ask_cache_key_includes_sparse_prefill_attention_dense_layers_and_chunk(tmp_path, monkeypatch,
                                                                               capsys):
    from minisparse.persist import cache_dir
    monkeypatch.setenv("MINISPARSE_CACHE", str(tmp_path / "kv"))
    base = [a for a in _argv("ask", tmp_path, "-n", "2", "--temp", "0") if a != "--no-cache"]
    sparse = ["--attention", "window=4", "--prefill", "sparse"]
    variants = ([], sparse, sparse + ["--dense-layers", "1"], ["--chunk", "8"])
    for extra in variants:
        assert main(base + extra) == 0
        assert "prefill [" in capsys.readouterr().err     # a new key: prefilled, not loaded
    assert len(list(cache_dir().iterdir())) == len(variants)
    for extra in (sparse + ["--dense-layers", "1"], ["--attention", "window=4"]):
        assert main(base + extra) == 0                     # the second: the dense prefill's key
        assert "no prefill" in capsys.readouterr().err


# ---- refused with one line, exit code 2 ------------------------------------------------------------

def _one_line_error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("minisparse: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("command", ["generate", "chat", "ask"])
def test_bogus_attention_is_refused(command, tmp_path, capsys):
    assert "bogus" in _one_line_error(capsys, _argv(command, tmp_path, "--attention", "bogus"))


@pytest.mark.parametrize("command", ["generate", "chat", "ask", "eval"])
@pytest.mark.parametrize("layers", ["99", "-1", "0,6"])
def test_dense_layers_outside_the_model_are_refused_naming_the_range(command, layers, tmp_path, capsys):
    if command == "eval":
        argv = ["eval", "-m", "default", "--variants", "window=4", "--builtin", "pydoc", "-c", "16",
                "--analysis", "4", "--out", str(tmp_path / "out"), "--dense-layers", layers]
    else:
        argv = _argv(command, tmp_path, "-n", "1", "--attention", "window=4", "--dense-layers", layers)
    err = _one_line_error(capsys, argv)
    assert "--dense-layers" in err and "0..5" in err


@pytest.mark.parametrize("command", ["generate", "chat", "ask"])
def test_dense_layers_without_attention_is_refused(command, tmp_path, capsys):
    err = _one_line_error(capsys, _argv(command, tmp_path, "--dense-layers", "1"))
    assert "--attention" in err


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_context_beyond_training_prints_the_warning_ask_prints(command, capsys):
    from minisparse.ask import beyond_context_warning
    assert main([command, "-m", "default", "-p", "def", "-n", "1", "--temp", "0", "-c", "5000"]) == 0
    err = capsys.readouterr().err
    assert "[beyond the trained context: 5000 > 2048 tokens;" in err
    assert beyond_context_warning(5000, 2048, "").startswith("[beyond the trained context: 5000 > 2048 tokens;")
    assert main([command, "-m", "default", "-p", "def", "-n", "1", "--temp", "0", "-c", "1000"]) == 0
    assert "beyond the trained context" not in capsys.readouterr().err


def test_load_model_accepts_registered_names_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = minisparse.load_model("default")
    assert model.config.n_layers == 6
    with pytest.raises(minisparse.MinisparseError, match="registered name"):
        minisparse.load_model("no-such-model")


def test_readme_loads_the_model_in_a_form_that_works_anywhere():
    from conftest import ROOT
    readme = (ROOT / "README.md").read_text()
    calls = re.findall(r"load_model\(([^)]*)\)", readme)
    assert calls and all(c.split(",")[0].strip() in ('"default"', '"smollm2"', "path") for c in calls), calls
