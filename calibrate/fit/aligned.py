"""Arrays in a safetensors file with every array on a 64-byte boundary, read back memory-mapped.

A standard safetensors file (``safetensors.safe_open`` reads it; no pickle): the header is padded
with spaces and unused bytes between arrays are ``__pad.<k>`` uint8 tensors, so each array starts on
a 64-byte boundary. :func:`map_arrays` maps the file read-only and returns views of it: no read and
no copy, and on CPU ``jax.device_put`` of such a view is zero-copy (JAX aliases 64-byte aligned host
buffers). Integrity: :func:`sampled_digest` (a few pages of every array, cheap on every load) and
:func:`full_checksums` (a sha256 per array, in threads); :func:`record_verified` stamps the file's
size, inode, mtime and ctime after a full check, and :func:`verified` says whether the file is still
that file (any write or replace changes its ctime or inode). The padding must be zero bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from calibrate.core.files import atomic_file

log = logging.getLogger(__name__)
ALIGN = 64
PAD = "__pad."
DTYPES = {"float32": "F32", "float64": "F64", "int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64",
          "uint8": "U8", "uint16": "U16", "uint32": "U32", "uint64": "U64", "bool": "BOOL"}
NUMPY = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20  # safetensors' own limit
SAMPLE_PAGE, SAMPLE_EVERY = 4096, 1 << 20  # sampled digest: the first and last page, then a page per MiB


def _entries(arrays: dict[str, np.ndarray]) -> tuple[dict, list[tuple[int, np.ndarray | int]]]:
    """Header entries (with padding tensors) and the file's data parts in order (arrays or pad sizes)."""
    entries: dict = {}
    parts: list[tuple[int, np.ndarray | int]] = []
    offset = 0
    for name, array in arrays.items():
        if array.dtype.name not in DTYPES or name.startswith(PAD):
            raise ValueError(f"array {name} of dtype {array.dtype} cannot be stored")
        pad = -offset % ALIGN
        if pad:
            entries[f"{PAD}{len(parts)}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [offset, offset + pad]}
            parts.append((offset, pad))
            offset += pad
        entries[name] = {"dtype": DTYPES[array.dtype.name], "shape": list(array.shape),
                         "data_offsets": [offset, offset + array.nbytes]}
        parts.append((offset, array))
        offset += array.nbytes
    return entries, parts


def write_arrays(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write ``arrays`` (names in file order) and string ``metadata`` to ``path`` atomically."""
    entries, parts = _entries(arrays)
    header = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    header += b" " * (-(8 + len(header)) % ALIGN)
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)))
        fh.write(header)
        for _, part in parts:
            if isinstance(part, int):
                fh.write(bytes(part))
            elif part.nbytes:
                fh.write(memoryview(np.ascontiguousarray(part).reshape(-1).view(np.uint8)))  # type: ignore[arg-type]


def map_arrays(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """(metadata, read-only arrays mapped from ``path``); ValueError for anything but such a whole file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("file too short for a header")
        (n_header,) = struct.unpack("<Q", head)
        if n_header > min(MAX_HEADER, size - 8):
            raise ValueError("header length beyond the file")
        header = json.loads(fh.read(n_header))
    if not isinstance(header, dict):
        raise ValueError("header is not a table of arrays")
    metadata = header.pop("__metadata__", {}) or {}
    start = 8 + n_header
    end = max((int(e["data_offsets"][1]) for e in header.values()), default=0)
    if start + end != size:
        raise ValueError(f"file holds {size} bytes, its header describes {start + end}")
    buffer = _mapped(path, size) if size > start else np.zeros(0, np.uint8)
    arrays = {}
    for name, entry in header.items():
        dtype, shape = np.dtype(NUMPY[entry["dtype"]]), tuple(int(d) for d in entry["shape"])
        a, b = (int(x) for x in entry["data_offsets"])
        if b - a != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or a < 0 or a > b:
            raise ValueError(f"array {name}: offsets do not match its shape")
        arrays[name] = buffer[start + a:start + b].view(dtype).reshape(shape)
    if any(np.any(arrays.pop(name)) for name in [k for k in arrays if k.startswith(PAD)]):
        raise ValueError("padding bytes between arrays are not zero")
    return metadata, arrays


def _mapped(path: Path, size: int) -> np.ndarray:
    """The whole file mapped read-only, its pages mapped at once (MAP_POPULATE, where there is one): a
    first pass over lazily mapped pages of the page cache cost three times a later one."""
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), size, flags=flags, prot=mmap.PROT_READ)
    return np.frombuffer(mapped, dtype=np.uint8)


def _bytes(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(memoryview(_bytes(array))).hexdigest()  # type: ignore[arg-type]  # ndarray is a buffer


def full_checksums(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """sha256 of every array (threads: hashlib releases the GIL)."""
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        return dict(zip(arrays, pool.map(_sha256, arrays.values())))


def sampled_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 of every array's name, dtype, shape, first and last page and one page per MiB."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        raw = _bytes(arrays[name])
        digest.update(f"{name}{arrays[name].dtype.str}{arrays[name].shape}".encode())
        starts = sorted({0, max(raw.size - SAMPLE_PAGE, 0), *range(SAMPLE_EVERY, raw.size, SAMPLE_EVERY)})
        for s in starts:
            digest.update(memoryview(raw[s:s + SAMPLE_PAGE]))  # type: ignore[arg-type]
    return digest.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stat(path: Path) -> dict[str, int]:
    st = os.stat(path)
    return {"size": st.st_size, "ino": st.st_ino, "dev": st.st_dev, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def verified(path: Path) -> bool:
    """Whether ``path`` is unchanged since :func:`record_verified` stamped it."""
    try:
        return json.loads(_stamp_path(Path(path)).read_text()) == _stat(Path(path))
    except (OSError, ValueError):
        return False


def record_verified(path: Path) -> None:
    """Stamp ``path`` as checked (its size, inode, mtime and ctime beside it); a failed write only logs."""
    path = Path(path)
    try:
        stamp = json.dumps(_stat(path))
        with atomic_file(_stamp_path(path)) as tmp:
            tmp.write_text(stamp)
    except OSError as exc:
        log.debug("no verification stamp for %s (%s)", path, exc)
