"""The tensors of checkpoint files, for the ``l1l2`` command, read without copying where the
format allows.

Every reader yields ``Tensor`` records: either a numpy view of the file's memory map (``array``)
or, where the bytes on disk are not the array's bytes (compressed zip members, chunked or filtered
HDF5 datasets), a function that yields the data in bounded pieces (``pieces``). Nothing reads a
whole file into memory.

- ``.npy``: ``np.load(mmap_mode="r")`` after checking the file's size against its header;
  ``allow_pickle=False``, so object arrays are refused, never unpickled.
- ``.npz``: stored members are mapped at their offset in the zip file (the npy header is parsed
  with ``numpy.lib.format``); compressed members are decompressed in pieces.
- ``.safetensors``: the header is parsed and validated by the ``safetensors`` crate
  (``_l1l2_rs.safetensors_layout``), the file mapped once with numpy, each tensor a view of it.
- ``*.index.json`` (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``) stands for
  the shards its ``weight_map`` lists, each read by its own ending.
- ``.h5`` / ``.weights.h5`` (h5py): contiguous datasets are mapped at ``ds.id.get_offset()``;
  chunked, compressed or unallocated ones are read through h5py, one chunk or slab at a time.
- ``.keras``: the ``model.weights.h5`` member, mapped at the member's offset plus the dataset's
  when it is stored uncompressed (as Keras writes it), else read through h5py.
- ``.pt`` / ``.pth`` / ``.bin`` (torch, when installed): ``torch.load(mmap=True,
  weights_only=True)``; the tensors' ``.numpy()`` views share the mapped storage.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import glob
import importlib
import importlib.util
import json
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

import numpy as np

from ._l1l2_rs import safetensors_layout

Array = np.ndarray[Any, np.dtype[Any]]

#: Bytes per piece when data has to be read or converted rather than mapped.
PIECE_BYTES = 16 << 20

#: File name endings of the formats read, as found in directories.
_SUFFIXES = (
    ".safetensors.index.json",
    ".bin.index.json",
    ".safetensors",
    ".npy",
    ".npz",
    ".weights.h5",
    ".h5",
    ".hdf5",
    ".keras",
    ".pt",
    ".pth",
    ".bin",
)

#: safetensors dtype names as numpy dtypes (the data is little-endian). The others (F8_*, F4, F6_*,
#: E8M0, complex) are types no kernel reads.
_SAFETENSORS_DTYPES = {
    "BOOL": "bool",
    "U8": "<u1",
    "I8": "<i1",
    "U16": "<u2",
    "I16": "<i2",
    "U32": "<u4",
    "I32": "<i4",
    "U64": "<u8",
    "I64": "<i8",
    "F16": "<f2",
    "F32": "<f4",
    "F64": "<f8",
}

# The fixed part of a zip local file header (APPNOTE 4.3.7): signature, then the lengths of the
# name and extra field at bytes 26 and 28; the member's data follows them.
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")
_ZIP_LOCAL_SIGNATURE = b"PK\x03\x04"


class CheckpointError(Exception):
    """A file that cannot be read as a checkpoint; the message says why."""


#: What reading a malformed or corrupt file can raise (a damaged deflate stream, a bad CRC, a
#: truncated member, an index nested past Python's recursion limit): each is reported as a
#: problem with that file, never a traceback.
READ_ERRORS: tuple[type[BaseException], ...] = (
    CheckpointError,
    OSError,
    ValueError,
    EOFError,
    RecursionError,
    zipfile.BadZipFile,
    zlib.error,
)


@dataclass
class Tensor:
    """One tensor of a file: its data mapped (``array``), in pieces (``pieces``), or ``error``."""

    name: str
    dtype: np.dtype[Any] | str
    shape: tuple[int, ...]
    array: Array | None = None
    pieces: Callable[[], Iterator[Array]] | None = None
    error: str | None = None

    @property
    def nbytes(self) -> int:
        if isinstance(self.dtype, str):
            return 0
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class Checkpoint:
    """The tensors of one file, and the index checks that concern it."""

    path: str
    format: str
    tensors: list[Tensor] = field(default_factory=list)
    #: (tensor name, message) of problems that concern no tensor read from the file.
    errors: list[tuple[str, str]] = field(default_factory=list)
    #: A shard of an index, not read yet, and the tensor names the index lists in it.
    pending: bool = False
    listed: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Which files: arguments, directories and globs.


@dataclass
class Inputs:
    """The files to read, in order, and one message for each argument that names none."""

    files: list[str] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)


def expand(arguments: Iterable[str]) -> Inputs:
    """The files named by ``arguments``: paths, directories (searched for known file endings) and
    glob patterns. A shard listed by an index among the inputs is read through the index only."""
    inputs = Inputs()
    for argument in arguments:
        if os.path.lexists(argument) or not glob.has_magic(argument):
            matches = [argument]
        else:
            matches = sorted(glob.glob(argument, recursive=True))
            if not matches:
                inputs.missing.append((argument, "no file matches this pattern"))
        for match in matches:
            if os.path.isdir(match):
                found = _search(match)
                if not found:
                    inputs.missing.append((match, "no checkpoint file in this directory"))
                inputs.files.extend(found)
            else:
                inputs.files.append(match)
    inputs.files = _without_repeats(inputs.files)
    return inputs


def _search(directory: str) -> list[str]:
    found: list[str] = []
    for root, directories, names in os.walk(directory):
        directories.sort()
        found.extend(os.path.join(root, name) for name in sorted(names) if _known(name))
    return found


def _known(name: str) -> bool:
    return name.endswith(_SUFFIXES)


def _without_repeats(files: list[str]) -> list[str]:
    """``files`` without second mentions of a file, nor the shards an index among them lists."""
    sharded: set[str] = set()
    for path in files:
        if path.endswith(".index.json"):
            with contextlib.suppress(*READ_ERRORS):
                sharded.update(os.path.realpath(shard) for shard in _shards(path)[0])
    seen, kept = set(), []
    for path in files:
        real = os.path.realpath(path)
        if real in seen or (real in sharded and not path.endswith(".index.json")):
            continue
        seen.add(real)
        kept.append(path)
    return kept


def total_bytes(files: Iterable[str]) -> int:
    """The size of the files on disk (shards of an index included), for the progress bar."""
    total = 0
    for path in files:
        with contextlib.suppress(*READ_ERRORS):
            shards = _shards(path)[0] if path.endswith(".index.json") else [path]
            total += sum(os.path.getsize(shard) for shard in shards)
    return total


# ---------------------------------------------------------------------------------------------
# Reading one file.


def read(path: str, stack: contextlib.ExitStack) -> list[Checkpoint]:
    """The checkpoints of ``path`` (the shards of an index, else the file itself); the files stay
    open (mapped) until ``stack`` closes. ``CheckpointError`` or ``OSError`` if it is unreadable."""
    if path.endswith(".index.json"):
        return _read_index(path)
    reader, format_name = _reader(path)
    return [Checkpoint(path, format_name, reader(path, stack))]


def _reader(path: str) -> tuple[Callable[[str, contextlib.ExitStack], list[Tensor]], str]:
    name = os.path.basename(path)
    for suffixes, reader, format_name in _READERS:
        if name.endswith(suffixes):
            return reader, format_name
    raise CheckpointError(f"unknown file type (expected one of {', '.join(_SUFFIXES)})")


def _shards(index_path: str) -> tuple[list[str], dict[str, str]]:
    """The shard files of an index, in order of first mention, and its tensor -> shard map."""
    with open(index_path, "rb") as file:
        try:
            index = json.load(file)
        except (ValueError, UnicodeDecodeError, RecursionError) as error:
            raise CheckpointError(f"not a JSON index: {error}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(shard, str) for shard in weight_map.values()
    ):
        raise CheckpointError('not a sharded checkpoint index (no "weight_map" of file names)')
    directory = os.path.dirname(index_path)
    located = {name: os.path.join(directory, shard) for name, shard in weight_map.items()}
    return list(dict.fromkeys(located.values())), located


def _read_index(index_path: str) -> list[Checkpoint]:
    """The shards of an index, each still to be read (``read_shard``) with the names the index
    says it holds."""
    shards, located = _shards(index_path)
    checkpoints = {shard: Checkpoint(shard, _format(shard), pending=True) for shard in shards}
    for name, shard in located.items():
        checkpoints[shard].listed.append(name)
    return list(checkpoints.values())


def _format(path: str) -> str:
    try:
        return _reader(path)[1]
    except CheckpointError:
        return "unknown"


def read_shard(checkpoint: Checkpoint, stack: contextlib.ExitStack) -> None:
    """Read a shard of an index: its tensors, and an error for every tensor the index lists in it
    that it does not hold."""
    reader, _ = _reader(checkpoint.path)
    checkpoint.tensors = reader(checkpoint.path, stack)
    checkpoint.pending = False
    held = {tensor.name for tensor in checkpoint.tensors}
    checkpoint.errors.extend(
        (name, "listed in the index but not in this shard")
        for name in checkpoint.listed
        if name not in held
    )


def _map(path: str) -> Array:
    """The whole file as a read-only uint8 memory map (an empty file: an empty array)."""
    if os.path.getsize(path) == 0:
        return np.empty(0, np.uint8)
    # Unmapped when the last view of it goes, after the file's tensors are summed.
    return np.memmap(path, dtype=np.uint8, mode="r")


def _view(
    mapped: Array, start: int, dtype: np.dtype[Any], count: int, end: int | None = None
) -> Array:
    """``count`` items of ``dtype`` at byte ``start`` of the map, as a flat view;
    ``CheckpointError`` when they do not lie whole before ``end`` (default: the map's end): a
    header that promises more than its file or member holds (or a file shortened since its header
    was read) must never be summed short, nor past into other bytes."""
    stop = start + count * dtype.itemsize
    limit = len(mapped) if end is None else min(end, len(mapped))
    if start < 0 or stop > limit:
        raise CheckpointError(
            f"the data ({count:,} x {dtype.itemsize} bytes at byte {start:,}) extends past the "
            f"end of its {'member' if end is not None else 'file'} (byte {limit:,})"
        )
    return mapped[start:stop].view(dtype)


# ---------------------------------------------------------------------------------------------
# safetensors


def _read_safetensors(path: str, stack: contextlib.ExitStack) -> list[Tensor]:
    try:
        layout = safetensors_layout(path)
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    mapped = _map(path)
    tensors = []
    for name, dtype_name, shape, start, end in layout:
        numpy_dtype = _safetensors_dtype(dtype_name)
        if numpy_dtype is None:
            tensors.append(Tensor(name, dtype_name, tuple(shape), error=_unreadable(dtype_name)))
            continue
        array = _view(mapped, start, numpy_dtype, (end - start) // numpy_dtype.itemsize)
        tensors.append(Tensor(name, numpy_dtype, tuple(shape), array=array))
    return tensors


def _safetensors_dtype(name: str) -> np.dtype[Any] | None:
    if name == "BF16":
        return _bfloat16()
    known = _SAFETENSORS_DTYPES.get(name)
    return None if known is None else np.dtype(known)


def numeric(dtype: np.dtype[Any]) -> bool:
    """Whether the core can sum ``dtype``: floats, bfloat16, integers and bool."""
    return dtype.kind in "fiub" or dtype == _bfloat16()


@functools.cache
def _bfloat16() -> np.dtype[Any] | None:
    """numpy's bfloat16 dtype from ml_dtypes, which the core reads; None without ml_dtypes."""
    if importlib.util.find_spec("ml_dtypes") is None:
        return None
    bfloat16: np.dtype[Any] = np.dtype(importlib.import_module("ml_dtypes").bfloat16)
    return bfloat16


def _unreadable(dtype_name: str) -> str:
    if dtype_name in {"BF16", "bfloat16"}:
        return "dtype bfloat16 needs the ml_dtypes package (pip install ml_dtypes)"
    return (
        f"dtype {dtype_name} is not supported (float16, bfloat16, float32, float64, integers "
        "and bool are)"
    )


# ---------------------------------------------------------------------------------------------
# .npy and .npz


class _Stream(Protocol):
    """A binary file or zip member: what the npy header readers need."""

    def read(self, size: int = -1, /) -> bytes: ...
    def tell(self) -> int: ...


def _npy_header(file: _Stream, size: int, what: str) -> tuple[np.dtype[Any], tuple[int, ...]]:
    """The dtype and shape of the npy data at ``file``'s position, which is left at the data;
    ``size`` is the number of bytes from the header's start to the end of the file or member."""
    start = file.tell()
    try:
        version = np.lib.format.read_magic(file)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(file)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(file)
        else:
            raise CheckpointError(f"npy format version {version} is not supported")
    except (ValueError, EOFError) as error:
        raise CheckpointError(f"malformed or truncated {what} header: {error}") from None
    if dtype.hasobject:
        raise CheckpointError(
            f"{what} holds Python objects (dtype {dtype}): refused, pickled data is never loaded"
        )
    header = file.tell() - start
    expected = math.prod(shape) * dtype.itemsize
    if size - header < expected:
        raise CheckpointError(
            f"truncated: the header promises {expected} bytes of data, the file size leaves "
            f"{size - header}"
        )
    return dtype, tuple(shape)


def _read_npy(path: str, stack: contextlib.ExitStack) -> list[Tensor]:
    with open(path, "rb") as file:
        if os.fstat(file.fileno()).st_size == 0:
            raise CheckpointError("empty file (no .npy header)")
        dtype, shape = _npy_header(file, os.fstat(file.fileno()).st_size, ".npy")
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    return [Tensor(os.path.basename(path), dtype, shape, array=array)]


def _read_npz(path: str, stack: contextlib.ExitStack) -> list[Tensor]:
    try:
        archive = stack.enter_context(zipfile.ZipFile(path))
    except zipfile.BadZipFile as error:
        raise CheckpointError(f"not a zip archive: {error}") from None
    mapped = _map(path)
    file = stack.enter_context(open(path, "rb"))
    tensors = []
    for member in archive.infolist():
        name = member.filename.removesuffix(".npy")
        try:
            tensors.append(_npz_member(archive, member, mapped, file, name))
        except (CheckpointError, zipfile.BadZipFile, NotImplementedError, RuntimeError) as error:
            tensors.append(Tensor(name, "?", (), error=str(error)))
    return tensors


def _npz_member(
    archive: zipfile.ZipFile, member: zipfile.ZipInfo, mapped: Array, file: BinaryIO, name: str
) -> Tensor:
    if member.compress_type != zipfile.ZIP_STORED or member.flag_bits & 0x1:
        with archive.open(member) as stream:
            dtype, shape = _npy_header(stream, member.file_size, "member")
        return Tensor(name, dtype, shape, pieces=functools.partial(_npz_pieces, archive, member))
    start = zip_member_start(file, member)
    file.seek(start)
    dtype, shape = _npy_header(file, member.file_size, "member")
    end = zip_member_end(archive, member, start)
    return Tensor(
        name, dtype, shape, array=_view(mapped, file.tell(), dtype, math.prod(shape), end)
    )


def zip_member_start(file: BinaryIO, member: zipfile.ZipInfo) -> int:
    """The file offset of a stored zip member's data: past its local header, whose name and
    extra field lengths can differ from the central directory's."""
    file.seek(member.header_offset)
    header = file.read(_ZIP_LOCAL_HEADER.size)
    if len(header) < _ZIP_LOCAL_HEADER.size:
        raise CheckpointError(f"{member.filename}: truncated zip member header")
    signature, name_length, extra_length = _ZIP_LOCAL_HEADER.unpack(header)
    if signature != _ZIP_LOCAL_SIGNATURE:
        raise CheckpointError(f"{member.filename}: malformed zip member header")
    start: int = member.header_offset + _ZIP_LOCAL_HEADER.size + name_length + extra_length
    return start


def _npz_pieces(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> Iterator[Array]:
    """A compressed member's data, decompressed a piece at a time."""
    with archive.open(member) as stream:
        dtype, shape = _npy_header(stream, member.file_size, "member")
        remaining = math.prod(shape)
        per_piece = max(1, PIECE_BYTES // max(dtype.itemsize, 1))
        while remaining:
            count = min(per_piece, remaining)
            data = stream.read(count * dtype.itemsize)
            if len(data) < count * dtype.itemsize:
                raise CheckpointError("truncated compressed member")
            yield np.frombuffer(data, dtype)
            remaining -= count


# ---------------------------------------------------------------------------------------------
# HDF5 and .keras


def _h5py() -> Any:
    """h5py, imported on first use: only HDF5 files need it."""
    try:
        return importlib.import_module("h5py")
    except ImportError:
        raise CheckpointError("reading HDF5 files needs h5py (pip install h5py)") from None


def _read_h5(path: str, stack: contextlib.ExitStack) -> list[Tensor]:
    h5py = _h5py()
    try:
        h5 = stack.enter_context(h5py.File(path, "r"))
    except OSError as error:
        raise CheckpointError(f"not a readable HDF5 file: {error}") from None
    return _h5_tensors(h5, _map(path), 0)


def _read_keras(path: str, stack: contextlib.ExitStack) -> list[Tensor]:
    h5py = _h5py()
    try:
        archive = stack.enter_context(zipfile.ZipFile(path))
        member = archive.getinfo("model.weights.h5")
    except (zipfile.BadZipFile, KeyError) as error:
        raise CheckpointError(f"not a Keras 3 archive with model.weights.h5: {error}") from None
    stream = stack.enter_context(archive.open(member))
    h5 = stack.enter_context(h5py.File(stream, "r"))
    if member.compress_type != zipfile.ZIP_STORED:
        return _h5_tensors(h5, None, 0)  # compressed: read through h5py
    with open(path, "rb") as file:
        start = zip_member_start(file, member)
    return _h5_tensors(h5, _map(path), start, zip_member_end(archive, member, start))


def zip_member_end(archive: zipfile.ZipFile, member: zipfile.ZipInfo, start: int) -> int:
    """Where a stored member's data must end: its size says so, but that size comes from the
    zip's directory, which a damaged or hostile file can enlarge; the data can never reach the
    next member's header or the directory itself, so it ends before those too."""
    boundaries = [
        other.header_offset
        for other in archive.infolist()
        if other.header_offset > member.header_offset
    ]
    boundaries.append(getattr(archive, "start_dir", start + member.compress_size))
    return min(start + member.compress_size, *boundaries)


def _h5_tensors(h5: Any, mapped: Array | None, base: int, end: int | None = None) -> list[Tensor]:
    """Every dataset of ``h5``, mapped at ``base`` + its offset when it is stored contiguously
    inside ``mapped`` (bytes ``base`` to ``end``), else read through h5py in pieces."""
    datasets: list[tuple[str, Any]] = []
    h5py = _h5py()
    h5.visititems(
        lambda name, item: datasets.append((name, item)) if isinstance(item, h5py.Dataset) else None
    )
    limit = None if mapped is None else len(mapped) if end is None else min(end, len(mapped))
    tensors = []
    for name, dataset in datasets:
        dtype, shape = dataset.dtype, tuple(dataset.shape)
        if not numeric(dtype):
            tensors.append(Tensor(name, str(dtype), shape, error=_unreadable(str(dtype))))
            continue
        offset = dataset.id.get_offset()
        count = math.prod(shape)
        if mapped is not None and offset is not None and dataset.chunks is None:
            start = base + offset
            if limit is not None and start + count * dtype.itemsize > limit:
                tensors.append(
                    Tensor(name, dtype, shape, error="dataset extends past the end of the file")
                )
                continue
            tensors.append(Tensor(name, dtype, shape, array=_view(mapped, start, dtype, count)))
        else:
            tensors.append(
                Tensor(name, dtype, shape, pieces=functools.partial(_h5_pieces, dataset))
            )
    return tensors


def _h5_pieces(dataset: Any) -> Iterator[Array]:
    """A dataset that is not stored as one contiguous block, read one chunk (or slab) at a time."""
    if dataset.shape == () or dataset.size == 0:
        yield np.asarray(dataset[()]).reshape(-1)
        return
    if dataset.chunks is not None:
        for chunk in dataset.iter_chunks():
            yield np.asarray(dataset[chunk]).reshape(-1)
        return
    row_bytes = max(1, dataset.dtype.itemsize * math.prod(dataset.shape[1:]))
    rows = max(1, PIECE_BYTES // row_bytes)
    for start in range(0, dataset.shape[0], rows):
        yield np.asarray(dataset[start : start + rows]).reshape(-1)


# ---------------------------------------------------------------------------------------------
# torch


def _read_torch(path: str, stack: contextlib.ExitStack) -> list[Tensor]:
    if importlib.util.find_spec("torch") is None:
        raise CheckpointError("reading PyTorch files needs torch (pip install torch)")
    import torch

    try:
        loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # torch raises many types for a file it cannot load safely
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise CheckpointError(
            f"not loadable with torch.load(weights_only=True): {message}"
        ) from None
    # The mapping lives as long as the tensors do.
    return [_torch_tensor(torch, name, value) for name, value in _flatten(loaded, "")]


def _flatten(value: object, prefix: str) -> Iterator[tuple[str, Any]]:
    """The tensors of nested dicts, lists and tuples, with dotted names (other values skipped)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}{key}.")
    elif isinstance(value, (list, tuple)):
        for position, item in enumerate(value):
            yield from _flatten(item, f"{prefix}{position}.")
    elif type(value).__module__.startswith("torch") and hasattr(value, "dtype"):
        yield prefix.removesuffix("."), value


def _torch_tensor(torch: Any, name: str, value: Any) -> Tensor:
    shape = tuple(value.shape)
    dtype_name = str(value.dtype).removeprefix("torch.")
    if value.layout != torch.strided or value.is_quantized:
        return Tensor(name, dtype_name, shape, error=f"{value.layout} tensors are not supported")
    if value.dtype == torch.bfloat16:
        bfloat16 = _bfloat16()
        if bfloat16 is None:
            return Tensor(name, dtype_name, shape, error=_unreadable("bfloat16"))
        array = value.view(torch.int16).numpy().view(bfloat16)
        return Tensor(name, bfloat16, shape, array=array)
    try:
        array = value.numpy()
    except (TypeError, RuntimeError):
        return Tensor(name, dtype_name, shape, error=_unreadable(dtype_name))
    return Tensor(name, array.dtype, shape, array=array)


_READERS: list[tuple[tuple[str, ...], Callable[[str, contextlib.ExitStack], list[Tensor]], str]] = [
    ((".safetensors",), _read_safetensors, "safetensors"),
    ((".npy",), _read_npy, "npy"),
    ((".npz",), _read_npz, "npz"),
    ((".h5", ".hdf5"), _read_h5, "hdf5"),
    ((".keras",), _read_keras, "keras"),
    ((".pt", ".pth", ".bin"), _read_torch, "torch"),
]


def name_matches(name: str, patterns: list[str]) -> bool:
    """Whether a tensor name matches one of the ``--filter`` glob patterns (all match if none)."""
    return not patterns or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
