"""A restricted reader for NVlabs/edm and NVlabs/edm2 network pickles: it decodes data and never imports or runs
pickled code.

EDM and EDM2 pickle every network class through `torch_utils.persistence`, which stores the class's module
source (`meta['module_src']`) and `exec`s it when unpickling, so `pickle.load` on such a file runs whatever the
file says. This reader resolves only the globals an EDM / EDM2 snapshot needs, each to a local stand-in:

    torch_utils.persistence._reconstruct_persistent_obj -> ModuleRecord(class_name, state); module_src dropped
    torch.nn.modules.container.ModuleDict               -> ModuleRecord('ModuleDict', state)
    collections.OrderedDict                             -> collections.OrderedDict
    dnnlib.util.EasyDict                                -> dict (EDM2's snapshot dict)
    torch._utils._rebuild_tensor_v2 / _rebuild_parameter -> tensors over the decoded storages
    torch.storage._load_from_bytes                      -> a storage decoded from its legacy torch.save
                                                           stream by a nested reader that resolves only
                                                           torch.<Type>Storage
    numpy.dtype, numpy.core / numpy._core .multiarray.scalar -> Python numbers (numeric dtypes only)
    numpy.core / numpy._core .multiarray._reconstruct, numpy.ndarray -> NumpyArrayRecord (numeric dtypes only;
                                                           EDM2's StabilityVAEEncoder keeps its scale / bias so)

Any other global (os.system, builtins.eval, subprocess.Popen, a dotted attribute path ...) and any
persistent class that is not one of EDM's or EDM2's raises `UnsafePickleError` before anything is called.
"""

from __future__ import annotations

import collections
import io
import pickle
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np
import torch

from guidebench.checkpoints import CheckpointError

EDM_CLASSES = frozenset({
    # training/networks.py
    "Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding", "FourierEmbedding", "SongUNet",
    "DhariwalUNet", "VPPrecond", "VEPrecond", "iDDPMPrecond", "EDMPrecond",
    # training/loss.py, training/augment.py (also in training snapshots)
    "VPLoss", "VELoss", "EDMLoss", "AugmentPipe",
})
EDM2_CLASSES = frozenset({
    "MPFourier", "MPConv", "Block", "UNet", "Precond",  # training/networks_edm2.py
    "Encoder", "StandardRGBEncoder", "StabilityVAEEncoder",  # training/encoders.py
    "EDM2Loss",  # training/training_loop.py
})
PERSISTENT_CLASSES = EDM_CLASSES | EDM2_CLASSES
PERSISTENCE_VERSION = 6  # torch_utils.persistence._version of NVlabs/edm and NVlabs/edm2
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization's legacy (non-zip) format
LEGACY_PROTOCOL = 1001
STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class UnsafePickleError(CheckpointError):
    """The pickle references something outside the allowlist; nothing it names was imported or called."""


class ModuleRecord:
    """A pickled module as plain data: its class name and its `__dict__`.

    For torch modules the state holds `_parameters`, `_buffers`, `_modules` (OrderedDicts), the
    constructor arguments `_init_args` / `_init_kwargs` (EDM's persistence) and plain attributes.
    """

    def __init__(self, class_name: str, state: dict):
        self.class_name = class_name
        self.state = state

    def __repr__(self) -> str:
        return f"ModuleRecord({self.class_name!r}, keys={sorted(self.state)})"


class _ModuleDictRecord(ModuleRecord):
    """Stand-in for torch.nn.ModuleDict: created by NEWOBJ, filled by BUILD."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise UnsafePickleError(f"ModuleDict state is a {type(state).__name__}, expected a dict")
        self.class_name = "ModuleDict"
        self.state = state


def _reconstruct_persistent_obj(meta: Any) -> ModuleRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise UnsafePickleError("malformed torch_utils.persistence record (expected type='class' and a state dict)")
    name = meta.get("class_name")
    if name not in PERSISTENT_CLASSES:
        raise UnsafePickleError(f"refusing persistent class {name!r}: not one of EDM's or EDM2's classes "
                                f"{sorted(PERSISTENT_CLASSES)} (its pickled module_src is never executed)")
    if meta.get("version") != PERSISTENCE_VERSION:
        raise UnsafePickleError(f"persistent class {name!r} has persistence version {meta.get('version')!r}, "
                                f"NVlabs/edm and edm2 write {PERSISTENCE_VERSION}")
    return ModuleRecord(name, meta["state"])


class _Storage(NamedTuple):
    flat: torch.Tensor  # 1-D, the storage's elements


class _StorageRef(NamedTuple):
    key: str
    dtype: torch.dtype
    numel: int


class _DataUnpickler(pickle.Unpickler):
    """Pure data: every global and persistent id is refused."""

    what = "a legacy torch.save header"

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(f"refusing global {module}.{name} in {self.what}")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"unexpected persistent id {pid!r} in {self.what}")


class _StorageUnpickler(_DataUnpickler):
    """The storage pickle of a legacy torch.save stream: only torch.<Type>Storage and one storage id."""

    what = "a legacy torch.save storage record"

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> _StorageRef:
        ok = (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
              and isinstance(pid[2], str) and isinstance(pid[3], str) and isinstance(pid[4], int) and pid[4] >= 0
              and pid[5] is None)
        if not ok:
            raise UnsafePickleError(f"malformed storage id {pid!r} in {self.what}")
        return _StorageRef(pid[2], pid[1], pid[4])


def _load_from_bytes(data: Any) -> _Storage:
    """Decode one storage saved by torch's legacy serializer (magic, protocol, sys_info, record, keys, data)."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError(f"torch.storage._load_from_bytes got a {type(data).__name__}, expected bytes")
    f = io.BytesIO(data)
    try:
        magic, protocol = _DataUnpickler(f).load(), _DataUnpickler(f).load()
        sys_info = _DataUnpickler(f).load()
        ref = _StorageUnpickler(f).load()
        keys = _DataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise UnsafePickleError(f"corrupt legacy torch.save storage stream ({e})") from None
    if magic != LEGACY_MAGIC or protocol != LEGACY_PROTOCOL:
        raise UnsafePickleError(f"storage bytes are not a legacy torch.save stream (magic {magic!r}, "
                                f"protocol {protocol!r})")
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True or sys.byteorder != "little":
        raise UnsafePickleError("only little-endian storages on a little-endian machine are supported")
    if not isinstance(ref, _StorageRef) or keys != [ref.key]:
        raise UnsafePickleError(f"storage stream holds {type(ref).__name__} with keys {keys!r}, expected one storage")
    numel = int.from_bytes(f.read(8), "little")
    itemsize = torch.empty(0, dtype=ref.dtype).element_size()
    raw = f.read(numel * itemsize)
    if numel != ref.numel or len(raw) != numel * itemsize or f.read(1):
        raise UnsafePickleError(f"storage {ref.key}: {ref.numel} elements declared, data does not match")
    flat = torch.frombuffer(bytearray(raw), dtype=ref.dtype) if numel else torch.empty(0, dtype=ref.dtype)
    return _Storage(flat)


def _is_int_tuple(v: Any) -> bool:
    return isinstance(v, tuple) and all(isinstance(i, int) and i >= 0 for i in v)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, metadata: Any = None) -> torch.Tensor:
    if not isinstance(storage, _Storage):
        raise UnsafePickleError(f"tensor rebuilt from a {type(storage).__name__}, expected a decoded storage")
    layout_ok = isinstance(storage_offset, int) and storage_offset >= 0 and _is_int_tuple(size)
    if not (layout_ok and _is_int_tuple(stride) and len(size) == len(stride)):
        raise UnsafePickleError(f"malformed tensor layout offset={storage_offset!r} size={size!r} stride={stride!r}")
    if backward_hooks or metadata:
        raise UnsafePickleError("tensors with backward hooks or python metadata are not supported")
    if all(size) and storage_offset + sum((s - 1) * st for s, st in zip(size, stride)) >= len(storage.flat):
        raise UnsafePickleError(f"tensor of size {size} at offset {storage_offset} exceeds its storage "
                                f"({len(storage.flat)} elements)")
    return storage.flat.as_strided(size, stride, storage_offset)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor) or backward_hooks:
        raise UnsafePickleError("malformed parameter record")
    return data


class _NumpyDType:
    """numpy.dtype stand-in for numeric types; BUILD sets the byte order."""

    def __init__(self, spec: Any):
        if not isinstance(spec, str):
            raise UnsafePickleError(f"refusing numpy.dtype({spec!r}): expected a type code")
        self.dtype = np.dtype(spec)
        if self.dtype.kind not in "biufc":
            raise UnsafePickleError(f"refusing numpy.dtype({spec!r}): only numeric scalars and arrays are allowed")

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise UnsafePickleError(f"malformed numpy dtype state {state!r}")
        if state[1] in "<>":
            self.dtype = self.dtype.newbyteorder(state[1])


def _numpy_dtype(spec: Any, align: Any = False, copy: Any = False) -> _NumpyDType:
    return _NumpyDType(spec)


def _numpy_scalar(dtype: Any, data: Any) -> int | float | complex | bool:
    if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise UnsafePickleError("malformed numpy scalar")
    return np.frombuffer(data, dtype.dtype)[0].item()


class NumpyArrayRecord:
    """A pickled numeric numpy array: `_reconstruct(ndarray, (0,), b'b')`, then BUILD with
    (version 1, shape, dtype, is_fortran, raw bytes) fills `array`."""

    array: np.ndarray

    def __setstate__(self, state: Any) -> None:
        ok = (isinstance(state, tuple) and len(state) == 5 and state[0] == 1 and _is_int_tuple(state[1])
              and isinstance(state[2], _NumpyDType) and isinstance(state[3], bool) and isinstance(state[4], bytes))
        if not ok:
            raise UnsafePickleError("malformed numpy array state")
        _, shape, dtype, fortran, data = state
        if len(data) != int(np.prod(shape)) * dtype.dtype.itemsize:
            raise UnsafePickleError(f"numpy array of shape {shape} ({dtype.dtype}) holds {len(data)} bytes")
        self.array = np.frombuffer(data, dtype.dtype).reshape(shape, order="F" if fortran else "C").copy()


class _NumpyNDArray:
    """numpy.ndarray, only as the class argument of `_reconstruct`."""


def _numpy_reconstruct(cls: Any, shape: Any, typecode: Any) -> NumpyArrayRecord:
    if cls is not _NumpyNDArray or shape != (0,) or typecode != b"b":
        raise UnsafePickleError("numpy _reconstruct is only allowed as ndarray's own pickling")
    return NumpyArrayRecord()


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch.nn.modules.container", "ModuleDict"): _ModuleDictRecord,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "ndarray"): _NumpyNDArray,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("dnnlib.util", "EasyDict"): dict,
}


class _NetworkUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            allowed = ", ".join(f"{m}.{n}" for m, n in ALLOWED_GLOBALS)
            raise UnsafePickleError(f"refusing global {module}.{name}: an EDM / EDM2 network pickle only "
                                    f"references {allowed}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"unexpected persistent id {pid!r} (EDM / EDM2 pickles embed their storages)")


def read_network_pickle(path: str | Path) -> Any:
    """The top-level object of an EDM / EDM2 pickle (a dict such as {'ema': ModuleRecord, ...}), as data."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _NetworkUnpickler(f).load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"cannot read {path} as an NVlabs/edm or edm2 network pickle "
                              f"({type(e).__name__}: {e})") from e


# The network classes of each family's snapshots and the guidebench loader that builds them.
SNAPSHOT_LOADERS = {"EDMPrecond": ("NVlabs/edm", "guidebench.backbones.edm"),
                    "iDDPMPrecond": ("NVlabs/edm", "guidebench.backbones.edm"),
                    "Precond": ("NVlabs/edm2", "guidebench.backbones.edm2")}


def build_snapshot_network(path: Path, key: str, source: str, networks: Mapping[str, Callable[..., torch.nn.Module]],
                           family: str) -> tuple[torch.nn.Module, collections.OrderedDict[str, torch.Tensor]]:
    """The network under `key` of an EDM / EDM2 snapshot dict ('ema'), built by `networks[class_name]` from its
    recorded constructor arguments (`_init_args` / `_init_kwargs`), and its state dict, not yet loaded.
    `family` names the loader's repository in errors; `source` says where the right file comes from."""
    data = read_network_pickle(path)
    if not isinstance(data, dict) or key not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path} has no network under key {key!r} (found {keys}); EDM and EDM2 snapshots keep "
                              f"the network under 'ema'. Expected: {source}")
    record = data[key]
    name = record.class_name if isinstance(record, ModuleRecord) else type(record).__name__
    if name not in networks:
        repo, loader = SNAPSHOT_LOADERS.get(name, (None, None))
        hint = f" (an {repo} pickle: use {loader})" if loader else ""
        raise CheckpointError(f"{path}[{key!r}] holds {name}, not {family}'s {' or '.join(networks)}{hint}. "
                              f"Expected: {source}")
    args, kwargs = record.state.get("_init_args") or (), record.state.get("_init_kwargs")
    if not isinstance(kwargs, dict) or not isinstance(args, tuple):
        raise CheckpointError(f"{path}[{key!r}] does not record its constructor arguments (_init_kwargs)")
    try:
        net = networks[name](*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}[{key!r}]: cannot build {name} from {kwargs}: {e}") from e
    return net, record_state_dict(record)


def record_state_dict(record: ModuleRecord, prefix: str = "") -> collections.OrderedDict[str, torch.Tensor]:
    """The `state_dict()` the pickled module would return: parameters, persistent buffers, submodules."""
    sd: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
    state = record.state
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        entries = state.get(group) or {}
        if not isinstance(entries, dict):
            raise CheckpointError(f"{prefix or record.class_name}: {group} is a {type(entries).__name__}, not a dict")
        for name, value in entries.items():
            if value is None or (group == "_buffers" and name in non_persistent):
                continue
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
            sd[prefix + name] = value
    modules = state.get("_modules") or {}
    if not isinstance(modules, dict):
        raise CheckpointError(f"{prefix or record.class_name}: _modules is a {type(modules).__name__}, not a dict")
    for name, child in modules.items():
        if child is None:
            continue
        if not isinstance(child, ModuleRecord):
            raise CheckpointError(f"submodule {prefix}{name} is a {type(child).__name__}, not a pickled module")
        sd.update(record_state_dict(child, f"{prefix}{name}."))
    return sd
