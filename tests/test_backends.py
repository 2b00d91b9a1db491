"""backend_api.backends: the registry, lazy loading, errors, entry points."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
import textwrap
from pathlib import Path

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
def test_reference_adapters_refuse_an_object_grid(cls_name):
    from backend_api import reference_adapters

    adapter = _bare_adapter(getattr(reference_adapters, cls_name))
    with pytest.raises(ValueError, match=rf"{adapter.name}.*object_shape="):
        adapter.reconstruct(object(), object(), object_shape=(8, 8))


def test_pytorch_adapter_refuses_coord_scale_its_stitcher_lacks():
    from backend_api import reference_adapters

    adapter = _bare_adapter(reference_adapters.PyTorchBackend)
    with pytest.raises(ValueError, match=r"'pytorch'.*coord_scale=2.0"):
        adapter.reconstruct(object(), object(), coord_scale=2.0)
    with pytest.raises(ValueError, match=r"coord_scale='x'"):
        adapter.reconstruct(object(), object(), coord_scale="x")


def _fake_module(monkeypatch, name, **attrs):
    import types

    mod = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


def test_tensorflow_adapter_applies_the_stitch_options_like_the_reference(monkeypatch):
    """transpose swaps the patch axes, flip_x / flip_y negate the offsets' x / y, coord_scale
    scales them, M reaches reassemble_position (reference reassemble_cdi_image semantics)."""
    import numpy as np

    from backend_api import reference_adapters

    rng = np.random.default_rng(0)
    obj = (rng.normal(size=(3, 4, 4, 1)) + 1j * rng.normal(size=(3, 4, 4, 1))).astype(np.complex64)
    off = rng.normal(size=(3, 1, 2, 1))
    seen = {}

    def reassemble_position(o, g, M):
        seen.update(obj=np.array(o), off=np.array(g), M=M)
        return np.ones((6, 6, 1), np.complex64)

    _fake_module(monkeypatch, "ptycho.config.config")
    _fake_module(monkeypatch, "ptycho.nbutils",
                 reconstruct_image=lambda container, diffraction_to_obj: (obj, off.copy()))
    _fake_module(monkeypatch, "ptycho.tf_helper", reassemble_position=reassemble_position)
    adapter = _bare_adapter(reference_adapters.TensorFlowBackend)
    adapter._mods["ptycho.workflows.components"] = _fake_module(
        monkeypatch, "fake_components", create_ptycho_data_container=lambda data, config: "container")
    amp, phase, res = adapter.reconstruct("model", "data", config=None, M=32, transpose=True,
                                          flip_x=True, coord_scale=2.0)
    assert amp.shape == (6, 6) and seen["M"] == 32
    np.testing.assert_array_equal(seen["obj"], np.transpose(obj, (0, 2, 1, 3)))
    np.testing.assert_allclose(seen["off"][:, 0, 0], -2 * off[:, 0, 0])
    np.testing.assert_allclose(seen["off"][:, 0, 1], 2 * off[:, 0, 1])
    np.testing.assert_allclose(res["global_offsets"], seen["off"])
    adapter.reconstruct("model", "data", flip_y=True)
    np.testing.assert_allclose(seen["off"][:, 0, 1], -off[:, 0, 1])
    assert seen["M"] == 20  # the reference's default crop


def _torch_adapter(monkeypatch, **fns):
    from backend_api import reference_adapters

    _fake_module(monkeypatch, "ptycho.config.config")
    adapter = _bare_adapter(reference_adapters.PyTorchBackend)
    adapter._mods["fake_torch_components"] = _fake_module(monkeypatch, "fake_torch_components", **fns)
    return adapter


def test_pytorch_adapter_passes_stitch_options_to_the_ports_stitcher(monkeypatch):
    import numpy as np

    from backend_api import reference_adapters

    calls = []

    def stitch(data, config, flip_x, flip_y, transpose, M, train_results):
        calls.append((flip_x, flip_y, transpose, M, train_results["models"]["diffraction_to_obj"]))
        # the port returns its offsets as (B, 1, 1, 2)
        return (np.ones((5, 5)), np.zeros((5, 5)),
                {"obj_tensor_full": np.ones((2, 4, 4, 1), np.complex128),
                 "global_offsets": np.arange(4.0).reshape(2, 1, 1, 2)})

    adapter = _torch_adapter(monkeypatch, _reassemble_cdi_image_torch=stitch)
    model = reference_adapters.TorchReferenceModel("module", 10.0)
    amp, phase, res = adapter.reconstruct(model, "data", config="cfg", M=32, flip_x=True, transpose=True)
    assert calls == [(True, False, True, 32, "module")]
    assert res["global_offsets"].shape == (2, 1, 2, 1)
    np.testing.assert_array_equal(res["global_offsets"][1, 0, :, 0], [2.0, 3.0])
    assert res["obj_tensor_full"].dtype == np.complex64
    with pytest.raises(ValueError, match="needs the config"):
        adapter.reconstruct(model, "data")


def test_pytorch_adapter_save_adds_the_scaling_metadata(monkeypatch, tmp_path):
    from backend_api import reference_adapters

    saved, persisted = [], []

    def save_torch_bundle(models, base_path, config, intensity_scale=None):
        saved.append((sorted(models), models["diffraction_to_obj"], base_path, intensity_scale))
        Path(base_path + ".zip").write_bytes(b"zip")

    adapter = _torch_adapter(monkeypatch, save_torch_bundle=save_torch_bundle,
                             _persist_bundle_scaling_metadata=lambda p, m: persisted.append((p, m)))
    model = reference_adapters.TorchReferenceModel("module", 988.2)
    path = adapter.save_model(model, tmp_path, "cfg")
    assert path == tmp_path / "wts.h5.zip"
    assert saved == [(["autoencoder", "diffraction_to_obj"], "module", str(tmp_path / "wts.h5"), 988.2)]
    assert persisted == [(path, "module")]
    # a results dict of the port (models + intensity_scale) is accepted too
    adapter.save_model({"models": {"diffraction_to_obj": "m2"}, "intensity_scale": 3.0}, tmp_path, "cfg")
    assert saved[-1][1:] == ("m2", str(tmp_path / "wts.h5"), 3.0)
    with pytest.raises(ValueError, match="intensity scale"):
        adapter.save_model("bare module", tmp_path, "cfg")


def test_pytorch_adapter_load_wraps_the_module_for_predict(monkeypatch, tmp_path):
    from backend_api import reference_adapters

    params = {"intensity_scale": 5.0, "N": 64}
    adapter = _torch_adapter(monkeypatch, load_inference_bundle_torch=lambda d: (
        {"diffraction_to_obj": "module", "autoencoder": {}}, dict(params)))
    model, got = adapter.load_inference_bundle(tmp_path)
    assert isinstance(model, reference_adapters.TorchReferenceModel)
    assert model.module == "module" and model.intensity_scale == 5.0 and got == params
    params.pop("intensity_scale")
    with pytest.raises(ValueError, match="intensity_scale"):
        adapter.load_inference_bundle(tmp_path)
    with pytest.raises(ValueError, match="intensity_scale"):
        reference_adapters.TorchReferenceModel("module", float("nan"))


def test_pytorch_adapter_writes_in_memory_train_data_for_the_port(monkeypatch, tmp_path):
    """The port reads config.train_data_file; data given in memory go to a temporary NPZ holding
    exactly those data, which is gone afterwards, and the caller's config is not changed."""
    import numpy as np

    from backend_api.config import ModelConfig, TrainingConfig
    from backend_api.raw_data import RawData
    from backend_api import reference_adapters

    seen = {}

    def train(train_data, test_data, config):
        path = Path(config.train_data_file)
        with np.load(path) as z:
            seen["diff3d"] = z["diff3d"].copy()
        seen["path"] = path
        return {"models": {"diffraction_to_obj": "module"}, "intensity_scale": 2.0,
                "history": {"train_loss": [1.0, 0.5]}}

    rng = np.random.default_rng(1)
    n = 6
    raw = RawData(rng.uniform(0, 5, n), rng.uniform(0, 5, n), np.zeros(n), np.zeros(n),
                  rng.uniform(0, 1, (n, 8, 8)).astype(np.float32), np.ones((8, 8), np.complex64),
                  np.zeros(n, int))
    cfg = TrainingConfig(model=ModelConfig(N=64), n_groups=4, backend="pytorch")
    adapter = _torch_adapter(monkeypatch, train_cdi_model_torch=train)

    class RefRawData:  # the reference RawData the adapter converts ours into
        def __init__(self, xcoords, ycoords, xcoords_start, ycoords_start, diff3d, probeGuess,
                     scan_index, objectGuess=None, Y=None, norm_Y_I=None):
            self.xcoords, self.ycoords, self.diff3d, self.probeGuess = xcoords, ycoords, diff3d, probeGuess
            self.xcoords_start, self.ycoords_start, self.scan_index = xcoords_start, ycoords_start, scan_index
            self.objectGuess = objectGuess

    _fake_module(monkeypatch, "ptycho.raw_data", RawData=RefRawData)
    epochs = []
    res = adapter.train_cdi_model(raw, None, cfg, on_epoch_end=lambda e, logs: epochs.append((e, logs["loss"])))
    np.testing.assert_array_equal(seen["diff3d"], raw.diff3d)
    assert not seen["path"].exists() and cfg.train_data_file is None
    assert isinstance(res["model_instance"], reference_adapters.TorchReferenceModel)
    assert res["diffraction_to_obj"] is res["model_instance"] and res["model_instance"].intensity_scale == 2.0
    assert epochs == [(0, 1.0), (1, 0.5)]


def test_xla_flag_check_names_the_flags_an_xla_build_lacks(tmp_path):
    from backend_api.reference_adapters import xla_flags_unknown_to

    lib = tmp_path / "libfake.so"
    lib.write_bytes(b"\0xla_cpu_use_thunk_runtime\0xla_force_host_platform_device_count\0")
    flags = ("--xla_cpu_use_thunk_runtime=false --xla_cpu_experimental_ynn_fusion_type= "
             "--noxla_force_host_platform_device_count")
    assert xla_flags_unknown_to([lib], flags) == ["xla_cpu_experimental_ynn_fusion_type"]
    assert xla_flags_unknown_to([lib], "") == []
    assert xla_flags_unknown_to([], flags) == []  # no library to read: cannot tell
    assert xla_flags_unknown_to([tmp_path / "missing.so"], flags) == []


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


def test_pytorch_adapter_asks_the_port_for_the_reference_data_contract(monkeypatch, tmp_path):
    """A port whose training takes `overrides` is asked for its legacy scale contract (diff3d =
    amplitudes, normalised like the TensorFlow reference), the backend_api data contract; a
    port without that keyword is called as before."""
    import numpy as np

    from backend_api.config import ModelConfig, TrainingConfig
    from backend_api.raw_data import RawData
    from backend_api import reference_adapters

    seen = []

    def train(train_data, test_data, config, execution_config=None, overrides=None):
        seen.append(overrides)
        return {"models": {"diffraction_to_obj": "module"}, "intensity_scale": 2.0, "history": {}}

    rng = np.random.default_rng(1)
    raw = RawData(rng.uniform(0, 5, 4), rng.uniform(0, 5, 4), np.zeros(4), np.zeros(4),
                  rng.uniform(0, 1, (4, 8, 8)).astype(np.float32), np.ones((8, 8), np.complex64), np.zeros(4, int))
    cfg = TrainingConfig(model=ModelConfig(N=64), n_groups=4, backend="pytorch", train_data_file=tmp_path / "t.npz")
    adapter = _torch_adapter(monkeypatch, train_cdi_model_torch=train)
    _fake_module(monkeypatch, "ptycho.raw_data", RawData=lambda *a, **k: raw)

    @dataclasses.dataclass
    class OldPortModelConfig:  # a port without amplitude_physics_gain: no probe-scale overrides
        N: int = 64

    _fake_module(monkeypatch, "ptycho_torch.config_params", ModelConfig=OldPortModelConfig)
    adapter.train_cdi_model(raw, None, cfg)
    assert seen == [{"scale_contract_version": "legacy_v1", "measurement_domain": "normalized_amplitude"}]
    assert reference_adapters._legacy_scale_overrides(lambda a, b, c: None) == {}


def test_pytorch_adapter_gives_the_port_the_reference_probe_scale(monkeypatch, tmp_path):
    """The port's amplitude forward divides the raw probe by probe_scale and never normalises it
    as the TF reference does (probe / (probe_scale * mean|mask * probe|)); the adapter passes
    its probe_scale and amplitude_physics_gain = probe_scale / that norm, so the port's predicted
    amplitude is the reference's (benchmarks/README.md: without it the amplitude saturates)."""
    import numpy as np

    from backend_api.config import ModelConfig, TrainingConfig
    from backend_api.raw_data import RawData
    from backend_api import reference_adapters

    seen = []

    def train(train_data, test_data, config, execution_config=None, overrides=None):
        seen.append(overrides)
        return {"models": {"diffraction_to_obj": "module"}, "intensity_scale": 2.0, "history": {}}

    @dataclasses.dataclass
    class PortModelConfig:
        amplitude_physics_gain: float = 1.0

    n = 4
    rng = np.random.default_rng(1)
    # N=8: the mask r < 2 around pixel 3.5 holds 12 of the 64 pixels
    probe = np.full((8, 8), 2.0, np.complex64)
    raw = RawData(rng.uniform(0, 5, n), rng.uniform(0, 5, n), np.zeros(n), np.zeros(n),
                  rng.uniform(0, 1, (n, 8, 8)).astype(np.float32), probe, np.zeros(n, int))
    cfg = TrainingConfig(model=ModelConfig(N=64, probe_scale=5.0), n_groups=4, backend="pytorch",
                         train_data_file=tmp_path / "t.npz")
    adapter = _torch_adapter(monkeypatch, train_cdi_model_torch=train)
    _fake_module(monkeypatch, "ptycho.raw_data", RawData=lambda *a, **k: raw)
    _fake_module(monkeypatch, "ptycho_torch.config_params", ModelConfig=PortModelConfig)
    res = adapter.train_cdi_model(raw, None, cfg)
    norm = 5.0 * 2.0 * 12 / 64
    assert reference_adapters.reference_probe_norm(probe, 5.0) == pytest.approx(norm)
    expected = {"scale_contract_version": "legacy_v1", "measurement_domain": "normalized_amplitude",
                "probe_scale": 5.0, "amplitude_physics_gain": pytest.approx(5.0 / norm)}
    assert seen == [expected] and res["port_overrides"] == expected
    with pytest.raises(ValueError, match="zero"):
        reference_adapters.reference_probe_norm(np.zeros((8, 8)), 4.0)


def test_reference_probe_norm_is_pinn_jax_probe_normalisation():
    """The same normalisation as the jax backend's (the TF reference's set_probe)."""
    import numpy as np

    jnp = pytest.importorskip("jax.numpy")
    from backend_api.reference_adapters import reference_probe_norm
    from pinn_jax.probe import normalize_probe

    rng = np.random.default_rng(3)
    p = (rng.normal(size=(64, 64)) + 1j * rng.normal(size=(64, 64))).astype(np.complex64)
    np.testing.assert_allclose(np.asarray(normalize_probe(jnp.asarray(p), 4.0)),
                               p / reference_probe_norm(p, 4.0), rtol=1e-5, atol=1e-7)


def test_xla_flags_unknown_to_tensorflow_reads_the_installed_libraries(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from backend_api import reference_adapters

    (tmp_path / "libtensorflow_framework.so.2").write_bytes(b"\0xla_force_host_platform_device_count\0")
    monkeypatch.setattr(reference_adapters.importlib.util, "find_spec",
                        lambda name: SimpleNamespace(submodule_search_locations=[str(tmp_path)]))
    flags = "--xla_force_host_platform_device_count=4 --xla_cpu_experimental_ynn_fusion_type="
    assert reference_adapters.xla_flags_unknown_to_tensorflow(flags) == ["xla_cpu_experimental_ynn_fusion_type"]
    assert reference_adapters.xla_flags_unknown_to_tensorflow("  ") == []
    monkeypatch.setattr(reference_adapters.importlib.util, "find_spec", lambda name: None)
    assert reference_adapters.xla_flags_unknown_to_tensorflow(flags) == []  # no TensorFlow: nothing to say
