"""Fast GGUF header parsing (metadata + tensor directory) on top of the ``gguf`` package's constants.

``gguf.GGUFReader`` builds a numpy view for every part of every metadata value, which takes
10-20 s on a tokenizer with 100k strings. This reader walks the same header with ``struct`` in a
fraction of a second and hands tensor bytes to ``gguf.quants`` for dequantisation, exposing the
same ``name`` / ``tensor_type`` / ``shape`` / ``data`` attributes as ``gguf.ReaderTensor``.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import quant_shape_to_byte_shape

_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NP_SCALARS = {
    GGUFValueType.UINT8: np.uint8, GGUFValueType.INT8: np.int8, GGUFValueType.UINT16: np.uint16,
    GGUFValueType.INT16: np.int16, GGUFValueType.UINT32: np.uint32, GGUFValueType.INT32: np.int32,
    GGUFValueType.FLOAT32: np.float32, GGUFValueType.BOOL: np.bool_, GGUFValueType.UINT64: np.uint64,
    GGUFValueType.INT64: np.int64, GGUFValueType.FLOAT64: np.float64,
}
_PLAIN = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32, GGMLQuantizationType.I64: np.int64,
}


class GGUFFormatError(ValueError):
    """The file is not a well-formed GGUF file."""


@dataclasses.dataclass
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order (fastest dimension first), like gguf.ReaderTensor.shape
    data: np.ndarray  # memory-mapped: typed for plain types, raw bytes [rows, row_bytes] for quantised


class GGUFFile:
    """Metadata dict and tensor list of a GGUF file (tensor data memory-mapped, not read)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            self._buf = f.read(min(size, 1 << 20))
            self._f = f
            self._size = size
            self._pos = 0
            try:
                self._parse_header()
            except GGUFFormatError:
                raise
            except (struct.error, UnicodeDecodeError, ValueError, OverflowError, MemoryError) as e:
                raise GGUFFormatError(f"corrupt GGUF file {self.path!r}: {type(e).__name__}: {e}") from None
            finally:
                self._buf = b""
        self._map_tensors()

    # -- low-level reads over a growing buffer
    def _need(self, n: int) -> None:
        end = self._pos + n
        if end > self._size:
            raise GGUFFormatError(f"corrupt GGUF file {self.path!r}: truncated header (needs byte {end}, "
                                  f"file has {self._size})")
        if end > len(self._buf):
            self._f.seek(len(self._buf))
            self._buf += self._f.read(max(end - len(self._buf), 1 << 20))

    def _unpack(self, fmt: str):
        n = struct.calcsize(fmt)
        self._need(n)
        v = struct.unpack_from(fmt, self._buf, self._pos)[0]
        self._pos += n
        return v

    def _string(self) -> str:
        n = self._unpack("<Q")
        if n > self._size:
            raise GGUFFormatError(f"corrupt GGUF file {self.path!r}: string length {n} exceeds the file size")
        self._need(n)
        s = self._buf[self._pos:self._pos + n].decode("utf-8")
        self._pos += n
        return s

    def _value(self, vtype: int) -> Any:
        vtype = GGUFValueType(vtype)
        if vtype == GGUFValueType.STRING:
            return self._string()
        if vtype == GGUFValueType.ARRAY:
            etype = GGUFValueType(self._unpack("<I"))
            count = self._unpack("<Q")
            if count > self._size:
                raise GGUFFormatError(f"corrupt GGUF file {self.path!r}: array length {count} exceeds the file size")
            if etype in _NP_SCALARS:
                dt = np.dtype(_NP_SCALARS[etype]).newbyteorder("<")
                self._need(count * dt.itemsize)
                arr = np.frombuffer(self._buf, dt, count, self._pos)
                self._pos += count * dt.itemsize
                return arr.tolist()
            return [self._value(etype) for _ in range(count)]
        return self._unpack(_SCALARS[vtype])

    def _parse_header(self) -> None:
        self._need(4)
        if self._buf[:4] != b"GGUF":
            raise GGUFFormatError(f"not a GGUF file (bad magic {bytes(self._buf[:4])!r}): {self.path!r}")
        self._pos = 4
        self.version = self._unpack("<I")
        if self.version not in (2, 3):
            raise GGUFFormatError(f"unsupported GGUF version {self.version} in {self.path!r} (supported: 2, 3)")
        n_tensors, n_kv = self._unpack("<Q"), self._unpack("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            meta[key] = self._value(self._unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._unpack("<I")
            if n_dims > 8:
                raise GGUFFormatError(f"corrupt GGUF file {self.path!r}: tensor {name!r} has {n_dims} dimensions")
            dims = tuple(self._unpack("<Q") for _ in range(n_dims))
            raw_type = self._unpack("<I")
            offset = self._unpack("<Q")
            infos.append((name, dims, raw_type, offset))
        align = int(meta.get("general.alignment", 32))
        self.data_start = -(-self._pos // align) * align
        self.metadata = meta
        self._infos = infos

    def _map_tensors(self) -> None:
        self.tensors: list[GGUFTensor] = []
        seen = set()
        for name, dims, raw_type, offset in self._infos:
            if name in seen:
                raise GGUFFormatError(f"corrupt GGUF file {self.path!r}: duplicate tensor {name!r}")
            seen.add(name)
            try:
                qtype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise GGUFFormatError(f"tensor {name!r} has unknown GGML type id {raw_type} in {self.path!r}") from None
            n = int(np.prod(dims)) if dims else 1
            block, type_size = GGML_QUANT_SIZES[qtype]
            if n % block:
                raise GGUFFormatError(f"corrupt GGUF file {self.path!r}: tensor {name!r} of {n} values is not a "
                                      f"whole number of {qtype.name} blocks")
            nbytes = n * type_size // block
            begin = self.data_start + offset
            if begin + nbytes > self._size:
                raise GGUFFormatError(f"corrupt GGUF file {self.path!r}: tensor {name!r} data [{begin}, "
                                      f"{begin + nbytes}) runs past the end of the file ({self._size} bytes)")
            np_dims = tuple(reversed(dims))
            if qtype in _PLAIN:
                data = np.memmap(self.path, _PLAIN[qtype], "r", begin, shape=np_dims or (1,))
            else:
                data = np.memmap(self.path, np.uint8, "r", begin,
                                 shape=quant_shape_to_byte_shape(np_dims or (block,), qtype))
            self.tensors.append(GGUFTensor(name, qtype, dims, data))
