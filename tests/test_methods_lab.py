"""The issue-22 methods in the lab (`minisparse eval`): each spec runs as a variant on a real model,
the approximate scorers report recall@k against exact top-k, top-p reports its realised density,
and the scorer tokens run as bounded-cache variants."""
import json

import pytest

from conftest import shared_fixture

VARIANTS = ["sparq=4/16", "loki=4/16/c32", "indexer=16", "indexer=16/f32", "topp=0.9,topk=16",
            "press=0.5/tova", "press=0.5/knorm", "recursive=B32/b16/keydiff", "press=0.5/expected"]


@pytest.fixture(scope="module")
def res(tmp_path_factory):
    from minisparse.cli import main
    out = tmp_path_factory.mktemp("lab")
    rc = main(["eval", "-m", str(shared_fixture("stories260K.gguf")), "--variants", ";".join(VARIANTS),
               "--builtin", "pydoc", "-c", "128", "--analysis", "64", "--chunk", "48",
               "--out", str(out)])
    assert rc == 0
    return {r["spec"]: r for r in json.loads((out / "results.json").read_text())["text"]["variants"]}


def test_every_method_runs_as_a_lab_variant(res):
    for spec in VARIANTS:
        assert res[spec]["kind"] != "error", res[spec]["error"]
        assert 0.0 < res[spec]["recall"]["mean"] <= 1.0


def test_approximate_scorers_report_recall_at_k_against_exact_top_k(res):
    for spec in ("sparq=4/16", "loki=4/16/c32", "indexer=16"):
        r = res[spec]["topk_recall"]
        assert 0.0 < r["mean"] <= 1.0 and all("topk_recall" in l for l in res[spec]["layers"])
    assert res["indexer=16/f32"]["topk_recall"]["min"] == 1.0      # full precision: exact top-k
    assert "topk_recall" not in res["topp=0.9,topk=16"]


def test_top_p_reads_at_most_its_candidates(res):
    # 16 keys of at most 127 causal ones at the analysis rows: top-p prunes below that
    assert res["topp=0.9,topk=16"]["budget"]["keys_read_mean"] <= 16
