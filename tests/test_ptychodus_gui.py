"""ptychodus 1.7 desktop GUI with PtychoPINN-JAX registered (offscreen, no event loop).

The GUI objects are built as ptychodus's entry point builds them (``ModelCore``, ``ViewCore``,
``ControllerCore``) after ``backend_api.ptychodus.register()``. Nothing blocks on an event
loop: button clicks are synchronous Qt signals, and the foreground tasks ptychodus's 1 s timer
would run are run by :func:`pump`. Training and inference use the deterministic stand-in
backend of tests/test_ptychodus_support.py in the spawned children (fast and exact); the real
JAX backend through the same library is covered in tests/test_ptychodus_jax.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ptychodus")
try:
    import PyQt5.QtWidgets  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"PyQt5 is not importable ({type(exc).__name__}: {exc}); "
                "pip install PyQt5 to run the GUI tests", allow_module_level=True)

os.environ["QT_QPA_PLATFORM"] = "offscreen"  # before any QApplication exists

from PyQt5.QtWidgets import QApplication, QLabel, QSpinBox  # noqa: E402

import backend_api.ptychodus as bp  # noqa: E402
from test_ptychodus_support import STANDIN_TARGET, make_scan  # noqa: E402

STANDIN = {"jax": STANDIN_TARGET}
KEYS = ("ptychopinn-jax_pinn", "ptychopinn-jax_supervised")


def pump(model, controller, done, *, timeout_s: float = 90.0) -> None:
    """Run ptychodus's foreground tasks (its QTimer's job) until ``done()``."""
    app = QApplication.instance()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        model.run_tasks()
        app.processEvents()
        if done():
            model.run_tasks()
            app.processEvents()
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s")


@pytest.fixture(scope="module")
def gui(tmp_path_factory):
    from ptychodus.controller import ControllerCore
    from ptychodus.model import ModelCore
    from ptychodus.view import ViewCore

    app = QApplication.instance() or QApplication(["pytest"])
    bp.register(backend_registrations=STANDIN)
    model = ModelCore()
    model.__enter__()
    try:
        view = ViewCore(is_developer_mode_enabled=model.is_developer_mode_enabled)
        controller = ControllerCore(model, view,
                                    is_developer_mode_enabled=model.is_developer_mode_enabled)
        controller._run_tasks_timer.stop()  # the test pumps the tasks itself
        library = model.processing_core.ptychopinn_jax_library
        library.settings.parameter("own", "RefineIterations").set_value(0)  # stand-in: no physics
        yield {"app": app, "model": model, "view": view, "controller": controller,
               "processing": controller._processing_controller, "library": library,
               "work": tmp_path_factory.mktemp("gui")}
    finally:
        model.__exit__(None, None, None)
        bp.unregister()
        _release(locals().get("controller"), locals().get("view"))


_ALIVE: list = []


def _release(controller, view) -> None:
    """Let the GUI objects outlive the test quietly: ptychodus's agent input controller filters
    its text edit's events and raises (a fatal error inside Qt) once the view has been deleted,
    e.g. when Python collects the view; so remove that filter, and keep the objects referenced
    until the process ends (as ptychodus's own main() does)."""
    if controller is not None:
        try:
            chat = controller._agent_chat_controller._input_controller
            chat._view.text_edit.removeEventFilter(chat)
        except Exception:
            pass
    if view is not None:
        view.close()
    _ALIVE.extend([controller, view])


def _stack_widget(processing, key: str):
    keys = list(processing._algorithm_parameter.available_reconstructors())
    return processing._stacked_widget.widget(keys.index(key))


def test_the_panel_of_both_algorithms_is_ours(gui):
    processing = gui["processing"]
    keys = list(processing._algorithm_parameter.available_reconstructors())
    for key in KEYS:
        assert key in keys
        widget = _stack_widget(processing, key)
        assert not isinstance(widget, QLabel), f"{key}: {widget.text()}"
        assert hasattr(widget, "ptychopinn_jax_patch_size")
    factory = processing.ptychopinn_jax_view_controller_factory
    pinn = factory.widgets["pinn"]
    expected = {("model", "GridSize"), ("model", "NumFiltersScale"), ("model", "AmpActivation"),
                ("model", "ObjectBig"), ("model", "ProbeBig"), ("model", "PadObject"),
                ("model", "ProbeScale"), ("model", "ProbeMask"),
                ("model", "GaussianSmoothingSigma"), ("model", "N"),
                ("training", "NumEpochs"), ("training", "BatchSize"), ("training", "NLLWeight"),
                ("training", "MAEWeight"), ("training", "RealspaceMAEWeight"),
                ("training", "RealspaceWeight"), ("training", "NumPhotons"),
                ("own", "NumGroups"), ("training", "ProbeTrainable"),
                ("training", "IntensityScaleTrainable"), ("own", "Seed"),
                ("inference", "NumNearestNeighbors"), ("inference", "NumSamples"),
                ("own", "StitchMode"), ("own", "StitchCropSize"), ("own", "RefineIterations"),
                ("own", "RefineNoise"), ("own", "RefineProbe"), ("own", "RefinePositions"),
                ("own", "RefineTVWeight"), ("own", "RefineFullBatchFrom"),
                ("own", "Backend"), ("own", "DiffractionKind")}
    assert expected <= set(pinn), expected - set(pinn)
    # the panel edits ptychodus's own PtychoPINN groups (one settings.ini section each)
    assert gui["library"].settings.shares_ptychodus_groups


def test_panel_edits_change_the_registry_and_the_next_job(gui, tmp_path):
    settings = gui["library"].settings
    widgets = gui["processing"].ptychopinn_jax_view_controller_factory.widgets
    epochs = widgets["pinn"]["training", "NumEpochs"]
    assert isinstance(epochs, QSpinBox)
    epochs.setValue(7)
    registry = gui["model"].settings_registry
    assert registry["PtychoPINNTraining"].parameters()["NumEpochs"].get_value() == 7
    pinn = gui["library"]["PINN"]
    assert pinn._make_train_job(tmp_path, tmp_path).training["nepochs"] == 7
    assert pinn.get_progress_goal() == 7
    # the same parameter drives the Supervised panel too (one registry value)
    assert widgets["supervised"]["training", "NumEpochs"].value() == 7
    refine = widgets["pinn"]["own", "RefineIterations"]
    refine.setValue(3)
    assert settings.snapshot_inference().refine_iterations == 3
    refine.setValue(0)
    combo = widgets["pinn"]["own", "RefineNoise"]
    combo.setCurrentText("poisson")
    combo.textActivated.emit("poisson")  # what a user's pick sends
    assert settings.snapshot_inference().refine_noise == "poisson"
    combo.textActivated.emit("gaussian")


def test_panel_screenshot(gui, tmp_path):
    from backend_api.ptychodus.settings import DEFAULT_REFINE_ITERATIONS

    refine = gui["library"].settings.parameter("own", "RefineIterations")
    refine.set_value(DEFAULT_REFINE_ITERATIONS)  # the picture shows the defaults
    try:
        widget = _stack_widget(gui["processing"], "ptychopinn-jax_pinn")
        widget.resize(460, 1180)
        path = tmp_path / "ptychopinn_jax_panel.png"
        assert widget.grab().save(str(path))
        assert path.stat().st_size > 5_000
        if os.environ.get("PINN_JAX_SCREENSHOT"):  # how docs/ptychodus_panel.png is made
            widget.grab().save(os.environ["PINN_JAX_SCREENSHOT"])
    finally:
        refine.set_value(0)


def _open_scan(gui, work: Path, scan) -> int:
    """Write ``scan`` as ptychodus files and open them as the GUI's Open Diffraction File /
    Open Product do, with ptychodus's readers: its NPZ diffraction reader (default detector pixel
    and crop) and its HDF5 product reader. Returns the product index."""
    from backend_api.ptychodus.files import write_ptychodus_scan

    model = gui["model"]
    files = write_ptychodus_scan(
        work, {"xcoords": scan.x_px + 0.5, "ycoords": scan.y_px + 0.5, "diff3d": scan.patterns,
               "probeGuess": scan.probe, "objectGuess": scan.obj},
        diffraction_kind="intensity", name="gui-scan")
    diffraction_api = model.diffraction_core.diffraction_api
    dataset_index = diffraction_api.open_patterns(files["diffraction_npz"], file_type="NPZ",
                                                  block=True)
    dataset = model.diffraction_core.repository[dataset_index]
    assert dataset.get_assembled_data().get_patterns_shape() == scan.patterns.shape
    index = model.product_core.product_api.open_product(files["product"], file_type="HDF5",
                                                        dataset=dataset, block=True)
    repository = model.product_core.product_repository
    pump(model, gui["controller"], lambda: repository[index].get_dataset() is not None
         and not repository[index].is_pending())
    gui["processing"]._product_view_controller.get_widget().setCurrentIndex(index)
    return index


def _train_from_the_gui(gui, work: Path, epochs: int) -> None:
    """Actions -> Export Training Data (twice), the epochs spin box, then the Train button."""
    model, controller, processing = gui["model"], gui["controller"], gui["processing"]
    dialogs = controller._file_dialog_factory
    for name in ("train_data.npz", "test_data.npz"):
        dialogs.get_save_file_path = lambda *a, _n=name, **k: (work / _n, "")
        processing._export_training_data()
        assert (work / name).is_file()
    widgets = processing.ptychopinn_jax_view_controller_factory.widgets["pinn"]
    widgets["training", "NumEpochs"].setValue(epochs)
    dialogs.get_existing_directory_path = lambda *a, **k: work
    monitor = model.processing_core.processing_api.task_monitor
    before = monitor.get_completed_runs()
    processing._actions_view.train_button.click()
    pump(model, controller, lambda: monitor.get_completed_runs() > before, timeout_s=240)
    monitor.raise_if_failed()


def _infer_from_the_gui(gui, index: int):
    """The Infer button; returns the output product (on the input object's grid)."""
    model, processing = gui["model"], gui["processing"]
    repository = model.product_core.product_repository
    monitor = model.processing_core.processing_api.task_monitor
    before, count = monitor.get_completed_runs(), len(repository)
    processing._actions_view.reconstruct_button.click()
    pump(model, gui["controller"], lambda: monitor.get_completed_runs() > before
         and len(repository) > count, timeout_s=240)
    monitor.raise_if_failed()
    pump(model, gui["controller"], lambda: True)
    out = repository[len(repository) - 1].get_product()
    obj_in = repository[index].get_product().object_
    assert out.object_.get_array().shape == obj_in.get_array().shape
    assert out.object_.get_pixel_geometry() == obj_in.get_pixel_geometry()
    assert out.object_.get_center() == obj_in.get_center()
    return out


def test_open_train_infer_from_the_gui(gui):
    model, controller, processing = gui["model"], gui["controller"], gui["processing"]
    work: Path = gui["work"]
    scan = make_scan(N=64, n_side=4, step=8, seed=3)
    index = _open_scan(gui, work, scan)
    repository = model.product_core.product_repository
    size_label = processing.ptychopinn_jax_view_controller_factory.widgets["pinn"]["model", "N"]
    assert size_label.text().startswith("64 x 64")
    combo = processing._product_view_controller.get_widget()
    combo.setCurrentIndex(index)
    model.processing_core.algorithm_parameter.set_value("ptychopinn-jax_pinn")
    assert processing._actions_view.reconstruct_button.text() == "Infer"
    assert not processing._actions_view.reconstruct_button.isEnabled()  # no model yet

    _train_from_the_gui(gui, work, epochs=2)

    losses = repository[index].get_losses()
    assert [loss.epoch for loss in losses] == [1, 2]
    line = gui["view"].processing_status_view.axes.get_lines()[0]
    assert len(line.get_xdata()) == 2
    assert processing._actions_view.reconstruct_button.isEnabled()  # Infer, no re-selection

    # a PtychoPINN's Poisson NLL is usually negative: ptychodus's log plot would be empty
    from ptychodus.api.product import LossValue

    from backend_api.ptychodus.processing import set_product_losses

    positive = list(losses)
    set_product_losses(repository[index], [LossValue(1, -3.9e6), LossValue(2, -3.91e6)])
    axes = gui["view"].processing_status_view.axes
    assert axes.get_yscale() == "linear"
    assert list(axes.get_lines()[0].get_ydata()) == [-3.9e6, -3.91e6]
    set_product_losses(repository[index], positive)
    assert axes.get_yscale() == "log"

    out = _infer_from_the_gui(gui, index)
    assert not np.allclose(out.object_.get_array(),
                           repository[index].get_product().object_.get_array())
    assert gui["library"]["PINN"].last_info["stitch"]["mode"] == "blend"


@pytest.mark.slow
def test_real_jax_backend_trains_and_infers_from_the_gui(gui, tmp_path):
    """The same GUI path with pinn-jax itself in the children (1 epoch, a tiny network)."""
    library, processing = gui["library"], gui["processing"]
    saved = [(r, r._registrations, r._model_path) for r in library]
    settings = library.settings
    settings.parameter("model", "NumFiltersScale").set_value(1)
    settings.parameter("training", "BatchSize").set_value(16)
    try:
        for reconstructor in library:
            reconstructor._registrations = {}  # no stand-in: the real 'jax' backend
            reconstructor._model_path = None
        index = _open_scan(gui, tmp_path, make_scan(N=64, n_side=5, step=6, seed=4))
        gui["model"].processing_core.algorithm_parameter.set_value("ptychopinn-jax_pinn")
        processing._sync_model_to_view()
        assert not processing._actions_view.reconstruct_button.isEnabled()
        _train_from_the_gui(gui, tmp_path, epochs=1)
        repository = gui["model"].product_core.product_repository
        losses = repository[index].get_losses()
        assert len(losses) == 1 and np.isfinite(losses[0].value)
        line = gui["view"].processing_status_view.axes.get_lines()[0]
        assert np.isfinite(line.get_ydata()).all() and len(line.get_ydata()) == 1
        assert processing._actions_view.reconstruct_button.isEnabled()
        out = _infer_from_the_gui(gui, index)
        assert np.isfinite(out.object_.get_array()).all()
    finally:
        for reconstructor, registrations, model_path in saved:
            reconstructor._registrations, reconstructor._model_path = registrations, model_path
