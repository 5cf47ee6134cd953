"""Reader for the IDX format used by MNIST-like datasets (plain or gzip-compressed)."""

from __future__ import annotations

import gzip
import math
import os
import zlib

import numpy as np
import torch

# IDX type code -> big-endian numpy dtype
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an IDX file into a tensor with the header's shape.

    Gzip input is detected by its magic bytes (1f 8b). The header is ``00 00 <type> <ndim>``
    followed by ``ndim`` big-endian uint32 sizes. Supported types: uint8, int8, int16, int32,
    float32, float64. Raises ValueError on a bad header, truncated data or trailing bytes.
    """
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from e
    if len(data) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: bad IDX magic {data[:4].hex()} (expected 0000<type><ndim>)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unsupported IDX type code 0x{code:02x}")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} < {header} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    count = math.prod(shape)
    expected = header + count * dtype.itemsize
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "trailing bytes in"
        raise ValueError(
            f"{path}: {kind} IDX data: {len(data)} bytes, expected {expected} for shape {shape}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header)
    arr = arr.astype(dtype.newbyteorder("="), copy=True).reshape(shape)
    return torch.from_numpy(arr)
