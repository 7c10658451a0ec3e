"""The architecture, checked: the import layers of pyproject.toml ([tool.importlinter]), no import
strings standing in for imports, and the contracts every selector and cache follow."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minisparse import spec as S
from minisparse.attention import Selector
from minisparse.cache import Cache

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "minisparse"


def test_import_layers_hold():
    """`lint-imports` over the contracts in pyproject.toml: nothing imports upward."""
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e .[test] brings it)")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([exe, "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "broken" in r.stdout and " 0 broken" in r.stdout


# Modules that still reach other minisparse modules through import strings, each with the
# branch that removes it. The test fails both when a new one appears and when one listed here
# is gone (then delete its line): the list only shrinks.
IMPORT_STRINGS_KNOWN: dict = {}


def names_module(text: str) -> bool:
    """True when text ("minisparse.lab.cli" or "minisparse.ask:add_parsers") names a module or
    package of minisparse that exists; a dotted name of a function or a field does not."""
    mod = text.split(":", 1)[0]
    if not mod.startswith("minisparse.") or not all(p.isidentifier() for p in mod.split(".")):
        return False
    path = ROOT.joinpath(*mod.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def import_string_users():
    """Files under minisparse/ that call importlib.import_module / __import__ and name a
    minisparse module in a string literal (the only way such a call can reach one)."""
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and (
            (isinstance(n.func, ast.Attribute) and n.func.attr == "import_module")
            or (isinstance(n.func, ast.Name) and n.func.id in ("import_module", "__import__")))]
        if not calls:
            continue
        names = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
                 and isinstance(n.value, str) and (names_module(n.value)
                                                   or n.value.startswith("."))]
        relative = any(isinstance(a, ast.Constant) and isinstance(a.value, str)
                       and a.value.startswith(".") for c in calls for a in c.args)
        if names and (relative or any(n.startswith("minisparse.") for n in names)):
            found.add(path.relative_to(ROOT).as_posix())
    return found


def test_no_import_strings_stand_in_for_imports():
    assert import_string_users() == set(IMPORT_STRINGS_KNOWN)


def test_import_string_check_sees_one(tmp_path, monkeypatch):
    """The scan is real: a module naming a minisparse module for import_module is found."""
    pkg = tmp_path / "minisparse"
    pkg.mkdir()
    (pkg / "bad.py").write_text('import importlib\nm = importlib.import_module("minisparse.model")\n')
    (pkg / "model.py").write_text("")
    (pkg / "ok.py").write_text('import importlib\nm = importlib.import_module("json")\n')
    # a dotted name that is not a module (a function's, in metadata) is no import string
    (pkg / "meta.py").write_text('import importlib\nm = importlib.import_module(x)\n'
                                 'src = "minisparse.model.forward"\n')
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert import_string_users() == {"minisparse/bad.py"}


# ---- the selector contract, over the registry ---------------------------------------------
ATTENTION = sorted(n for n, f in S.REGISTRY.items() if f.kind == "attention")


@pytest.mark.parametrize("name", ATTENTION)
def test_every_registered_selector_round_trips_its_spec(name):
    """parse_attention_spec(str(sel)) == sel, for each family's example (with its options)."""
    sel = S.parse_attention_spec(S.REGISTRY[name].example)
    assert isinstance(sel, Selector)
    again = S.parse_attention_spec(str(sel))
    assert again == sel and str(again) == str(sel) and hash(again) == hash(sel)
    assert sel.for_layer(0, None, None, None) == sel          # no state: itself (or equal)
    b = sel.budget
    assert b is None or (b.keys is None or b.keys >= 0) and (b.fraction is None or b.fraction > 0)
    assert isinstance(sel.exact_subset, bool) and isinstance(sel.deterministic, bool)


@pytest.mark.parametrize("name", ATTENTION)
def test_every_registered_selector_refuses_an_option_it_does_not_take(name):
    sel = S.parse_attention_spec(S.REGISTRY[name].example)
    for opt in S.OPTIONS:
        if opt not in sel.options:
            with pytest.raises(ValueError, match=f"'{opt}'"):
                S.parse_attention_spec(f"{str(sel).split(',')[0]},{opt}=1")


@pytest.mark.parametrize("spec", ["ivf=64,mode=sample", "topk=5,seed=2", "dense=3", "logstride=5",
                                  "ruvllm=1", "magicpig=K8L75,mode=rank", "window=4,seed=1,seed=2"])
def test_attention_spec_errors_name_the_token(spec):
    with pytest.raises(ValueError, match="attention spec"):
        S.parse_attention_spec(spec)


@pytest.mark.parametrize("spec,token", [("press=0.5/anything", "anything"),
                                        ("streaming=4+60/sideways", "sideways"),
                                        ("recursive=B64/q3", "q3"), ("dense=4", "dense=4"),
                                        ("streaming=4+60,seed=1", "seed=1"), ("lru=4", "lru")])
def test_cache_spec_errors_name_the_token(spec, token):
    with pytest.raises(ValueError, match=token):
        S.parse_cache_spec(spec, model=None)


def test_budget_of_a_union_adds_its_members():
    sel = S.parse_attention_spec("sinks=4,window=60,topk=2%")
    assert sel.budget == (64, 0.02)
    assert S.parse_attention_spec("dense").budget is None


# ---- the cache contract, over every cache spec ----------------------------------------------
@pytest.fixture(scope="module")
def model():
    import minisparse
    return minisparse.load_model(str(ROOT / "models" / "minisparse-pydoc.gguf"))


@pytest.mark.parametrize("spec", ["dense", "recursive=B24/b8", "recursive=B24/b8/acc",
                                  "streaming=2+14", "streaming=2+14/reassigned", "press=0.5",
                                  "pyramid=12/w4/beta2", "adakv=8/w4", "kivi2/g8/r8"])
def test_every_cache_follows_the_cache_contract(model, spec):
    """update returns (K, V, k_pos) with K, V holding >= S rows and k_pos ascending; len, next_pos,
    max_keys, nbytes, block and selector_state are plain attributes of every cache."""
    cache = S.parse_cache_spec(spec, model)
    assert isinstance(cache, Cache)
    cfg = model.config
    rng = np.random.default_rng(0)
    for T in (20, 1, 1, 9):
        pos = cache.next_pos + np.arange(T)
        for layer in range(cfg.n_layers):
            k = rng.standard_normal((cfg.n_kv_heads, T, cfg.head_dim)).astype(np.float32)
            q = rng.standard_normal((cfg.n_heads, T, cfg.head_dim)).astype(np.float32)
            K, V, k_pos = cache.update(layer, k, k, pos, q=q)
            S_ = len(k_pos)
            assert K.shape[1] >= S_ and V.shape[1] >= S_ and np.all(np.diff(k_pos) >= 0)
            assert k_pos[-1] == pos[-1]
        cache.advance(T)
        assert cache.max_keys is None or len(cache) <= cache.max_keys
        assert cache.nbytes() > 0
    assert cache.next_pos == 31
    assert cache.block is None or cache.block >= 1
    assert cache.selector_state is None or isinstance(cache.selector_state, dict)
    assert (cache.max_keys is None) == (spec in ("dense", "press=0.5", "recursive=B24/b8/acc",
                                                 "kivi2/g8/r8"))
    meta, arrays = cache.state()
    assert meta["kind"] == type(cache).__name__


# ---- docs/design.md's worked example: a new selector joins by one file and one line ----------
def test_design_md_worked_example_new_selector_joins_registry_and_suite(tmp_path, monkeypatch):
    """Write the file shown in docs/design.md, add the registry line shown there (through the
    public `register` hook), and check that the registry, the spec grammar and the shared
    property suite all see the new family; then run the suite's properties on it."""
    import importlib.util
    import inspect
    import re

    text = (ROOT / "docs" / "design.md").read_text()
    code = text.split("<!-- worked-example: every_nth.py -->", 1)[1]
    code = code.split("```python\n", 1)[1].split("```", 1)[0]
    pkg = tmp_path / "plugin_demo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "every_nth.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    from plugin_demo.every_nth import EveryNth

    line = re.search(r'`("everynth": Family\(.*\)),`', text).group(1)      # the doc's registry line
    ((name, family),) = eval("{" + line + "}", {"Family": S.Family, "int_value": S.int_value,
                                                "EveryNth": EveryNth}).items()
    assert name not in S.REGISTRY
    S.register(name, family)
    try:
        assert "everynth" in S.known_names()
        sel = S.parse_attention_spec("sinks=1,everynth=3")
        assert S.parse_attention_spec(str(sel)) == sel and str(sel) == "sinks=1,everynth=3"
        with pytest.raises(ValueError, match="'seed'"):
            S.parse_attention_spec("everynth=3,seed=1")
        suite = dict(S.suite_selectors())
        assert "everynth=3" in suite and suite["everynth=3"]() == EveryNth(3)

        # the shared property suite, run on the new family: every property test taking `make`
        path = ROOT / "tests" / "test_attention_properties.py"
        spec = importlib.util.spec_from_file_location("shared_suite", path)
        suite_mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(suite_mod)
        case = suite_mod.registry_case("everynth=3", suite["everynth=3"])
        for prop, name, cases in suite_mod.PROPERTIES:
            if name != "kernel_equals_reference" or not case.pseudo_keys:
                prop(case=case)
        assert len(suite_mod.PROPERTIES) >= 5
    finally:
        S.unregister("everynth")
    assert "everynth" not in S.known_names()


def test_register_refuses_a_taken_name():
    with pytest.raises(ValueError, match="already"):
        S.register("window", S.Family("attention", S.int_value("window", lambda n: None), "window=1"))
    with pytest.raises(ValueError, match="already"):
        S.register("seed", S.Family("attention", S.int_value("seed", lambda n: None), "seed=1"))
