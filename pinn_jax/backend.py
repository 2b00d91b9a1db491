"""``JaxBackend``: the ``'jax'`` entry of ``backend_api``'s backend registry.

Implements the :class:`backend_api.backends.Backend` protocol with the reference's return
values (brief data_config_persistence.md §4.1):

* ``train_cdi_model`` -> results with ``history`` (dict of lists), ``history_epochs``,
  ``train_container``, ``test_container``, ``model_instance`` (an
  :class:`~pinn_jax.inference.InferenceModel`; ``.model`` is the trained PtychoPINN),
  ``intensity_scale``, and for test data the autoencoder outputs ``reconstructed_obj``
  (object patches), ``pred_amp`` (scaled amplitude), ``reconstructed_obj_cdi`` (predicted
  intensity; the reference's third output) and ``stitched_obj``;
* ``run_cdi_example`` adds ``obj_tensor_full``, ``global_offsets``, ``recon_amp``,
  ``recon_phase`` when stitching;
* ``save_model`` / ``load_inference_bundle`` use :mod:`pinn_jax.checkpoint`;
* ``reconstruct`` groups raw data (or takes a container), predicts and stitches, and places
  the object on a given grid for ptychodus.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from backend_api.canvas import STITCH_CROP

__all__ = ["JaxBackend", "as_container"]

log = logging.getLogger(__name__)


def _is_container(data: Any) -> bool:
    return hasattr(data, "X") and hasattr(data, "local_offsets") and hasattr(data, "global_offsets")


def as_container(data: Any, config: Any, *, seed: int | None = 0):
    """A ``PtychoDataContainer`` from RawData (grouped as the reference workflow does, with
    ``seed``) or a container (returned unchanged). Anything else raises TypeError like the
    reference's ``create_ptycho_data_container``."""
    from backend_api.container import PtychoDataContainer

    if data is None:
        return None
    if _is_container(data):
        return data
    if hasattr(data, "diff3d") and hasattr(data, "xcoords"):
        return PtychoDataContainer.from_raw_data(data, config, seed=seed)
    raise TypeError(
        f"expected a backend_api RawData or PtychoDataContainer, got {type(data).__name__}"
    )


def _unwrap(model: Any):
    from pinn_jax.inference import InferenceModel
    from pinn_jax.model import PtychoPINN

    if isinstance(model, InferenceModel):
        return model.model
    if isinstance(model, PtychoPINN):
        return model
    if isinstance(model, dict) and "model_instance" in model:
        return _unwrap(model["model_instance"])
    raise ValueError(
        f"model: expected a pinn_jax PtychoPINN or InferenceModel (results['model_instance']), "
        f"got {type(model).__name__}"
    )


class JaxBackend:
    """The JAX backend (see module docstring). ``seed`` fixes grouping, weights and shuffling;
    ``checkpoint_dir``/``resume`` enable run checkpoints; ``progress`` shows the tqdm bar;
    ``shard_data``: split the training groups over the devices (None: in a multi-process run;
    each process then assembles only its own shard from RawData, see
    :mod:`pinn_jax.sharded_grouping`, and ``results['train_container']`` holds those rows)."""

    name = "jax"

    def __init__(self, *, seed: int = 0, checkpoint_dir: str | os.PathLike | None = None,
                 resume: bool = False, progress: bool = True, shard_data: bool | None = None):
        self.seed = int(seed)
        self.shard_data = shard_data
        self.checkpoint_dir = checkpoint_dir
        self.resume = bool(resume)
        self.progress = bool(progress)

    @staticmethod
    def configure_runtime() -> None:
        """Apply pinn-jax's CPU XLA settings to this process (:func:`pinn_jax.runtime.
        configure_cpu_runtime`: adds only flags the user has not set), its compilation cache
        (:func:`pinn_jax.runtime.configure_compile_cache`) and the convolutions' math from
        ``$PINN_JAX_CONV_MATH`` (:func:`pinn_jax.runtime.configure_conv_math`; float32 unless
        set). Call it before the first jax computation; entry points (the CLI, the ptychodus
        child) do."""
        from pinn_jax.runtime import configure_compile_cache, configure_conv_math, configure_cpu_runtime

        configure_conv_math()
        configure_compile_cache()
        configure_cpu_runtime()

    @staticmethod
    def reassemble_on_grid_with_weights(patches: Any, positions: Any, object_shape: Sequence[int],
                                        crop: int) -> tuple[np.ndarray, np.ndarray]:
        """The Backend protocol's on-grid stitcher (what :meth:`reconstruct` uses with
        ``object_shape``): ``patches (n, N, N, 1)`` complex, ``positions (n, 2)`` ``[x, y]``
        object pixels -> ``(object (H, W) complex64, weights (H, W) float32)`` as numpy."""
        from pinn_jax.geometry import reassemble_on_grid_with_weights

        obj, weights = reassemble_on_grid_with_weights(patches, positions, tuple(object_shape), int(crop))
        return np.asarray(obj), np.asarray(weights)

    @staticmethod
    def refine_on_grid(amplitudes: Any, positions: Any, probe: Any, initial: Any, *, iterations: int,
                       noise: str = "gaussian", refine_probe: bool = False, refine_positions: bool = False,
                       seed: int = 0, tv_weight: float = 0.0,
                       full_batch_from: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
        """The Backend protocol's optional physics refinement (:mod:`pinn_jax.refine`) of
        ``initial`` ``(H, W)`` complex against ``amplitudes`` ``(n, N, N)`` float32 measured at
        ``positions`` ``(n, 2)`` ``[x, y]`` object pixels with ``probe`` ``(N, N)`` complex.
        Patches that do not lie inside the grid are left out (counted in the info). Returns
        ``(object (H, W) complex64, footprint (H, W) float32 = patches covering each pixel,
        info)``; ``ValueError`` when no patch lies inside the grid or an input is malformed."""
        from pinn_jax.refine import RefineOptions, illumination_footprint, inside_grid, refine_object

        options = RefineOptions(iterations=int(iterations), noise=str(noise), refine_probe=bool(refine_probe),
                                refine_positions=bool(refine_positions), seed=int(seed), tv_weight=float(tv_weight),
                                full_batch_from=None if full_batch_from is None else int(full_batch_from))
        amp = np.asarray(amplitudes, np.float32)
        pos = np.asarray(positions, np.float64).reshape(-1, 2)
        shape = tuple(int(v) for v in np.shape(initial))
        if amp.ndim != 3 or len(pos) != len(amp):
            raise ValueError(f"refine: expected amplitudes (n, N, N) and positions (n, 2), got {amp.shape} "
                             f"and {pos.shape}")
        keep = inside_grid(pos, amp.shape[-1], shape)
        if not keep.any():
            raise ValueError(f"refine: none of the {len(pos)} patches lies inside the {shape[0]} x {shape[1]} "
                             "object grid")
        result = refine_object(amp[keep], pos[keep], probe, initial, options)
        info = {"passes": int(iterations), "misfit": [float(result.history[0]), float(result.history[-1])],
                "positions_used": int(keep.sum()), "positions_outside_grid": int((~keep).sum())}
        footprint = illumination_footprint(result.positions, amp.shape[-1], shape)
        return result.obj, footprint, info

    # -- training -----------------------------------------------------------------------------
    def _shards(self, train_data: Any) -> bool:
        if self.shard_data is not None:
            return bool(self.shard_data)
        import jax

        return jax.process_count() > 1

    def train_cdi_model(self, train_data: Any, test_data: Any, config: Any, *, seed: int | None = None,
                        checkpoint_dir: str | os.PathLike | None = None, resume: bool | None = None,
                        history_path: str | os.PathLike | None = None,
                        on_epoch_end: Any = None) -> dict:
        """Train (see module docstring). ``on_epoch_end(epoch, logs)`` is called after each
        epoch (0-based epoch; logs hold loss, val_loss, learning_rate, ...)."""
        from backend_api import params as legacy
        from pinn_jax import inference
        from pinn_jax.train import train_model

        if train_data is None:
            raise ValueError("train_data: expected RawData or a PtychoDataContainer, got None")
        config.validate()
        seed = self.seed if seed is None else int(seed)
        shard = self._shards(train_data)
        n_global = None
        if shard and not _is_container(train_data):
            from pinn_jax.sharded_grouping import local_training_container

            train_c, n_global = local_training_container(train_data, config, seed=seed)
        else:
            train_c = as_container(train_data, config, seed=seed)
        test_c = as_container(test_data, config, seed=seed)
        outcome = train_model(
            train_c,
            config,
            seed=seed,
            checkpoint_dir=self.checkpoint_dir if checkpoint_dir is None else checkpoint_dir,
            resume=self.resume if resume is None else bool(resume),
            progress=self.progress,
            history_path=history_path,
            on_epoch_end=on_epoch_end,
            shard_data=shard,
            n_samples=n_global,
        )
        # As the reference: cfg carries the training scale and the normalised probe.
        legacy.cfg["intensity_scale"] = outcome.intensity_scale
        legacy.cfg["probe"] = np.asarray(outcome.model.probe, np.complex64).reshape(
            outcome.model.spec.N, outcome.model.spec.N, 1
        )
        history = dict(outcome.history)
        if "loss" in history and "train_loss" not in history:
            history["train_loss"] = list(history["loss"])
        results: dict[str, Any] = {
            "history": history,
            "history_epochs": list(range(outcome.epochs_run)),
            "model_instance": inference.InferenceModel(outcome.model),
            "train_container": train_c,
            "test_container": test_c,
            "intensity_scale": outcome.intensity_scale,
            "stopped_early": outcome.stopped_early,
        }
        if test_c is not None:
            s = float(np.asarray(outcome.model.intensity_scale))
            obj, amp, inten = inference.predict_autoencoder(
                outcome.model, np.asarray(test_c.X, np.float32) * np.float32(s),
                np.asarray(test_c.coords_nominal, np.float32),
            )
            results["reconstructed_obj"] = obj
            results["pred_amp"] = amp
            results["reconstructed_obj_cdi"] = inten
            try:
                _, _, st = inference.stitch(obj, test_c.global_offsets, M=STITCH_CROP)
                results["stitched_obj"] = st["stitched_obj"]
            except ValueError as exc:  # the reference stores None when stitching fails
                log.warning("stitching the test reconstruction failed: %s", exc)
                results["stitched_obj"] = None
        return results

    def run_cdi_example(self, train_data: Any, test_data: Any, config: Any, *, flip_x: bool = False,
                        flip_y: bool = False, transpose: bool = False, M: int = STITCH_CROP,
                        do_stitching: bool = False) -> tuple[Any, Any, dict]:
        from pinn_jax import inference

        results = self.train_cdi_model(train_data, test_data, config)
        if do_stitching and test_data is not None and "reconstructed_obj" in results:
            # The reference re-predicts with diffraction_to_obj([X*s, local_offsets]); the
            # autoencoder's object output is the same function of the same inputs.
            amp, phase, st = inference.stitch(
                results["reconstructed_obj"], results["test_container"].global_offsets,
                M=M, flip_x=flip_x, flip_y=flip_y, transpose=transpose,
            )
            st.pop("stitched_obj", None)
            results.update(st)
            return amp, phase, results
        return None, None, results

    # -- persistence --------------------------------------------------------------------------
    def save_model(self, model: Any, output_dir: str | os.PathLike, config: Any = None) -> Path:
        from pinn_jax.checkpoint import save_model

        return save_model(_unwrap(model), output_dir, config)

    def load_inference_bundle(self, model_dir: str | os.PathLike) -> tuple[Any, dict]:
        from pinn_jax import inference

        model, _cfg = inference.load_inference_bundle(model_dir)
        return model, dict(model.params)

    # -- inference ----------------------------------------------------------------------------
    def reconstruct(self, model: Any, data: Any, *, config: Any = None, M: int = STITCH_CROP,
                    object_shape: Sequence[int] | None = None, **kwargs: Any):
        """The Backend protocol's reconstruct: :func:`pinn_jax.pipeline.reconstruct` with the
        grouping and photon count of ``config`` (a Training/InferenceConfig or None) and this
        backend's seed unless ``seed=`` is given; other keywords (``flip_x``, ``flip_y``,
        ``transpose``, ``coord_scale``, ``batch_size``, ``max_canvas_pixels``, ``grouping``)
        pass through. Returns ``(amplitude, phase, results)``."""
        from pinn_jax import pipeline

        kwargs.setdefault("seed", self.seed)
        kwargs.setdefault("grouping", pipeline.grouping_from_config(config))
        if config is not None and getattr(config, "nphotons", None) is not None:
            kwargs.setdefault("nphotons", float(config.nphotons))
        return pipeline.reconstruct(model, data, M=M, object_shape=object_shape, **kwargs)
