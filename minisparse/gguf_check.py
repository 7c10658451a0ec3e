"""minisparse's GGUF reader: a bounds-checked container parser, `GGUFFile`, and llama/qwen2 model checks.

Every count, length and offset is checked against the file size before anything is read or
allocated, so a truncated or hostile file fails with a `GGUFError` naming the file, the field and
what was expected. `GGUFFile` then reads values straight from one read-only memory map: numeric
arrays and tensors are NumPy views of it, string arrays one `list[str]` decoded on demand.
Left out on purpose: big-endian files, GGUF v1, writing, and dequantisation (`gguf.quants` and
`minisparse.quant` do that). Format: GGUF v2/v3 as specified in ggml's docs/gguf.md
(ggml-org/ggml) and written by `gguf.GGUFWriter`.
"""
from __future__ import annotations

import mmap
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT, GGUFValueType as VT

from .errors import GGUFError

__all__ = ["GGUFFile", "GGUFTensor", "check_gguf", "check_model_metadata", "GGUFLayout", "TensorInfo",
           "GGUFArray", "SUPPORTED_ARCHS", "SUPPORTED_TYPES"]

SUPPORTED_ARCHS = ("llama", "qwen2")
SUPPORTED_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1,
                   QT.Q4_K, QT.Q5_K, QT.Q6_K)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                   # GGML_MAX_DIMS
# gguf-py's GGUFReader files the header under these names in the same dict as the metadata, so a
# key spelled like one of them makes it raise KeyError. Our reader has no such clash; the names are
# still refused so that every file minisparse accepts also opens in gguf-py (the tests' oracle).
RESERVED_KEYS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")
# Caps on what a file can make *this* parser do. Walking a string array is a Python loop that
# builds one str per item, and a tensor info costs one TensorInfo and one NumPy view: all
# proportional to the file, but a multi-GB model file could declare 100M tiny strings in its
# metadata and cost minutes and gigabytes before a tensor is read. The caps sit well above real
# files (a 256k vocabulary with scores, types and merges is < 1M items; models have < 10k tensors
# and < 100 keys), so they refuse only files whose counts no model needs.
MAX_ARRAY_ITEMS = 1 << 21      # in all metadata arrays together, nested items included
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 16
MAX_ARRAY_DEPTH = 8            # nested arrays deeper than this are hostile; both walks recurse per level
INT64_MAX = 2**63 - 1

# Little-endian struct format and byte width of each scalar value type.
_SCALAR = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I",
           VT.INT32: "<i", VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q",
           VT.FLOAT64: "<d"}
_U64 = struct.Struct("<Q")
_SCALAR_SIZE = {t: struct.calcsize(f) for t, f in _SCALAR.items()}
_MIN_VALUE_SIZE = {**_SCALAR_SIZE, VT.STRING: 8, VT.ARRAY: 12}   # string: u64 length; array: u32 type + u64 length
_MIN_KV_SIZE = 8 + 4 + 1              # key length, value type, smallest value (u8)
_MIN_TENSOR_INFO_SIZE = 8 + 4 + 8 + 4 + 8   # name length, n_dims, one dim, type, offset
_INT_TYPES = (VT.UINT8, VT.INT8, VT.UINT16, VT.INT16, VT.UINT32, VT.INT32, VT.UINT64, VT.INT64)
_FLOAT_TYPES = (VT.FLOAT32, VT.FLOAT64)


@dataclass(frozen=True)
class GGUFArray:
    """A metadata array, kept as a reference into the file (arrays may hold 100k+ tokens)."""
    item_type: VT      # element type; VT.ARRAY for nested arrays
    length: int        # number of elements
    offset: int        # absolute file offset of the first element
    nbytes: int        # bytes of the elements (the whole payload)

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class TensorInfo:
    """One tensor info record, validated. `shape` is GGML order (ne0 = row length first), exactly
    like `ReaderTensor.shape`; `data_shape` is the reversed (out, in) order of `ReaderTensor.data`."""
    name: str
    shape: tuple[int, ...]      # GGML order, e.g. attn_q (D, Hq*d)
    ggml_type: QT
    offset: int                 # relative to GGUFLayout.data_offset, as stored in the file
    n_elements: int
    n_bytes: int

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))


@dataclass
class GGUFLayout:
    """What `check_gguf` found: metadata scalars, array references, tensor infos, data offset."""
    path: Path
    file_size: int
    version: int
    alignment: int
    metadata: dict[str, object]       # key -> int | float | bool | str | GGUFArray
    value_types: dict[str, VT]        # key -> GGUF value type of the stored value
    tensors: list[TensorInfo]         # in file order
    data_offset: int                  # absolute offset of the (aligned) tensor data section
    info_offset: int = 0              # where the tensor infos start (= end of the metadata)
    info_end: int = 0                 # where they end (data_offset is this rounded up to alignment)
    _by_name: dict[str, TensorInfo] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._by_name = {t.name: t for t in self.tensors}

    def tensor(self, name: str) -> TensorInfo | None:
        return self._by_name.get(name)


# Names from the file are quoted with repr(): a hostile name with quotes or control characters
# then still reads as one token in the message.


class _Cursor:
    """Sequential little-endian reads from a memory map; every read is bounds-checked first."""

    def __init__(self, buf, size: int, path, max_array_items: int = MAX_ARRAY_ITEMS):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0
        self.max_array_items = self.items_left = max_array_items

    def fail(self, what: str, expected: str, found) -> GGUFError:
        return GGUFError(f"{self.path}: {what}: expected {expected}, found {found}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(what, f"{n} bytes at offset {self.pos}",
                            f"end of file after {self.size - self.pos} bytes (file is {self.size} bytes; truncated?)")

    def scalar(self, vtype: VT, what: str):
        n = _SCALAR_SIZE[vtype]
        self.need(n, what)
        (v,) = struct.unpack_from(_SCALAR[vtype], self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.scalar(VT.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(VT.UINT64, what)

    def string(self, what: str) -> str:
        n = self.u64(f"{what} (string length)")
        # the length is checked against the bytes left before a single byte is copied
        if n > self.size - self.pos:
            raise self.fail(what, f"a string of at most {self.size - self.pos} bytes (the rest of the file)",
                            f"length {n}")
        raw = self.buf[self.pos:self.pos + n]       # bytes (an mmap) or a memoryview (a GGUFFile's map)
        try:
            s = str(raw, "utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(what, "valid UTF-8", f"{e.reason} at byte {e.start} of {bytes(raw[:32])!r}") from None
        self.pos += n
        return s

    def strings(self, n: int, what: str) -> None:
        """Walk past `n` strings (a token list: 30k-250k of them), checking each like `string` does.
        The loop is the hot path of a check, so it keeps to locals and builds no message until a
        string fails; then `string` re-reads that one and raises its exact error."""
        buf, size, pos = self.buf, self.size, self.pos
        u64 = _U64.unpack_from
        for i in range(n):
            if size - pos >= 8:
                (ln,) = u64(buf, pos)
                if ln <= size - pos - 8:
                    try:
                        str(buf[pos + 8:pos + 8 + ln], "utf-8")
                        pos += 8 + ln
                        continue
                    except UnicodeDecodeError:
                        pass
            self.pos = pos
            self.string(f"{what}[{i}]")       # raises
        self.pos = pos

    def skip_count(self, count: int, item_size: int, what: str) -> None:
        """Check that `count` items of at least `item_size` bytes fit in the rest of the file."""
        left = self.size - self.pos
        if count > left // item_size:      # integer form of count * item_size > left: no overflow
            raise self.fail(what, f"at most {left // item_size} items of >= {item_size} bytes "
                                  f"(the {left} bytes left in the file; truncated, or an inflated count)", count)


def _value_type(cur: _Cursor, what: str) -> VT:
    raw = cur.u32(what)
    try:
        return VT(raw)
    except ValueError:
        raise cur.fail(what, f"a GGUF value type id 0..{max(VT).value}", raw) from None


def _read_value(cur: _Cursor, vtype: VT, what: str, depth: int = 0):
    """Read (or, for arrays, walk past) one value; returns a Python scalar/str or a GGUFArray."""
    if vtype in _SCALAR:
        return cur.scalar(vtype, what)
    if vtype == VT.STRING:
        return cur.string(what)
    # ARRAY: element type, length, elements
    itype = _value_type(cur, f"{what} (array element type)")
    n = cur.u64(f"{what} (array length)")
    cur.skip_count(n, _MIN_VALUE_SIZE[itype], f"{what} (array length)")
    if n > cur.items_left:
        raise cur.fail(f"{what} (array length)", f"at most {cur.max_array_items} array items in all the "
                       f"metadata (max_array_items: reading builds an object per item)",
                       f"{n} more after {cur.max_array_items - cur.items_left}")
    cur.items_left -= n
    start = cur.pos
    if itype in _SCALAR:
        cur.pos += n * _SCALAR_SIZE[itype]          # fits: checked by skip_count just above
    elif itype == VT.STRING:
        cur.strings(n, what)
    else:
        if depth + 1 >= MAX_ARRAY_DEPTH:
            raise cur.fail(what, f"arrays nested at most {MAX_ARRAY_DEPTH} deep", "deeper nesting")
        for i in range(n):
            _read_value(cur, VT.ARRAY, f"{what}[{i}]", depth + 1)
    return GGUFArray(itype, n, start, cur.pos - start)


def _read_tensor_info(cur: _Cursor, i: int, alignment: int, max_tensor_bytes: int | None) -> TensorInfo:
    name = cur.string(f"tensor info #{i} name")
    what = f"tensor {name!r}"
    n_dims = cur.u32(f"{what} n_dims")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"{what} n_dims", f"1..{MAX_DIMS}", n_dims)
    shape = tuple(cur.u64(f"{what} dim {j}") for j in range(n_dims))
    n_elements = 1
    for j, ne in enumerate(shape):
        if ne > INT64_MAX:
            raise cur.fail(f"{what} dim {j}", "a dimension below 2**63", ne)
        n_elements *= ne    # Python ints do not overflow; compare the product instead
    if n_elements > INT64_MAX:
        raise cur.fail(f"{what} shape", "a product of dims below 2**63", f"{shape} ({n_elements} elements)")
    raw_type = cur.u32(f"{what} type")
    try:
        ggml_type = QT(raw_type)
        block, type_size = GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise cur.fail(f"{what} type", "a known ggml type id", f"unknown ggml type id {raw_type}") from None
    if shape[0] % block:
        raise cur.fail(f"{what} shape", f"a row length (ne0) that is a multiple of {ggml_type.name}'s "
                                         f"block size {block}", f"{shape[0]} in shape {shape}")
    n_bytes = n_elements // block * type_size
    offset = cur.u64(f"{what} offset")
    if offset % alignment:
        raise cur.fail(f"{what} offset", f"a multiple of the alignment {alignment}", offset)
    if max_tensor_bytes is not None and n_bytes > max_tensor_bytes:
        raise cur.fail(f"{what} size", f"at most max_tensor_bytes={max_tensor_bytes}", f"{n_bytes} bytes")
    return TensorInfo(name, shape, ggml_type, offset, n_elements, n_bytes)


def check_gguf(path, *, max_tensor_bytes: int | None = None,
               max_array_items: int = MAX_ARRAY_ITEMS) -> GGUFLayout:
    """Walk a GGUF file's header, metadata and tensor infos with every length checked against the
    file size; raise `GGUFError` naming the file, field and expected value on the first problem.

    Reads through a read-only memory map and allocates nothing sized by a declared length, so a
    hostile file costs O(file size) time and memory at most. Returns a `GGUFLayout` whose tensor
    data ranges are inside the file, aligned, in order and back to back. Does not check what a
    model needs: see `check_model_metadata`. `GGUFFile(path)` runs this same walk and keeps the
    map open to read values and tensors. `max_tensor_bytes` caps one tensor's data;
    `max_array_items` caps the metadata array items (reading builds one object per item; counts of
    tensors and keys are capped at 65536 each).

    >>> layout = check_gguf("../shared/fixtures/stories260K.gguf")        # doctest: +SKIP
    >>> layout.metadata["llama.embedding_length"], layout.tensor("output_norm.weight").shape  # doctest: +SKIP
    (64, (64,))
    """
    path = Path(path)
    with _file_errors(path):
        _check_is_gguf_sized(path)
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            # len(buf), not the stat size: the file may have changed in between
            return _parse(_Cursor(buf, len(buf), path, max_array_items), max_tensor_bytes)


@contextmanager
def _file_errors(path: Path):
    """OS errors while opening or mapping `path` -> GGUFError naming it."""
    try:
        yield
    except FileNotFoundError:
        raise GGUFError(f"{path}: no such file") from None
    except OSError as e:
        raise GGUFError(f"{path}: could not be read: {e.strerror or e}") from None


def _check_is_gguf_sized(path: Path) -> None:
    size = os.stat(path).st_size
    if not path.is_file():
        raise GGUFError(f"{path}: expected a regular GGUF file, found something else (a directory?)")
    if size < 4 + 4 + 8 + 8:
        raise GGUFError(f"{path}: header: expected at least 24 bytes (magic, version, tensor_count, "
                        f"kv_count), found a file of {size} bytes")


def _parse(cur: _Cursor, max_tensor_bytes: int | None) -> GGUFLayout:
    magic = bytes(cur.buf[0:4])
    if magic != GGUF_MAGIC:
        raise cur.fail("header magic", "b'GGUF'", repr(magic))
    cur.pos = 4
    version = cur.u32("header version")
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in SUPPORTED_VERSIONS:
            raise cur.fail("header version", "a little-endian file (big-endian GGUF is not supported)",
                           f"big-endian version {swapped}")
        raise cur.fail("header version", f"one of {SUPPORTED_VERSIONS}", version)
    tensor_count = cur.u64("header tensor_count")
    kv_count = cur.u64("header kv_count")
    # counts are checked before their loops; tensor_count again after the metadata, against what is left
    cur.skip_count(kv_count, _MIN_KV_SIZE, "header kv_count")
    for count, limit, what in ((kv_count, MAX_KV, "kv_count"), (tensor_count, MAX_TENSORS, "tensor_count")):
        if count > limit:
            raise cur.fail(f"header {what}", f"at most {limit}", count)

    metadata: dict[str, object] = {}
    value_types: dict[str, VT] = {}
    for i in range(kv_count):
        key = cur.string(f"metadata #{i} key")
        if key in metadata:
            raise cur.fail(f"metadata key {key!r}", "each key once", "a duplicate")
        if key in RESERVED_KEYS:
            raise cur.fail(f"metadata key {key!r}", f"a key other than {', '.join(RESERVED_KEYS)}",
                           "a reserved name")
        vtype = _value_type(cur, f"metadata key {key!r} value type")
        metadata[key] = _read_value(cur, vtype, f"metadata key {key!r}")
        value_types[key] = vtype

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        alignment = metadata["general.alignment"]
        # the spec types it UINT32 and gguf-py accepts nothing else: both readers agree on the data offset
        if value_types["general.alignment"] != VT.UINT32 or alignment == 0 or alignment & (alignment - 1):
            raise cur.fail("metadata key 'general.alignment'", "a UINT32 power of two",
                           f"{alignment!r} of type {value_types['general.alignment'].name}")

    cur.skip_count(tensor_count, _MIN_TENSOR_INFO_SIZE, "header tensor_count")
    info_offset = cur.pos
    tensors: list[TensorInfo] = []
    names: set[str] = set()
    for i in range(tensor_count):
        t = _read_tensor_info(cur, i, alignment, max_tensor_bytes)
        if t.name in names:
            raise cur.fail(f"tensor {t.name!r}", "each tensor name once", "a duplicate")
        names.add(t.name)
        tensors.append(t)

    info_end = cur.pos
    data_offset = -(-info_end // alignment) * alignment
    size = cur.size
    for t in tensors:
        start = data_offset + t.offset
        if t.n_bytes > size or start > size - t.n_bytes:
            raise cur.fail(f"tensor {t.name!r} data",
                           f"bytes [{start}, {start + t.n_bytes}) inside the file of {size} bytes",
                           "a range past the end (truncated file or bad offset)")
    # Tensors lie in file order, each at the padded end of the one before (llama.cpp's reader
    # refuses anything else), and the file ends with the last one's padding. Both matter: a lowered
    # tensor_count or a flipped offset moves data_offset or a tensor while every range stays inside
    # the file, and would load a silently wrong model.
    run = 0
    for t in tensors:
        if t.offset != run:
            raise cur.fail(f"tensor {t.name!r} offset", f"{run} (tensors are stored in order, each at the "
                           f"padded end of the previous one)", t.offset)
        run += -(-t.n_bytes // alignment) * alignment
    if tensors and size - data_offset > run:
        raise cur.fail("tensor data section", f"the file to end with the last tensor's padding at byte "
                       f"{data_offset + run}", f"{size - data_offset - run} bytes more (infos and data disagree: "
                       f"a tensor info missing, or bytes appended)")
    return GGUFLayout(cur.path, size, version, alignment, metadata, value_types, tensors, data_offset,
                      info_offset, info_end)


# --------------------------------------------------------------------------------------------------
# Reading: metadata values and tensors straight from the file's memory map
# --------------------------------------------------------------------------------------------------

# Item type of a numeric metadata array -> its little-endian NumPy dtype. BOOL items are read as
# bytes and compared with 0, as struct's "?" reads a scalar BOOL: a stray byte 2 is True both ways.
_ARRAY_DTYPE = {VT.UINT8: np.dtype("u1"), VT.INT8: np.dtype("i1"), VT.UINT16: np.dtype("<u2"),
                VT.INT16: np.dtype("<i2"), VT.UINT32: np.dtype("<u4"), VT.INT32: np.dtype("<i4"),
                VT.UINT64: np.dtype("<u8"), VT.INT64: np.dtype("<i8"), VT.FLOAT32: np.dtype("<f4"),
                VT.FLOAT64: np.dtype("<f8"), VT.BOOL: np.dtype("u1")}
# Tensor types stored as plain numbers: their data is viewed with this dtype, shaped (out, in).
# Every other type (quant blocks, BF16) is uint8 shaped (out, bytes per row). Both are exactly
# gguf-py's ReaderTensor.data, so QuantMatrix and gguf.quants.dequantize take them unchanged.
_TENSOR_DTYPE = {QT.F32: np.dtype("<f4"), QT.F16: np.dtype("<f2"), QT.F64: np.dtype("<f8"),
                 QT.I8: np.dtype("i1"), QT.I16: np.dtype("<i2"), QT.I32: np.dtype("<i4"),
                 QT.I64: np.dtype("<i8")}


@dataclass(frozen=True, eq=False)
class GGUFTensor(TensorInfo):
    """A tensor of an open `GGUFFile`: its checked `TensorInfo` and `data`, a read-only view of the
    file's memory map (nothing copied). `data` is `data_shape` (out, in) of float32/float16/... for
    plain types, uint8 (out, bytes per row) of raw blocks for quantised types and BF16."""
    data: np.ndarray = field(repr=False)


class GGUFFile:
    """An open GGUF file: the `check_gguf` layout plus one read-only `np.memmap` of the whole file.

    `get(key)` reads a metadata value when asked for it: scalars as Python values, numeric arrays
    as read-only NumPy views of the map, string arrays as one `list[str]`, nested arrays as lists.
    Nothing is cached, so a 49k-entry merge list lives only while its caller holds it. `tensors`
    (file order) and `tensor(name)` give `GGUFTensor`s viewing the map: opening a model of any size
    costs only its metadata walk, and its pages are read when a kernel touches them.

    >>> f = GGUFFile("../shared/fixtures/stories260K.gguf")                       # doctest: +SKIP
    >>> f.get("llama.embedding_length"), f.get("tokenizer.ggml.tokens")[:3]       # doctest: +SKIP
    (64, ['<unk>', '<s>', '</s>'])
    >>> t = f.tensor("blk.0.ffn_up.weight"); t.shape, t.data_shape, t.data.dtype  # doctest: +SKIP
    ((64, 172), (172, 64), dtype('float32'))
    """

    def __init__(self, path, *, max_tensor_bytes: int | None = None,
                 max_array_items: int = MAX_ARRAY_ITEMS):
        self.path = Path(path)
        with _file_errors(self.path):
            _check_is_gguf_sized(self.path)
            try:
                self.data = np.memmap(self.path, dtype=np.uint8, mode="r")     # (file bytes,) uint8
            except ValueError as e:          # emptied since the size check: numpy maps no empty file
                raise GGUFError(f"{self.path}: could not be mapped: {e}") from None
        # the walk reads the same map the values and tensors come from: one file state for all
        self.layout = _parse(_Cursor(memoryview(self.data), len(self.data), self.path, max_array_items),
                             max_tensor_bytes)
        self.metadata = self.layout.metadata          # key -> scalar | GGUFArray (a reference)
        self.value_types = self.layout.value_types    # key -> GGUFValueType
        self.tensors = [self._tensor(t) for t in self.layout.tensors]
        self._by_name = {t.name: t for t in self.tensors}

    def __repr__(self) -> str:
        return (f"GGUFFile({str(self.path)!r}: GGUF v{self.layout.version}, {len(self.metadata)} keys, "
                f"{len(self.tensors)} tensors)")

    def _fail(self, what: str, expected: str, found) -> GGUFError:
        return GGUFError(f"{self.path}: {what}: expected {expected}, found {found}")

    def get(self, key: str, default=None):
        """Metadata value of `key` (arrays read from the map now), or `default` when absent."""
        value = self.metadata.get(key, default)
        return self.read_array(value, f"metadata key {key!r}") if isinstance(value, GGUFArray) else value

    def tensor(self, name: str) -> GGUFTensor | None:
        return self._by_name.get(name)

    def read_array(self, arr: GGUFArray, what: str = "array"):
        """The items of `arr`: a read-only NumPy view for numbers (bool: a bool copy), a list[str]
        for strings, a list of such for nested arrays. `what` names the field in errors."""
        return self._read_array(arr, what, 0)

    def _read_array(self, arr: GGUFArray, what: str, depth: int):
        end = arr.offset + arr.nbytes
        if arr.offset < 0 or arr.nbytes < 0 or end > len(self.data):
            raise self._fail(what, f"bytes [{arr.offset}, {end}) inside the file of {len(self.data)} bytes",
                            "a range past the end (an array from another file?)")
        if arr.item_type in _ARRAY_DTYPE:
            dtype = _ARRAY_DTYPE[arr.item_type]
            if arr.nbytes != arr.length * dtype.itemsize:
                raise self._fail(what, f"{arr.length} items of {dtype.itemsize} bytes", f"{arr.nbytes} bytes")
            items = np.frombuffer(self.data, dtype, arr.length, arr.offset)
            return items != 0 if arr.item_type == VT.BOOL else items
        if arr.item_type == VT.STRING:
            return self._read_strings(bytes(self.data[arr.offset:end]), arr.length, what)
        # nested: walk the element headers again (bounded by this array's own bytes), then read each
        cur = _Cursor(memoryview(self.data), end, self.path)
        cur.pos = arr.offset
        subs = [_read_value(cur, VT.ARRAY, f"{what}[{i}]", depth + 1) for i in range(arr.length)]
        if cur.pos != end:
            raise self._fail(what, f"{arr.length} nested arrays filling its {arr.nbytes} bytes",
                            f"{end - cur.pos} bytes after them")
        return [self._read_array(sub, f"{what}[{i}]", depth + 1) for i, sub in enumerate(subs)]

    def _read_strings(self, raw: bytes, n: int, what: str) -> list[str]:
        """`n` GGUF strings (u64 length, UTF-8 bytes) packed in `raw`, decoded in one pass.

        A vocabulary is 30k-250k of them, so the loop keeps to locals (an attribute lookup per
        string would cost as much as the decode) and checks each length against the bytes left
        before slicing."""
        out: list[str] = []
        append, u64, pos, size, i, n_str = out.append, _U64.unpack_from, 0, len(raw), 0, 0
        try:
            for i in range(n):
                (n_str,) = u64(raw, pos)          # struct.error when < 8 bytes are left
                pos += 8
                if n_str > size - pos:
                    raise self._fail(f"{what}[{i}]", f"a string of at most {size - pos} bytes (the rest "
                                    f"of the array)", f"length {n_str}")
                append(raw[pos:pos + n_str].decode())
                pos += n_str
        except struct.error:
            raise self._fail(f"{what}[{i}]", "an 8-byte string length inside the array",
                            f"{size - pos} bytes left") from None
        except UnicodeDecodeError as e:
            raise self._fail(f"{what}[{i}]", "valid UTF-8",
                            f"{e.reason} at byte {e.start} of {raw[pos:pos + min(n_str, 32)]!r}") from None
        if pos != size:
            raise self._fail(what, f"{n} strings filling its {size} bytes", f"{size - pos} bytes after them")
        return out

    def _tensor(self, info: TensorInfo) -> GGUFTensor:
        start = self.layout.data_offset + info.offset
        if start + info.n_bytes > len(self.data):         # _parse checked it; kept next to the slice
            raise self._fail(f"tensor {info.name!r} data", f"bytes [{start}, {start + info.n_bytes}) "
                            f"inside the file of {len(self.data)} bytes", "a range past the end")
        raw = self.data[start:start + info.n_bytes]
        *outer, ne0 = info.data_shape
        dtype = _TENSOR_DTYPE.get(info.ggml_type)
        if dtype is not None:
            data = raw.view(dtype).reshape(info.data_shape)
        else:
            block, type_size = GGML_QUANT_SIZES[info.ggml_type]
            data = raw.reshape(*outer, ne0 // block * type_size)
        return GGUFTensor(info.name, info.shape, info.ggml_type, info.offset, info.n_elements,
                          info.n_bytes, data)


# --------------------------------------------------------------------------------------------------
# Semantic checks: does this container hold a llama/qwen2 model minisparse can run?
# --------------------------------------------------------------------------------------------------

_BLOCK_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                  "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


def _key(layout: GGUFLayout, path, key: str, kinds: tuple, kind_name: str, default=None, required=True):
    if key not in layout.metadata:
        if required:
            raise GGUFError(f"{path}: metadata key {key!r}: expected {kind_name}, found nothing (key missing)")
        return default
    vtype = layout.value_types[key]
    value = layout.metadata[key]
    if vtype not in kinds:
        raise GGUFError(f"{path}: metadata key {key!r}: expected {kind_name}, found type {vtype.name}")
    return value


def _positive_int(layout, path, key, default=None, required=True, limit=None) -> int:
    v = _key(layout, path, key, _INT_TYPES, "a positive integer", default, required)
    if v is not None and (v <= 0 or (limit is not None and v > limit)):
        bound = f" at most {limit}" if limit is not None else ""
        raise GGUFError(f"{path}: metadata key {key!r}: expected a positive integer{bound}, found {v}")
    return v


def check_model_metadata(layout: GGUFLayout, path=None) -> dict:
    """Check that a `check_gguf` layout holds a `llama`/`qwen2` model: required keys with the right
    types, every required tensor present with the shape the config implies, vocabulary size equal
    to token_embd's rows, tensor types in `SUPPORTED_TYPES`, no tensor the model would not use.
    Raises `GGUFError` on the first problem.

    Returns the checked hyper-parameters: {"arch", "n_vocab" V, "dim" D, "n_layers" L, "n_heads" Hq,
    "n_kv_heads" Hkv, "head_dim" d, "ffn_dim" F}. Shapes are compared in GGML order (ne0 = in):
    attn_q is (D, Hq*d), attn_k (D, Hkv*d), token_embd (D, V).

    >>> hp = check_model_metadata(check_gguf("../shared/fixtures/stories260K.gguf"))  # doctest: +SKIP
    >>> hp["dim"], hp["n_heads"], hp["n_kv_heads"], hp["n_vocab"]                          # doctest: +SKIP
    (64, 8, 4, 512)
    """
    path = layout.path if path is None else path
    arch = _key(layout, path, "general.architecture", (VT.STRING,), "a string")
    if arch not in SUPPORTED_ARCHS:
        raise GGUFError(f"{path}: metadata key 'general.architecture': expected a supported "
                        f"architecture ({', '.join(SUPPORTED_ARCHS)}), found {arch!r} (not supported)")
    n_tensors = len(layout.tensors)
    D = _positive_int(layout, path, f"{arch}.embedding_length")
    # a block needs 9 tensors: bounding L by the tensor count keeps a hostile L from looping for hours
    L = _positive_int(layout, path, f"{arch}.block_count", limit=n_tensors // len(_BLOCK_TENSORS))
    Hq = _positive_int(layout, path, f"{arch}.attention.head_count")
    Hkv = _positive_int(layout, path, f"{arch}.attention.head_count_kv", default=Hq, required=False)
    F = _positive_int(layout, path, f"{arch}.feed_forward_length")
    if Hq % Hkv:
        raise GGUFError(f"{path}: metadata key '{arch}.attention.head_count_kv': expected a divisor of "
                        f"head_count={Hq}, found {Hkv}")
    key_length = _positive_int(layout, path, f"{arch}.attention.key_length", required=False)
    if key_length is None and D % Hq:
        raise GGUFError(f"{path}: metadata key '{arch}.attention.head_count': expected a divisor of "
                        f"embedding_length={D}, found {Hq}")
    d = key_length if key_length is not None else D // Hq
    dv = _positive_int(layout, path, f"{arch}.attention.value_length", default=d, required=False)
    _positive_int(layout, path, f"{arch}.context_length", required=False)
    rope_dim = _positive_int(layout, path, f"{arch}.rope.dimension_count", required=False)
    if rope_dim is not None and (rope_dim > d or rope_dim % 2):
        raise GGUFError(f"{path}: metadata key '{arch}.rope.dimension_count': expected an even number "
                        f"at most head_dim={d}, found {rope_dim}")
    for k in ("attention.layer_norm_rms_epsilon", "rope.freq_base"):
        v = _key(layout, path, f"{arch}.{k}", _FLOAT_TYPES, "a float", required=False)
        if v is not None and not 0 < v < float("inf"):      # NaN fails too: it would poison every logit
            raise GGUFError(f"{path}: metadata key '{arch}.{k}': expected a finite positive float, found {v}")

    tokens = _key(layout, path, "tokenizer.ggml.tokens", (VT.ARRAY,), "an array of strings")
    if tokens.item_type != VT.STRING:
        raise GGUFError(f"{path}: metadata key 'tokenizer.ggml.tokens': expected an array of strings, "
                        f"found an array of {tokens.item_type.name}")
    V = tokens.length
    if V == 0:
        raise GGUFError(f"{path}: metadata key 'tokenizer.ggml.tokens': expected a non-empty array of "
                        f"strings, found an empty array")

    for t in layout.tensors:
        if t.ggml_type not in SUPPORTED_TYPES:
            raise GGUFError(f"{path}: tensor {t.name!r} type: expected a supported type "
                            f"({', '.join(q.name for q in SUPPORTED_TYPES)}), found {t.ggml_type.name} "
                            f"({t.ggml_type.name} is not supported)")

    why = f"embedding_length={D}, head_count={Hq}, head_count_kv={Hkv}, head_dim={d}, " \
          f"feed_forward_length={F}, vocabulary={V}"
    expected = {"token_embd.weight": (D, V), "output_norm.weight": (D,)}
    # rope_freqs: Llama 3.1 per-frequency factors, one per rotated pair
    optional = {"output.weight": (D, V), "rope_freqs.weight": ((rope_dim or d) // 2,)}
    for i in range(L):
        b = f"blk.{i}."
        expected.update({
            b + "attn_norm.weight": (D,), b + "ffn_norm.weight": (D,),
            b + "attn_q.weight": (D, Hq * d), b + "attn_k.weight": (D, Hkv * d),
            b + "attn_v.weight": (D, Hkv * dv), b + "attn_output.weight": (Hq * dv, D),
            b + "ffn_gate.weight": (D, F), b + "ffn_up.weight": (D, F), b + "ffn_down.weight": (F, D),
        })
        optional.update({b + "attn_q.bias": (Hq * d,), b + "attn_k.bias": (Hkv * d,),
                         b + "attn_v.bias": (Hkv * dv,)})
    for name, shape in list(expected.items()) + list(optional.items()):
        t = layout.tensor(name)
        if t is None:
            if name in expected:
                raise GGUFError(f"{path}: tensor {name!r}: expected it present (required for {arch} "
                                f"with block_count={L}), found nothing (tensor missing)")
            continue
        if t.shape != shape:
            if name == "token_embd.weight" and t.shape[:1] == (D,) and len(t.shape) == 2:
                raise GGUFError(f"{path}: tensor 'token_embd.weight': expected {V} rows (the size of "
                                f"tokenizer.ggml.tokens), found {t.shape[1]} rows (shape {t.shape})")
            raise GGUFError(f"{path}: tensor {name!r} shape: expected {shape} in GGML order (ne0 = input "
                            f"width) for {why}, found {t.shape}")
    # A tensor the model does not use is refused, not ignored: a flipped name ('output' ->
    # 'oetput') or a lowered block_count would otherwise run a different model without a word.
    for t in layout.tensors:
        if t.name not in expected and t.name not in optional:
            raise GGUFError(f"{path}: tensor {t.name!r}: expected only tensors a {arch} model with "
                            f"block_count={L} uses (token_embd, output_norm, output, rope_freqs, "
                            f"blk.0..{L - 1}.attn_norm/attn_q/attn_k/attn_v/attn_output/ffn_norm/ffn_gate/"
                            f"ffn_up/ffn_down and q/k/v biases), found a tensor it does not use")
    return {"arch": arch, "n_vocab": V, "dim": D, "n_layers": L, "n_heads": Hq, "n_kv_heads": Hkv,
            "head_dim": d, "ffn_dim": F}
