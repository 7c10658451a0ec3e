"""Hostile and broken GGUF files: each case of issue 10 gives a GGUFError naming the file and field.

Files are built with gguf.GGUFWriter (a tiny random llama model) and then corrupted with struct at
offsets found by searching the written bytes, so the test does not trust the parser it tests.
"""
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT, GGUFValueType as VT, GGUFWriter
from gguf.quants import quantize

from conftest import shared_fixture
from minisparse.errors import GGUFError
from minisparse.gguf_check import SUPPORTED_TYPES, check_gguf, check_model_metadata

U64_MAX = 2**64 - 1
TINY = dict(D=32, Hq=4, Hkv=2, F=64, L=2, V=24)     # d = D // Hq = 8


def write_tiny_llama(path, *, arch="llama", D=32, Hq=4, Hkv=2, F=64, L=2, V=24, n_tokens=None,
                     skip=(), shapes=None, types=None, drop_keys=(), extra=None, seed=0):
    """Write a tiny llama-style GGUF with random weights; knobs make it wrong in one chosen way.

    `shapes`/`types` override a tensor's (out, in) numpy shape / ggml type, `skip` leaves tensors
    out, `drop_keys` leaves `{arch}.<key>` out, `extra` adds tensors {name: (array, raw_dtype)}.
    blk.0.attn_q is Q8_0 by default so a quantised tensor is always in the file.
    """
    rng = np.random.default_rng(seed)
    d = D // Hq
    shapes = {"token_embd.weight": (V, D), "output_norm.weight": (D,), "output.weight": (V, D),
              **{f"blk.{i}.{n}.weight": s for i in range(L) for n, s in (
                  ("attn_norm", (D,)), ("attn_q", (Hq * d, D)), ("attn_k", (Hkv * d, D)),
                  ("attn_v", (Hkv * d, D)), ("attn_output", (D, Hq * d)), ("ffn_norm", (D,)),
                  ("ffn_gate", (F, D)), ("ffn_up", (F, D)), ("ffn_down", (D, F)))},
              **(shapes or {})}
    types = {"blk.0.attn_q.weight": QT.Q8_0, **(types or {})}
    w = GGUFWriter(str(path), arch)
    w.add_custom_alignment(32)          # writes general.alignment, so that key's checks are reachable
    keys = {"context_length": 64, "embedding_length": D, "feed_forward_length": F, "block_count": L,
            "attention.head_count": Hq, "attention.head_count_kv": Hkv}
    for k, v in keys.items():
        if k not in drop_keys:
            w.add_uint32(f"{arch}.{k}", v)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_string("general.name", "tiny")
    n = V if n_tokens is None else n_tokens
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(n - 3)])
    w.add_token_scores([-float(i) for i in range(n)])
    w.add_token_types([2, 3, 3] + [1] * (n - 3))
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_array("test.nested", [[1, 2, 3], [4, 5]])   # nested arrays are legal GGUF
    for name, shape in shapes.items():
        if name in skip:
            continue
        x = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        qt = types.get(name, QT.F32)
        if qt == QT.F32:
            w.add_tensor(name, x)
        elif qt in (QT.Q8_0, QT.F16, QT.BF16, QT.Q4_0):
            w.add_tensor(name, quantize(x, qt), raw_dtype=qt)
        else:                                    # types gguf cannot quantise: random bytes of the right size
            block, size = __import__("gguf").GGML_QUANT_SIZES[qt]
            raw = rng.integers(0, 256, (shape[0], shape[-1] // block * size), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=qt)
    for name, (arr, qt) in (extra or {}).items():
        w.add_tensor(name, arr, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- locating fields in the written bytes (independent of the parser under test) ------------------

def gguf_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def key_at(buf: bytes, key: str) -> int:
    """Offset just past a metadata key's string: where its u32 value type starts."""
    i = buf.index(gguf_str(key))
    assert buf.find(gguf_str(key), i + 1) < 0, key
    return i + len(gguf_str(key))


def tensor_info_at(buf: bytes, name: str) -> dict:
    """Offsets of a tensor info's fields: name, n_dims, dims, type, offset."""
    i = buf.index(gguf_str(name))
    p = i + len(gguf_str(name))
    (n_dims,) = struct.unpack_from("<I", buf, p)
    dims = p + 4
    return {"name": i, "n_dims": p, "dims": dims, "type": dims + 8 * n_dims, "offset": dims + 8 * n_dims + 4}


def patch(buf: bytes, at: int, fmt: str, *values) -> bytes:
    b = bytearray(buf)
    struct.pack_into(fmt, b, at, *values)
    return bytes(b)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    p = write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
    return p, p.read_bytes()


def expect_error(tmp_path, data: bytes, *fragments, model=False, name="bad.gguf"):
    """Write `data`, run the checks, assert a GGUFError whose message names the file and fragments."""
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(GGUFError) as e:
        layout = check_gguf(p)
        if model:
            check_model_metadata(layout, p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: "), msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


# ---- valid files pass ----------------------------------------------------------------------------

def test_valid_tiny_model_passes_and_matches_ggufreader(tiny):
    import gguf
    p, _ = tiny
    layout = check_gguf(p)
    hp = check_model_metadata(layout, p)
    assert hp == {"arch": "llama", "n_vocab": 24, "dim": 32, "n_layers": 2, "n_heads": 4,
                  "n_kv_heads": 2, "head_dim": 8, "ffn_dim": 64}
    r = gguf.GGUFReader(p)
    assert layout.data_offset == r.data_offset
    assert [(t.name, t.shape, t.n_bytes, layout.data_offset + t.offset) for t in layout.tensors] == \
           [(t.name, tuple(int(s) for s in t.shape), t.n_bytes, t.data_offset) for t in r.tensors]
    assert layout.metadata["test.nested"].length == 2 and len(layout.metadata["tokenizer.ggml.tokens"]) == 24


def test_stories260k_passes_both_checks():
    p = shared_fixture("stories260K.gguf")
    hp = check_model_metadata(check_gguf(p), p)
    assert (hp["dim"], hp["n_layers"], hp["n_heads"], hp["n_kv_heads"], hp["n_vocab"]) == (64, 5, 8, 4, 512)


@pytest.mark.parametrize("name", ["ggml-vocab-llama-spm.gguf", "ggml-vocab-phi-3.gguf", "ggml-vocab-gpt-2.gguf"])
def test_vocab_only_files_pass_container_check(name):
    p = shared_fixture(f"vocab/{name}")
    layout = check_gguf(p)
    assert layout.tensors == [] and len(layout.metadata["tokenizer.ggml.tokens"]) > 30000


ORACLE = sorted((Path(__file__).resolve().parent / "fixtures" / "oracle").glob("*.gguf"))


@pytest.mark.parametrize("path", ORACLE, ids=[p.stem for p in ORACLE])
def test_oracle_models_pass_both_checks(path):
    # llama with key_length != D/Hq, F16 and Q8_0 tensors, tied output; qwen2 with q/k/v biases
    hp = check_model_metadata(check_gguf(path), path)
    assert hp["arch"] == path.stem.split("_")[0]


# ---- header ---------------------------------------------------------------------------------------

def test_bad_magic(tmp_path, tiny):
    expect_error(tmp_path, b"GGML" + tiny[1][4:], "header magic", "b'GGUF'")


@pytest.mark.parametrize("version", [1, 4, 0xFFFFFFFF])
def test_unsupported_version_is_named(tmp_path, tiny, version):
    expect_error(tmp_path, patch(tiny[1], 4, "<I", version), "header version", str(version))


def test_big_endian_version_is_named(tmp_path, tiny):
    expect_error(tmp_path, patch(tiny[1], 4, ">I", 3), "header version", "big-endian")


@pytest.mark.parametrize("size", [0, 3, 12, 23])
def test_truncated_header(tmp_path, tiny, size):
    expect_error(tmp_path, tiny[1][:size], "header", f"{size} bytes")


def test_no_such_file(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        check_gguf(tmp_path / "absent.gguf")


@pytest.mark.parametrize("field_at, what", [(8, "tensor_count"), (16, "kv_count")])
@pytest.mark.parametrize("value", [U64_MAX, 2**63, 10**9])
def test_inflated_counts_rejected_before_reading(tmp_path, tiny, field_at, what, value):
    expect_error(tmp_path, patch(tiny[1], field_at, "<Q", value), f"header {what}", str(value))


# ---- metadata -------------------------------------------------------------------------------------

def test_truncated_metadata(tmp_path, tiny):
    buf = tiny[1]
    start = key_at(buf, "tokenizer.ggml.tokens") + 4 + 4 + 8           # first token string
    # cut so few bytes remain that 24 strings (>= 8 bytes each) cannot fit: caught at the array length
    expect_error(tmp_path, buf[:start + 20], "metadata key 'tokenizer.ggml.tokens' (array length)", "truncated")
    # cut inside the last kv (test.nested, after the tokens): caught where the bytes run out
    nested = key_at(buf, "test.nested")
    expect_error(tmp_path, buf[:nested + 4 + 4 + 8 + 30], "metadata key 'test.nested'[1]", "end of file")


@pytest.mark.parametrize("value", [U64_MAX, "size+1"])
def test_string_length_larger_than_file(tmp_path, tiny, value):
    buf = tiny[1]
    n = len(buf) + 1 if value == "size+1" else value
    at = key_at(buf, "general.name") + 4                               # u64 length of the value
    expect_error(tmp_path, patch(buf, at, "<Q", n), "metadata key 'general.name'", f"length {n}")


def test_key_length_larger_than_file(tmp_path, tiny):
    buf = tiny[1]
    at = buf.index(gguf_str("general.name"))
    expect_error(tmp_path, patch(buf, at, "<Q", U64_MAX), "metadata #", "key", f"length {U64_MAX}")


@pytest.mark.parametrize("value", [U64_MAX, 2**61, "size+1"])
def test_array_length_larger_than_file(tmp_path, tiny, value):
    buf = tiny[1]
    n = len(buf) + 1 if value == "size+1" else value
    at = key_at(buf, "tokenizer.ggml.scores") + 4 + 4                  # type, item type, u64 length
    expect_error(tmp_path, patch(buf, at, "<Q", n), "metadata key 'tokenizer.ggml.scores' (array length)", str(n))


def test_value_type_out_of_range_is_named(tmp_path, tiny):
    buf = tiny[1]
    expect_error(tmp_path, patch(buf, key_at(buf, "general.name"), "<I", 13),
                 "metadata key 'general.name' value type", "13")


def test_array_element_type_out_of_range_is_named(tmp_path, tiny):
    buf = tiny[1]
    expect_error(tmp_path, patch(buf, key_at(buf, "tokenizer.ggml.scores") + 4, "<I", 99),
                 "'tokenizer.ggml.scores' (array element type)", "99")


def test_key_reserved_by_ggufreader(tmp_path, tiny):
    # GGUFReader stores the header as fields 'GGUF.version', ...: such a key makes it raise KeyError
    buf = bytearray(tiny[1])
    i = buf.index(b"general.name")
    buf[i:i + 12] = b"GGUF.version"                                    # both names are 12 bytes
    expect_error(tmp_path, bytes(buf), "metadata key 'GGUF.version'", "reserved")


def test_duplicate_key(tmp_path, tiny):
    buf = tiny[1]
    i = buf.index(b"tokenizer.ggml.eos_token_id")                     # same length as bos_token_id
    b = bytearray(buf)
    b[i:i + 27] = b"tokenizer.ggml.bos_token_id"
    expect_error(tmp_path, bytes(b), "metadata key 'tokenizer.ggml.bos_token_id'", "duplicate")


@pytest.mark.parametrize("where", ["key", "value", "token"])
def test_invalid_utf8_is_rejected(tmp_path, tiny, where):
    buf = bytearray(tiny[1])
    if where == "key":
        i, field = buf.index(b"general.name"), "metadata #"
    elif where == "value":
        i, field = key_at(bytes(buf), "general.name") + 4 + 8, "metadata key 'general.name'"
    else:
        i, field = buf.index(gguf_str("t7")) + 8, "'tokenizer.ggml.tokens'[10]"
    buf[i] = 0xFF                                                      # never valid in UTF-8
    expect_error(tmp_path, bytes(buf), field, "valid UTF-8")


@pytest.mark.parametrize("value", [48, 0])
def test_alignment_not_power_of_two(tmp_path, tiny, value):
    buf = tiny[1]
    at = key_at(buf, "general.alignment") + 4
    expect_error(tmp_path, patch(buf, at, "<I", value), "general.alignment", "power of two", str(value))


def test_deeply_nested_array_is_bounded(tmp_path):
    # 1000 levels of [[[...]]]: GGUFReader recurses once per level (RecursionError); we stop at 8
    body = gguf_str("deep") + struct.pack("<I", VT.ARRAY) + (struct.pack("<IQ", VT.ARRAY, 1) * 1000) \
        + struct.pack("<IQ", VT.UINT8, 0)
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + body
    expect_error(tmp_path, data, "metadata key 'deep'", "nested at most 8 deep")


def test_metadata_array_items_are_capped(tmp_path, tiny):
    # reading builds an object per array item (a str: ~60 B; GGUFReader spent ~700 B), so the
    # total a file can declare is capped (MAX_ARRAY_ITEMS = 2**21) and the cap is a keyword
    n = 2**21 + 1
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gguf_str("big") + struct.pack("<IIQ", VT.ARRAY, VT.UINT8, n) \
        + bytes(n)
    expect_error(tmp_path, data, "metadata key 'big' (array length)", f"at most {2**21} array items", str(n))
    with pytest.raises(GGUFError, match=r"tokenizer.ggml.tokens' \(array length\): expected at most 10 "):
        check_gguf(tiny[0], max_array_items=10)


# ---- tensor infos and data ------------------------------------------------------------------------

def test_truncated_tensor_info(tmp_path, tiny):
    buf = tiny[1]
    t = tensor_info_at(buf, "blk.1.attn_k.weight")
    expect_error(tmp_path, buf[:t["dims"] + 3], "tensor 'blk.1.attn_k.weight' dim 0", "end of file")


def test_truncated_tensor_data(tmp_path, tiny):
    buf = tiny[1]
    expect_error(tmp_path, buf[:-1], "tensor 'blk.1.ffn_down.weight' data", "inside the file")


def test_tensor_offset_outside_file(tmp_path, tiny):
    buf = tiny[1]
    at = tensor_info_at(buf, "output_norm.weight")["offset"]
    expect_error(tmp_path, patch(buf, at, "<Q", len(buf) // 32 * 32), "tensor 'output_norm.weight' data")


def test_tensor_size_outside_file(tmp_path, tiny):
    buf = tiny[1]
    at = tensor_info_at(buf, "output_norm.weight")["dims"]
    expect_error(tmp_path, patch(buf, at, "<Q", 2**40), "tensor 'output_norm.weight' data", "inside the file")


def test_dims_product_overflow(tmp_path, tiny):
    buf = tiny[1]
    at = tensor_info_at(buf, "token_embd.weight")["dims"]
    expect_error(tmp_path, patch(buf, at, "<QQ", 2**62, 2**62), "tensor 'token_embd.weight' shape", "2**63")


def test_max_tensor_bytes(tmp_path, tiny):
    with pytest.raises(GGUFError, match=r"tensor 'token_embd.weight' size: expected at most max_tensor_bytes=1000"):
        check_gguf(tiny[0], max_tensor_bytes=1000)


@pytest.mark.parametrize("n_dims", [0, 5, 2**32 - 1])
def test_n_dims_out_of_range(tmp_path, tiny, n_dims):
    buf = tiny[1]
    at = tensor_info_at(buf, "output_norm.weight")["n_dims"]
    expect_error(tmp_path, patch(buf, at, "<I", n_dims), "tensor 'output_norm.weight' n_dims", str(n_dims))


def test_misaligned_tensor_offset(tmp_path, tiny):
    buf = tiny[1]
    at = tensor_info_at(buf, "output_norm.weight")["offset"]
    (off,) = struct.unpack_from("<Q", buf, at)
    expect_error(tmp_path, patch(buf, at, "<Q", off + 4), "tensor 'output_norm.weight' offset", "multiple of the alignment 32")


def test_overlapping_tensors(tmp_path, tiny):
    buf = tiny[1]
    a = tensor_info_at(buf, "blk.0.attn_k.weight")["offset"]
    b = tensor_info_at(buf, "blk.0.attn_v.weight")["offset"]
    (off_a,) = struct.unpack_from("<Q", buf, a)
    expect_error(tmp_path, patch(buf, b, "<Q", off_a), "tensor 'blk.0.attn_v.weight' offset",
                 "padded end of the previous one", f"found {off_a}")


def test_gap_between_tensors(tmp_path, tiny):
    # an offset moved back by one alignment step stays inside the file and aligned, but would
    # read the wrong bytes: tensors must be back to back, as llama.cpp requires
    buf = tiny[1]
    at = tensor_info_at(buf, "blk.1.ffn_down.weight")["offset"]
    (off,) = struct.unpack_from("<Q", buf, at)
    expect_error(tmp_path, patch(buf, at, "<Q", off - 32), "tensor 'blk.1.ffn_down.weight' offset",
                 f"expected {off}")


def test_lowered_tensor_count_is_caught_by_the_data_tail(tmp_path, tiny):
    # one tensor info fewer: data_offset moves back, every range stays inside the file; only the
    # bytes left after the last tensor show that infos and data disagree
    buf = tiny[1]
    (n,) = struct.unpack_from("<Q", buf, 8)
    expect_error(tmp_path, patch(buf, 8, "<Q", n - 1), "tensor data section", "bytes more")


def test_appended_bytes_are_refused(tmp_path, tiny):
    expect_error(tmp_path, tiny[1] + bytes(64), "tensor data section", "64 bytes more")


def test_duplicate_tensor_names(tmp_path, tiny):
    buf = bytearray(tiny[1])
    i = tensor_info_at(bytes(buf), "blk.0.attn_k.weight")["name"] + 8
    buf[i:i + 19] = b"blk.0.attn_q.weight"
    expect_error(tmp_path, bytes(buf), "tensor 'blk.0.attn_q.weight'", "duplicate")


@pytest.mark.parametrize("type_id", [4, 77, 2**31])
def test_unknown_tensor_type_id_is_named(tmp_path, tiny, type_id):
    buf = tiny[1]
    at = tensor_info_at(buf, "output_norm.weight")["type"]
    expect_error(tmp_path, patch(buf, at, "<I", type_id), "tensor 'output_norm.weight' type",
                 f"unknown ggml type id {type_id}")


def test_row_length_not_multiple_of_block(tmp_path, tiny):
    buf = tiny[1]
    at = tensor_info_at(buf, "blk.0.attn_q.weight")["dims"]            # Q8_0: blocks of 32
    expect_error(tmp_path, patch(buf, at, "<Q", 33), "tensor 'blk.0.attn_q.weight' shape", "block size 32")


# ---- model semantics ------------------------------------------------------------------------------

@pytest.mark.parametrize("qt, name, extra", [
    (QT.IQ4_NL, "blk.0.ffn_up.weight", None),
    (QT.IQ2_XXS, "rope_extra.weight", {"rope_extra.weight": (np.zeros((2, 66), np.uint8), QT.IQ2_XXS)}),
])
def test_unsupported_tensor_type_is_named_with_supported_list(tmp_path, qt, name, extra):
    p = write_tiny_llama(tmp_path / "q.gguf", types={name: qt} if extra is None else None, extra=extra)
    with pytest.raises(GGUFError) as e:
        check_model_metadata(check_gguf(p), p)
    msg = str(e.value)
    assert f"tensor '{name}'" in msg and f"{qt.name} is not supported" in msg
    assert all(t.name in msg for t in SUPPORTED_TYPES), msg


@pytest.mark.parametrize("name, shape, expected", [
    ("blk.1.attn_k.weight", (24, 32), "(32, 16)"),        # Hkv*d = 16 rows expected, 24 given
    ("blk.0.ffn_down.weight", (32, 48), "(64, 32)"),
    ("output_norm.weight", (16,), "(32,)"),
])
def test_shapes_disagreeing_with_config(tmp_path, name, shape, expected):
    p = write_tiny_llama(tmp_path / "s.gguf", shapes={name: shape})
    with pytest.raises(GGUFError) as e:
        check_model_metadata(check_gguf(p), p)
    assert str(e.value).startswith(f"{p}: tensor '{name}' shape: expected {expected}"), str(e.value)


@pytest.mark.parametrize("name", ["token_embd.weight", "output_norm.weight", "blk.1.ffn_down.weight",
                                  "blk.0.attn_norm.weight"])
def test_missing_required_tensor(tmp_path, name):
    p = write_tiny_llama(tmp_path / "m.gguf", skip=(name,))
    with pytest.raises(GGUFError, match=rf"^{p}: tensor '{name}': expected it present"):
        check_model_metadata(check_gguf(p), p)


@pytest.mark.parametrize("extra_name", ["oetput.weight", "blk.2.attn_q.weight"])
def test_unused_tensor_is_refused(tmp_path, extra_name):
    # a renamed output (the model would silently tie to token_embd) or a block beyond block_count
    # (a lowered block_count would silently drop layers) must not be ignored
    p = write_tiny_llama(tmp_path / "u.gguf", extra={extra_name: (np.zeros((4, 32), np.float32), QT.F32)})
    with pytest.raises(GGUFError, match=rf"^{p}: tensor '{extra_name}': expected only tensors .* block_count=2"):
        check_model_metadata(check_gguf(p), p)


def test_rope_freqs_shape_is_checked(tmp_path):
    ok = write_tiny_llama(tmp_path / "r.gguf", extra={"rope_freqs.weight": (np.ones(4, np.float32), QT.F32)})
    check_model_metadata(check_gguf(ok), ok)                                  # d // 2 = 4 factors
    bad = write_tiny_llama(tmp_path / "r2.gguf", extra={"rope_freqs.weight": (np.ones(5, np.float32), QT.F32)})
    with pytest.raises(GGUFError, match=r"tensor 'rope_freqs.weight' shape: expected \(4,\)"):
        check_model_metadata(check_gguf(bad), bad)


def test_tied_output_is_optional(tmp_path):
    p = write_tiny_llama(tmp_path / "tied.gguf", skip=("output.weight",))
    assert check_model_metadata(check_gguf(p), p)["n_vocab"] == 24


@pytest.mark.parametrize("key", ["embedding_length", "block_count", "attention.head_count", "feed_forward_length"])
def test_missing_required_key(tmp_path, key):
    p = write_tiny_llama(tmp_path / "k.gguf", drop_keys=(key,))
    with pytest.raises(GGUFError, match=rf"^{p}: metadata key 'llama.{key}': expected .*missing"):
        check_model_metadata(check_gguf(p), p)


def test_key_with_wrong_type(tmp_path, tiny):
    buf = tiny[1]
    at = key_at(buf, "llama.embedding_length")
    msg = expect_error(tmp_path, patch(buf, at, "<I", VT.FLOAT32), "metadata key 'llama.embedding_length'",
                       "positive integer", "FLOAT32", model=True)
    assert "found type FLOAT32" in msg


@pytest.mark.parametrize("value", [float("nan"), -1.0, float("inf")])
def test_rms_epsilon_must_be_finite_positive(tmp_path, tiny, value):
    buf = tiny[1]
    at = key_at(buf, "llama.attention.layer_norm_rms_epsilon") + 4
    expect_error(tmp_path, patch(buf, at, "<f", value), "llama.attention.layer_norm_rms_epsilon",
                 "finite positive", model=True)


def test_hostile_block_count_is_bounded(tmp_path, tiny):
    buf = tiny[1]
    at = key_at(buf, "llama.block_count") + 4
    expect_error(tmp_path, patch(buf, at, "<I", 2**32 - 1), "llama.block_count", "at most", model=True)


@pytest.mark.parametrize("arch", ["gptneox", "mamba"])
def test_unsupported_architecture_is_named_with_supported_list(tmp_path, arch):
    p = write_tiny_llama(tmp_path / "a.gguf", arch=arch)
    with pytest.raises(GGUFError) as e:
        check_model_metadata(check_gguf(p), p)
    assert f"found '{arch}'" in str(e.value) and "llama, qwen2" in str(e.value)


def test_vocab_size_disagreeing_with_embedding(tmp_path):
    p = write_tiny_llama(tmp_path / "v.gguf", n_tokens=25)
    with pytest.raises(GGUFError, match=rf"^{p}: tensor 'token_embd.weight': expected 25 rows .*found 24 rows"):
        check_model_metadata(check_gguf(p), p)


def test_head_count_kv_must_divide_head_count(tmp_path, tiny):
    buf = tiny[1]
    at = key_at(buf, "llama.attention.head_count_kv") + 4
    expect_error(tmp_path, patch(buf, at, "<I", 3), "head_count_kv", "divisor", model=True)


class _Called(BaseException):      # not an Exception: no `except Exception` can hide it
    pass


def _forbid_ggufreader(monkeypatch):
    import gguf
    import gguf.gguf_reader

    def never(*a, **kw):
        raise _Called("gguf.GGUFReader was called: the load path reads files with minisparse's GGUFFile")
    monkeypatch.setattr(gguf, "GGUFReader", never)
    monkeypatch.setattr(gguf.gguf_reader, "GGUFReader", never)


def test_load_tokenizer_checks_the_container_first(tmp_path, monkeypatch):
    # a vocabulary-only file goes through the bounds-checked walk too: a truncated copy is refused
    # before a single value is read
    from minisparse import load_tokenizer
    src = shared_fixture("vocab/ggml-vocab-llama-spm.gguf").read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(src[: len(src) // 3])
    _forbid_ggufreader(monkeypatch)
    with pytest.raises(GGUFError, match="cut.gguf"):
        load_tokenizer(bad)


def test_load_path_never_uses_ggufreader(monkeypatch, capsys):
    # gguf-py's reader builds ~700 B of Python objects per vocabulary item and keeps them: the
    # loader, the tokenizer and `minisparse info --check` read with GGUFFile only
    from minisparse import load_model, load_tokenizer
    from minisparse.cli import main
    path = Path(__file__).resolve().parent.parent / "models" / "minisparse-pydoc.gguf"
    _forbid_ggufreader(monkeypatch)
    for dequant in (True, False):
        m = load_model(path, dequant=dequant)
        assert m.tokenizer.vocab_size == m.config.n_vocab == 4096
    assert load_tokenizer(path).encode("import os") == m.tokenizer.encode("import os")
    assert main(["info", str(path), "--check"]) == 0
    assert "all tensors finite" in capsys.readouterr().out
