"""Read a ``torch.save``d state_dict into numpy arrays, without torch and without running code.

Why: the operator only needs a checkpoint's weights, and importing torch to read them costs
about 190 MB of memory per process. Why not plain ``pickle.load``: a pickle can call any
importable function, so a checkpoint from elsewhere could run code. This reader gives the
guarantee of ``torch.load(..., weights_only=True)`` on its own: the unpickler resolves only the
few names a state_dict of plain tensors refers to (``collections.OrderedDict``,
``torch._utils._rebuild_tensor_v2`` and the typed storage names), each mapped to a numpy
builder, and refuses every other name before anything is called.

The format (torch >= 1.6, the zip serialisation): one top folder ``<name>/`` holding
``data.pkl`` (the pickled object graph, storages as persistent ids
``("storage", <storage type>, <key>, <location>, <numel>)``), ``data/<key>`` (each storage's
raw bytes), and ``byteorder`` (``little`` or ``big``; torch assumes the native order when it is
absent). Only contiguous tensors are supported, which is all a state_dict contains.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "f8",
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "b1",
    "ComplexDoubleStorage": "c16",
    "ComplexFloatStorage": "c8",
}
"""torch's legacy typed storage names (what ``torch.save`` writes for these dtypes) and the
numpy type code of one element, byte order applied separately."""


class ArchiveError(ValueError):
    """The file is not a torch state_dict archive this reader accepts (or it is unsafe)."""


class _StorageType:
    """What the unpickler hands out for ``torch.<Name>Storage``: only its element type."""

    __slots__ = ("code", "name")

    def __init__(self, name: str, code: str):
        self.name, self.code = name, code


class _Storage:
    """One storage's elements, a 1-D numpy array (``persistent_load``'s result)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> np.ndarray:
    """numpy stand-in for ``torch._utils._rebuild_tensor_v2``: a contiguous view of its
    storage, not a copy. Tensors share a storage as torch's do, so a pickle that rebuilds
    one storage a thousand times costs a thousand small views, not a thousand times its
    memory."""
    if not isinstance(storage, _Storage):
        raise ArchiveError("a tensor refers to something that is not a storage")
    if not (
        isinstance(storage_offset, int)
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(isinstance(n, int) and n >= 0 for n in (storage_offset, *size, *stride))
    ):
        raise ArchiveError(
            f"a tensor has a malformed offset/size/stride: {storage_offset!r}, {size!r}, {stride!r}"
        )
    if backward_hooks:
        raise ArchiveError("a tensor carries backward hooks; a state_dict has none")
    numel = math.prod(size)
    if numel and any(
        n > 1 and s != want for n, s, want in zip(size, stride, _contiguous(size), strict=True)
    ):
        raise ArchiveError(
            f"a tensor of size {size} has stride {stride}: only contiguous tensors are "
            "supported (save tensor.contiguous())"
        )
    if storage_offset + numel > storage.array.size:
        raise ArchiveError(
            f"a tensor of size {size} at offset {storage_offset} overruns its storage of "
            f"{storage.array.size} elements"
        )
    flat = storage.array[storage_offset : storage_offset + numel]
    return flat.reshape(size)


def _contiguous(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


class _StateDictUnpickler(pickle.Unpickler):
    """Resolves only the names a state_dict of plain tensors needs; storages from the zip."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.order = (
            archive,
            prefix,
            "<" if byteorder == "little" else ">",
        )
        self.storages: dict[str, _Storage] = {}
        self.allowed: dict[tuple[str, str], Any] = {
            ("collections", "OrderedDict"): OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
            **{("torch", n): _StorageType(n, code) for n, code in STORAGE_DTYPES.items()},
        }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise ArchiveError(
                f"refused global {module}.{name}: a weights file may only refer to "
                "collections.OrderedDict, torch._utils._rebuild_tensor_v2 and torch storage "
                "types (this file is not a plain state_dict, or it tries to run code)"
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[4], int)
        ):
            raise ArchiveError(f"unsupported persistent id {pid!r}: expected a torch storage")
        _, kind, key, _location, numel = pid
        if key in self.storages:
            return self.storages[key]
        try:
            raw = self.archive.read(f"{self.prefix}data/{key}")
        except KeyError:
            raise ArchiveError(f"storage {key!r} is missing from the archive") from None
        dtype = np.dtype(self.order + kind.code)
        if len(raw) < numel * dtype.itemsize:
            raise ArchiveError(
                f"storage {key!r} has {len(raw)} bytes, {numel} x {kind.name} need "
                f"{numel * dtype.itemsize}"
            )
        array = np.frombuffer(raw, dtype=dtype, count=numel).astype(dtype.newbyteorder("="))
        self.storages[key] = _Storage(array)
        return self.storages[key]


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The ``{name: array}`` of a file written by ``torch.save(module.state_dict(), path)``.

    Raises :class:`ArchiveError` for anything else (naming the refused global when the
    pickle refers to one), before any of it is called. A damaged file is one too: whatever
    zipfile or the unpickler trips on (a bad CRC, a truncated header, a name that is not
    UTF-8) is the file's fault, so a caller has one error to report, not a dozen."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ArchiveError(
            f"{path} is not a torch zip archive ({exc}); the legacy torch.save format is not "
            "read here"
        ) from exc
    except Exception as exc:
        raise ArchiveError(f"{path}: damaged archive: {exc!r}") from exc
    try:
        with archive:
            state = _read(archive)
    except ArchiveError as exc:
        raise ArchiveError(f"{path}: {exc}") from None
    except Exception as exc:
        raise ArchiveError(f"{path}: damaged archive: {exc!r}") from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items()
    ):
        raise ArchiveError(f"{path}: not a state_dict (a mapping of names to tensors)")
    return dict(state)


def _read(archive: zipfile.ZipFile) -> Any:
    """The object ``archive``'s one ``<name>/data.pkl`` pickles, storages read from it.
    torch stores every entry uncompressed; a compressed one is refused, so nothing read can
    be larger than the file itself (a ConfigMap of 1 MiB could otherwise inflate a
    thousandfold)."""
    packed = [i.filename for i in archive.infolist() if i.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise ArchiveError(f"compressed entries {packed[:3]}: torch.save stores them as they are")
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise ArchiveError(f"expected one <name>/data.pkl, found {pickles}")
    prefix = pickles[0][: -len("data.pkl")]
    try:
        byteorder = archive.read(prefix + "byteorder").decode("ascii").strip()
    except KeyError:
        byteorder = sys.byteorder
    if byteorder not in ("little", "big"):
        raise ArchiveError(f"unknown byte order {byteorder!r}")
    data = archive.read(pickles[0])
    _check_memo(data)
    return _StateDictUnpickler(data, archive, prefix, byteorder).load()


MEMO_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})


def _check_memo(data: bytes) -> None:
    """Refuses a memo index past the pickle's own length, read without unpickling. The C
    unpickler grows its memo to twice the largest index it is told to store at and zeroes
    it, so one damaged or hostile ``LONG_BINPUT 1479026690`` (one flipped byte of a real
    checkpoint) asks for about 24 GB and took a minute before the load failed. A real
    pickle numbers its memo from 0, at least two bytes per entry, so its indices stay below
    its length."""
    for opcode, index, position in pickletools.genops(data):
        if opcode.name in MEMO_OPCODES and index >= len(data):
            raise ArchiveError(
                f"memo index {index} at byte {position} of a {len(data)}-byte pickle: damaged "
                "or hostile"
            )
