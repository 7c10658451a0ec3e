"""Numerics under stress: extreme activations stay finite; NaN weights are reported when asked."""
import numpy as np
import pytest

from minisparse.cli import main
from minisparse.gguf_io import load_gguf
from minisparse.model import Model, glu, rms_norm, silu

from gguf_factory import tiny_weights, write_model


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e20, 1e36])
def test_rms_norm_is_finite_and_unit_rms_at_any_scale(scale):
    x = (np.random.default_rng(0).standard_normal((3, 64)) * scale).astype(np.float32)
    y = rms_norm(x, np.ones(64, np.float32), 1e-5)
    assert np.all(np.isfinite(y))
    if scale >= 1.0:   # eps is negligible against the mean square: rms(y) = 1 to float32 rounding
        assert np.allclose(np.sqrt(np.mean(y.astype(np.float64) ** 2, axis=-1)), 1.0, rtol=1e-5)


def test_glu_in_place_gives_the_bits_of_silu_times_u_at_every_magnitude():
    # glu runs silu's operations in place (negate, exp, + 1, divide, times u): the same float32
    # operations in the same order, so the same bits, including the saturated ends: exp(-g)
    # overflows to inf for g < -88.7 (silu -> -0) and underflows to 0 for g > 103 (silu -> g)
    r = np.random.default_rng(0)
    g = (r.standard_normal((7, 300)) * np.float32(30)).astype(np.float32)
    g[0, :4] = [-1e30, 1e30, 0.0, -0.0]
    u = r.standard_normal((7, 300)).astype(np.float32)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(glu(g, u), silu(g) * u)
    out = np.empty_like(g)
    assert glu(g, u, out=out) is out


def test_extreme_embeddings_do_not_produce_nan(tmp_path):
    ws = tiny_weights(seed=5)
    ws["token_embd.weight"][7] *= 1e30         # one token's embedding near float32's range
    ws["token_embd.weight"][9] *= -1e30
    cfg, w, _ = load_gguf(write_model(tmp_path / "x.gguf", ws))
    logits = Model(cfg, w).forward([1, 7, 9, 7, 3])
    assert np.all(np.isfinite(logits))


def test_info_check_names_the_tensor_holding_nan(tmp_path, capsys):
    ws = tiny_weights(seed=6)
    ws["blk.1.ffn_up.weight"][3, 4] = np.nan
    path = write_model(tmp_path / "nan.gguf", ws)
    assert main(["info", str(path)]) == 0                # without --check it loads and describes
    capsys.readouterr()
    assert main(["info", str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert "blk.1.ffn_up" in err and "nan.gguf" in err and err.count("\n") == 1
