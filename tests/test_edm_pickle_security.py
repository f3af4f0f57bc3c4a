"""The EDM pickle reader refuses every global outside its allowlist and never runs pickled code.

Each payload below would create a marker file if unpickled with plain `pickle.load`; the test checks
that guidebench's reader raises UnsafePickleError naming the global and that the file was not created.
"""

from __future__ import annotations

import builtins
import collections
import io
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from guidebench.backbones.edm import load_denoiser
from guidebench.backbones.edm_pickle import (
    LEGACY_MAGIC, LEGACY_PROTOCOL, ModuleRecord, UnsafePickleError, read_network_pickle, record_state_dict,
)


class Reduce:
    """An object that pickles as `func(*args)`."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _write(tmp_path: Path, obj, name: str = "evil.pkl") -> Path:
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"ema": obj}, protocol=4))
    return path


def _refused(path: Path, global_name: str) -> None:
    with pytest.raises(UnsafePickleError, match=f"refusing .*{global_name}"):
        read_network_pickle(path)


def test_os_system_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = _write(tmp_path, Reduce(os.system, f"touch {marker}"))
    _refused(path, rf"{os.system.__module__}\.system")  # os.system pickles as posix.system on Linux
    with pytest.raises(UnsafePickleError, match="posix.system|nt.system"):
        load_denoiser(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the payload is live: plain pickle runs it
    assert marker.exists()


def test_protocol0_os_system_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil0.pkl"
    path.write_bytes(f"cos\nsystem\n(Vtouch {marker}\ntR.".encode())
    _refused(path, r"os\.system")
    assert not marker.exists()


@pytest.mark.parametrize("func,arg,name", [
    (builtins.eval, "open({marker!r}, 'w').close()", r"builtins\.eval"),
    (builtins.exec, "open({marker!r}, 'w').close()", r"builtins\.exec"),
    (subprocess.Popen, ["touch", "{marker}"], r"subprocess\.Popen"),
])
def test_code_running_globals_are_refused(tmp_path, func, arg, name):
    marker = str(tmp_path / "pwned")
    arg = [a.format(marker=marker) for a in arg] if isinstance(arg, list) else arg.format(marker=marker)
    _refused(_write(tmp_path, Reduce(func, arg)), name)
    assert not Path(marker).exists()


def _stack_global(module: str, name: str) -> bytes:
    """PROTO 4; module name STACK_GLOBAL; () REDUCE; STOP — i.e. `module.name()` with a dotted name."""
    enc = lambda s: b"\x8c" + bytes([len(s)]) + s.encode()  # SHORT_BINUNICODE
    return b"\x80\x04" + enc(module) + enc(name) + b"\x93" + b")R."


@pytest.mark.parametrize("module,name", [
    ("builtins", "object.__subclasses__"),                          # the classic subclass walk
    ("collections", "OrderedDict.__subclasses__"),                  # ... starting from an allowed class
    ("torch_utils.persistence", "_reconstruct_persistent_obj.__globals__"),
    ("torch._utils", "_rebuild_tensor_v2.__globals__.get"),
])
def test_attribute_walks_from_any_global_are_refused(tmp_path, module, name):
    path = tmp_path / "walk.pkl"
    path.write_bytes(_stack_global(module, name))
    if module == "builtins":
        assert isinstance(pickle.loads(path.read_bytes()), list)  # plain pickle follows the dotted path
    _refused(path, f"{module}.{name}".replace(".", r"\."))


@pytest.fixture
def fake_persistence(monkeypatch):
    """A stand-in `torch_utils.persistence._reconstruct_persistent_obj` so the test can *write* EDM records."""
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # what plain unpickling would call: EDM execs meta['module_src']
        exec(meta["module_src"], {})

    _reconstruct_persistent_obj.__module__ = mod.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)
    return _reconstruct_persistent_obj


def _meta(class_name: str, marker: Path) -> dict:
    src = f"import os\nos.system('touch {marker}')\nclass {class_name}: pass\n"
    return dict(type="class", version=6, module_src=src, class_name=class_name, state={"_init_kwargs": {}})


def test_unknown_persistent_class_is_refused(tmp_path, fake_persistence):
    marker = tmp_path / "pwned"
    path = _write(tmp_path, Reduce(fake_persistence, _meta("Backdoor", marker)))
    with pytest.raises(UnsafePickleError, match="refusing persistent class 'Backdoor'"):
        read_network_pickle(path)
    assert not marker.exists()


def test_module_src_of_a_known_class_is_never_executed(tmp_path, fake_persistence):
    marker = tmp_path / "pwned"
    path = _write(tmp_path, Reduce(fake_persistence, _meta("EDMPrecond", marker)))
    record = read_network_pickle(path)["ema"]
    assert isinstance(record, ModuleRecord) and record.class_name == "EDMPrecond"
    assert "module_src" not in record.state and not marker.exists()
    pickle.loads(path.read_bytes())  # EDM's own loader would have run it
    assert marker.exists()


def _legacy_stream(record: bytes, keys: list[str], data: bytes) -> bytes:
    f = io.BytesIO()
    for obj in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(obj, f, protocol=2)
    f.write(record)
    pickle.dump(keys, f, protocol=2)
    f.write(data)
    return f.getvalue()


def test_globals_inside_a_storage_stream_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    inner = _legacy_stream(pickle.dumps(Reduce(os.system, f"touch {marker}"), protocol=2), ["0"], b"")
    path = _write(tmp_path, Reduce(torch.storage._load_from_bytes, inner))
    _refused(path, r"posix\.system|nt\.system")
    assert not marker.exists()


def test_a_wellformed_storage_stream_decodes(tmp_path):
    """The positive control for the nested reader: a float storage inside a tensor inside a parameter dict."""
    from torch._utils import _rebuild_tensor_v2

    storage = object()
    record = io.BytesIO()
    p = pickle.Pickler(record, protocol=2)  # the storage as torch's legacy persistent id
    p.persistent_id = lambda obj: ("storage", torch.FloatStorage, "7", "cpu", 3, None) if obj is storage else None
    p.dump(storage)
    values = torch.tensor([1.5, -2.0, 3.25])
    inner = _legacy_stream(record.getvalue(), ["7"], (3).to_bytes(8, "little") + values.numpy().tobytes())
    tensor = Reduce(_rebuild_tensor_v2, Reduce(torch.storage._load_from_bytes, inner), 1, (2,), (1,), False,
                    collections.OrderedDict())
    data = read_network_pickle(_write(tmp_path, {"_parameters": {"w": tensor}}))["ema"]
    assert torch.equal(record_state_dict(ModuleRecord("Linear", data))["w"], values[1:])


def test_object_dtype_numpy_scalar_is_refused(tmp_path):
    import numpy as np

    path = _write(tmp_path, np.array([1], dtype=object)[0:1])
    _refused(path, r"numpy\.")
    path.write_bytes(b"\x80\x04\x8c\x05numpy\x8c\x05dtype\x93\x8c\x02O8\x89\x88\x87R.")
    with pytest.raises(UnsafePickleError, match="only numeric"):
        read_network_pickle(path)
