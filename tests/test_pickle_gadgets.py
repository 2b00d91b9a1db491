"""numpy "gadget" pickles against backend_api.archive.safe_loads.

The restricted unpickler allows a handful of numpy globals (``numpy.ndarray``, ``numpy.dtype``,
``numpy._core.multiarray._reconstruct`` / ``scalar``, ``numpy._core.numeric._frombuffer`` and
their ``numpy.core`` spellings), each mapped to a checked stand-in. Everything else under
``numpy`` must stay refused: many numpy functions run code, write or read files when called with
pickle-supplied arguments (``runstring`` is ``exec``; ``load(path, None, True)`` unpickles a
file with the unrestricted pickle; ``save``/``savetxt``/``memmap`` create files;
``distutils.exec_command`` runs a shell command; ``fromfile`` reads any file).

Each gadget is crafted by hand as the opcodes an attacker would write -- GLOBAL (protocols 0 and
2), INST (protocol 0) and STACK_GLOBAL (protocols 4 and 5), at top level and nested in a params
dict -- and must raise ``UnsafePickleError`` naming the global, with no side effect. A control
(plain ``pickle.loads`` on the same bytes, inside tmp_path) shows that each observable gadget is
live, so a refusal is not an accident of a malformed stream; a positive control shows that the
same crafting of an ALLOWED global loads.
"""

from __future__ import annotations

import builtins
import importlib
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from backend_api.archive import UnsafePickleError, read_archive, safe_loads

# ------------------------------------------------------------------------------ crafting

# (protocol, opcode) combinations an attacker can use to reach find_class
VARIANTS = [(0, "GLOBAL"), (0, "INST"), (2, "GLOBAL"), (4, "STACK_GLOBAL"), (5, "STACK_GLOBAL")]


def _value_body(obj, proto: int) -> bytes:
    """Opcodes that push ``obj`` (no PROTO header, FRAME or STOP), for splicing."""
    raw = pickle.dumps(obj, protocol=proto)
    assert raw.endswith(pickle.STOP)
    raw = raw[:-1]
    if proto >= 2:
        assert raw[:2] == pickle.PROTO + bytes([proto])
        raw = raw[2:]
    if proto >= 4 and raw[:1] == pickle.FRAME:
        raw = raw[9:]
    return raw


def _short_unicode(s: str) -> bytes:
    b = s.encode()
    assert len(b) < 256
    return pickle.SHORT_BINUNICODE + bytes([len(b)]) + b


def _call_body(module: str, name: str, args: tuple, proto: int, opcode: str) -> bytes:
    """Opcodes that push ``module.name(*args)`` resolved through find_class."""
    if opcode == "INST":  # MARK args... INST module\nname\n  (calls the class with the args)
        items = b"".join(_value_body(a, proto) for a in args)
        return pickle.MARK + items + pickle.INST + f"{module}\n{name}\n".encode()
    if opcode == "GLOBAL":
        fn = pickle.GLOBAL + f"{module}\n{name}\n".encode()
    else:
        fn = _short_unicode(module) + _short_unicode(name) + pickle.STACK_GLOBAL
    return fn + _value_body(args, proto) + pickle.REDUCE


def craft(module: str, name: str, args: tuple, proto: int, opcode: str, *, nested: bool = False) -> bytes:
    header = pickle.PROTO + bytes([proto]) if proto >= 2 else b""
    call = _call_body(module, name, args, proto, opcode)
    if nested:  # {"N": 64, "evil": <call>} as a params.dill would carry it
        body = (pickle.MARK + _value_body("N", proto) + _value_body(64, proto)
                + _value_body("evil", proto) + call + pickle.DICT)
    else:
        body = call
    return header + body + pickle.STOP


# ------------------------------------------------------------------------------ gadgets


@dataclass(frozen=True)
class Gadget:
    module: str
    name: str
    args: Callable[[Path], tuple]        # tmp_path -> call arguments
    effect: Callable[[Path], Path] | None  # tmp_path -> the file the call would create


class _ExecOnLoad:
    """Plain pickle payload for the numpy.load gadget: unpickling runs exec(code)."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (builtins.exec, (self.code,))


def _touch_code(path: Path) -> str:
    return f"open({str(path)!r}, 'w').close()"


def _evil_file(tmp: Path) -> str:
    evil = tmp / "evil.pkl"
    evil.write_bytes(pickle.dumps(_ExecOnLoad(_touch_code(tmp / "pwned")), protocol=2))
    return str(evil)


def _secret(tmp: Path) -> str:
    secret = tmp / "secret.bin"
    secret.write_bytes(b"top secret")
    return str(secret)


PWNED = lambda tmp: tmp / "pwned"  # noqa: E731

GADGETS = {
    "runstring": Gadget("numpy.testing._private.utils", "runstring",
                        lambda t: (_touch_code(t / "pwned"), {}), PWNED),
    "load_allow_pickle": Gadget("numpy", "load", lambda t: (_evil_file(t), None, True), PWNED),
    "npyio_load": Gadget("numpy.lib._npyio_impl", "load", lambda t: (_evil_file(t), None, True), PWNED),
    "save": Gadget("numpy", "save", lambda t: (str(t / "pwned.npy"), [1, 2]), lambda t: t / "pwned.npy"),
    "npyio_save": Gadget("numpy.lib._npyio_impl", "save", lambda t: (str(t / "pwned.npy"), [1, 2]),
                         lambda t: t / "pwned.npy"),
    "savetxt": Gadget("numpy", "savetxt", lambda t: (str(t / "pwned"), [1.0]), PWNED),
    "memmap_create": Gadget("numpy", "memmap", lambda t: (str(t / "pwned"), "uint8", "w+", 0, (4,)), PWNED),
    "distutils_exec_command": Gadget("numpy.distutils.exec_command", "exec_command",
                                     lambda t: (f"touch {t / 'pwned'}",), PWNED),
    # no file effect to observe, but code loading or file reading all the same
    "fromfile_reads_any_file": Gadget("numpy", "fromfile", lambda t: (_secret(t), "uint8"), None),
    "format_read_array": Gadget("numpy.lib.format", "read_array", lambda t: (_secret(t),), None),
    "ctypeslib_load_library": Gadget("numpy.ctypeslib", "load_library", lambda t: ("libc", str(t)), None),
    "f2py_run_main": Gadget("numpy.f2py", "run_main", lambda t: (["-h", str(t / "pwned")],), None),
    "numpy_core_other": Gadget("numpy._core.multiarray", "fromfile", lambda t: (_secret(t), "uint8"), None),
    "numpy_core_legacy": Gadget("numpy.core.multiarray", "fromfile", lambda t: (_secret(t), "uint8"), None),
}


def _importable(g: Gadget) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return callable(getattr(importlib.import_module(g.module), g.name))
    except Exception:
        return False


def _leftovers(tmp: Path) -> set[str]:
    return {p.name for p in tmp.iterdir()} - {"evil.pkl", "secret.bin"}


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("proto,opcode", VARIANTS, ids=[f"p{p}-{o}" for p, o in VARIANTS])
@pytest.mark.parametrize("key", list(GADGETS))
def test_numpy_gadget_is_refused_without_side_effect(tmp_path, key, proto, opcode):
    g = GADGETS[key]
    data = craft(g.module, g.name, g.args(tmp_path), proto, opcode)
    with pytest.raises(UnsafePickleError, match=rf"the global {g.module}\.{g.name}\b"):
        safe_loads(data)
    assert _leftovers(tmp_path) == set()


@pytest.mark.parametrize("key", list(GADGETS))
def test_numpy_gadget_nested_in_params_is_refused(tmp_path, key):
    g = GADGETS[key]
    for proto, opcode in VARIANTS:
        data = craft(g.module, g.name, g.args(tmp_path), proto, opcode, nested=True)
        with pytest.raises(UnsafePickleError, match=rf"{g.module}\.{g.name}"):
            safe_loads(data)
        with pytest.raises(UnsafePickleError):
            safe_loads(data, allow_object_arrays=True)
    assert _leftovers(tmp_path) == set()


@pytest.mark.parametrize("key", [k for k, g in GADGETS.items() if g.effect is not None])
def test_control_gadget_is_live_under_plain_pickle(tmp_path, key):
    """The same bytes through the unrestricted pickle do create the file: the gadget is real."""
    g = GADGETS[key]
    if not _importable(g):
        pytest.skip(f"{g.module}.{g.name} is not available in this numpy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pickle.loads(craft(g.module, g.name, g.args(tmp_path), 4, "STACK_GLOBAL"))
    assert g.effect(tmp_path).exists()


def test_control_fromfile_gadget_discloses_a_file_under_plain_pickle(tmp_path):
    g = GADGETS["fromfile_reads_any_file"]
    out = pickle.loads(craft(g.module, g.name, g.args(tmp_path), 2, "GLOBAL"))
    assert out.tobytes() == b"top secret"


@pytest.mark.parametrize("proto,opcode", [v for v in VARIANTS if v[1] != "INST"],
                         ids=[f"p{p}-{o}" for p, o in VARIANTS if o != "INST"])
def test_crafting_an_allowed_global_loads(proto, opcode):
    """Positive control: the same hand-crafting with allowed globals is read normally, including
    numpy's own array reconstruction (what real params.dill files use)."""
    assert safe_loads(craft("builtins", "complex", (1.0, 2.0), proto, opcode)) == 1 + 2j
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = safe_loads(craft("numpy.core.multiarray", "_reconstruct", (np.ndarray, (0,), b"b"), proto, opcode)
                     [:-1] + _value_body(arr.__reduce__()[2], proto) + pickle.BUILD + pickle.STOP)
    assert type(out) is np.ndarray and out.dtype == np.float32
    np.testing.assert_array_equal(out, arr)


def test_gadget_in_an_archive_params_is_refused_before_extraction(tmp_path):
    """read_archive on an archive whose params.dill carries the runstring gadget: refused, the
    code never runs and nothing is extracted."""
    g = GADGETS["runstring"]
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("manifest.dill", pickle.dumps({"models": ["m"], "version": "1.0"}, protocol=4))
        zf.writestr("m/params.dill", craft(g.module, g.name, g.args(tmp_path), 4, "STACK_GLOBAL", nested=True))
    with pytest.raises(UnsafePickleError, match="runstring"):
        read_archive(path, tmp_path / "dest")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "dest").exists()
