"""backend_api.backends: the registry, lazy loading, errors, entry points."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import textwrap

import pytest

from backend_api import backends as B
from backend_api.backends import Backend, available_backends, get_backend, register_backend


class _Dummy:
    name = "dummy"

    def train_cdi_model(self, train_data, test_data, config):
        return {}

    def run_cdi_example(self, train_data, test_data, config, *, flip_x=False, flip_y=False,
                        transpose=False, M=20, do_stitching=False):
        return None, None, {}

    def save_model(self, model, output_dir, config):
        return output_dir

    def load_inference_bundle(self, model_dir):
        return None, {}

    def reconstruct(self, model, data, *, config=None, M=20):
        return None, None, {}


@pytest.fixture(autouse=True)
def _clean_registry():
    yield
    for name in ("dummy", "dummy_str", "dummy_inst", "epdemo", "epbroken"):
        B.unregister_backend(name)
    B._instances.clear()
    sys.modules.pop("epdemo_backend_mod", None)


def test_unknown_backend_lists_known_ones():
    with pytest.raises(ValueError) as info:
        get_backend("not-a-backend")
    msg = str(info.value)
    assert "not-a-backend" in msg
    for known in ("jax", "tensorflow", "pytorch"):
        assert repr(known) in msg
    with pytest.raises(ValueError):
        get_backend(3)


def test_builtins_are_known_without_importing_them():
    assert {"jax", "tensorflow", "pytorch"} <= set(available_backends())
    assert "ptycho" not in sys.modules and "ptycho_torch" not in sys.modules


@pytest.mark.skipif(importlib.util.find_spec("ptycho") is not None, reason="ptycho installed")
def test_tensorflow_backend_missing_package_runtime_error():
    with pytest.raises(RuntimeError) as info:
        get_backend("tensorflow")
    msg = str(info.value)
    assert "TensorFlow backend selected" in msg and "'tensorflow'" in msg
    assert "ptycho" in msg and "pip install" in msg and "unavailable" in msg
    assert not B.is_backend_installed("tensorflow")


@pytest.mark.skipif(importlib.util.find_spec("ptycho_torch") is not None, reason="torch port installed")
def test_pytorch_backend_missing_package_runtime_error():
    with pytest.raises(RuntimeError) as info:
        get_backend("pytorch")
    msg = str(info.value)
    assert "PyTorch backend selected" in msg and "ptycho_torch" in msg
    assert "pip install torch" in msg and "unavailable" in msg
    assert "pytorch" in msg.lower()


def test_jax_backend_resolves_to_pinn_jax_or_explains():
    if importlib.util.find_spec("pinn_jax.backend") is None:
        with pytest.raises(RuntimeError, match="pinn_jax.backend"):
            get_backend("jax")
        return
    backend = get_backend("jax")
    assert type(backend).__name__ == "JaxBackend" and backend.name == "jax"
    assert isinstance(backend, Backend)
    assert get_backend("jax") is backend  # cached instance


def test_register_class_string_and_instance():
    register_backend("dummy", _Dummy)
    b = get_backend("dummy")
    assert isinstance(b, _Dummy) and isinstance(b, Backend)
    assert get_backend("dummy") is b
    register_backend("dummy_str", f"{__name__}:_Dummy")
    assert isinstance(get_backend("dummy_str"), _Dummy)
    inst = _Dummy()
    register_backend("dummy_inst", inst)
    assert get_backend("dummy_inst") is inst
    assert {"dummy", "dummy_str", "dummy_inst"} <= set(available_backends())


def test_register_refuses_silent_override_and_unregister_restores_builtin():
    with pytest.raises(ValueError, match="already known"):
        register_backend("tensorflow", _Dummy)
    register_backend("tensorflow", _Dummy, replace=True)
    try:
        assert isinstance(get_backend("tensorflow"), _Dummy)
    finally:
        B.unregister_backend("tensorflow")
    assert B._registered.get("tensorflow") is None
    with pytest.raises(ValueError, match="module:attr"):
        register_backend("dummy", "no_colon_here")


def test_missing_module_target_is_runtime_error():
    register_backend("dummy", "surely_missing_backend_pkg.mod:Backend")
    with pytest.raises(RuntimeError, match="dummy.*surely_missing_backend_pkg.*install"):
        get_backend("dummy")


def _install_entry_point(tmp_path, monkeypatch, name, value):
    dist = tmp_path / "epdemo_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: epdemo-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{B.ENTRY_POINT_GROUP}]\n{name} = {value}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()


def test_entry_point_registration(tmp_path, monkeypatch):
    (tmp_path / "epdemo_backend_mod.py").write_text(
        textwrap.dedent(
            """
            class EpBackend:
                name = "epdemo"
                def train_cdi_model(self, train_data, test_data, config):
                    return {"trained": True}
                def run_cdi_example(self, *a, **k):
                    return None, None, {}
                def save_model(self, model, output_dir, config):
                    return output_dir
                def load_inference_bundle(self, model_dir):
                    return None, {}
                def reconstruct(self, model, data, *, config=None, M=20):
                    return None, None, {}
            """
        )
    )
    _install_entry_point(tmp_path, monkeypatch, "epdemo", "epdemo_backend_mod:EpBackend")
    assert "epdemo" in available_backends()
    assert B.is_backend_installed("epdemo")
    b = get_backend("epdemo")
    assert type(b).__name__ == "EpBackend" and isinstance(b, Backend)
    assert b.train_cdi_model(None, None, None) == {"trained": True}


def test_entry_point_with_missing_module(tmp_path, monkeypatch):
    _install_entry_point(tmp_path, monkeypatch, "epbroken", "epbroken_missing_mod:Nope")
    with pytest.raises(RuntimeError, match="epbroken.*epbroken_missing_mod"):
        get_backend("epbroken")


# ---------------------------------------------------------------------------------------------
# the reference adapters say what they cannot do


def _bare_adapter(cls):
    obj = cls.__new__(cls)  # no reference package here: skip the guarded import
    obj._mods = {}
    return obj


@pytest.mark.parametrize("cls_name", ["TensorFlowBackend", "PyTorchBackend"])
@pytest.mark.parametrize("option", [{"flip_x": True}, {"transpose": True}, {"coord_scale": 2.0},
                                    {"object_shape": (8, 8)}])
def test_reference_adapters_refuse_options_they_cannot_honour(cls_name, option):
    from backend_api import reference_adapters

    adapter = _bare_adapter(getattr(reference_adapters, cls_name))
    name = next(iter(option))
    with pytest.raises(ValueError, match=rf"{adapter.name}.*{name}="):
        adapter.reconstruct(object(), object(), **option)


def test_pytorch_adapter_refuses_a_stitch_crop_it_would_ignore():
    from backend_api import reference_adapters

    adapter = _bare_adapter(reference_adapters.PyTorchBackend)
    with pytest.raises(ValueError, match=r"'pytorch'.*M=32"):
        adapter.reconstruct(object(), object(), M=32)


def test_reference_adapters_importable_from_the_registry_module():
    from backend_api import backends, reference_adapters

    assert backends.TensorFlowBackend is reference_adapters.TensorFlowBackend
    assert backends.BUILTIN_BACKENDS["pytorch"] == "backend_api.reference_adapters:PyTorchBackend"


def test_configure_runtime_calls_the_optional_hook():
    from types import SimpleNamespace

    from backend_api.backends import configure_runtime

    calls = []
    configure_runtime(SimpleNamespace(configure_runtime=lambda: calls.append(1)))
    configure_runtime(SimpleNamespace())  # no hook: nothing to do
    configure_runtime(None)
    assert calls == [1]
