"""pinn_jax.loop internals: the compiled-step memo (bounded, hashable keys only) and the loop
record a run checkpoint carries."""

import dataclasses

import jax.numpy as jnp
import pytest

from pinn_jax import loop
from pinn_jax.checkpoint import _LOOP_KEYS
from pinn_jax.schedules import EarlyStoppingState, PlateauState


@dataclasses.dataclass(frozen=True)
class _Loss:
    """A hashable loss; ``k`` makes distinct keys."""

    k: int

    def __call__(self, params, rest, batch, key):
        r = batch["x"] @ params["w"] - batch["y"] * self.k
        return r**2, {}


@pytest.fixture
def empty_memo():
    loop._cached_steps.cache_clear()
    yield
    loop._cached_steps.cache_clear()


def test_equal_hashable_losses_share_one_compiled_pair(empty_memo):
    mesh = loop.make_mesh()
    a = loop._compiled_steps(_Loss(1), (0.9, 0.999, 1e-7), mesh)
    b = loop._compiled_steps(_Loss(1), (0.9, 0.999, 1e-7), mesh)
    c = loop._compiled_steps(_Loss(1), (0.8, 0.999, 1e-7), mesh)
    assert a is b and a is not c


def test_memo_keeps_at_most_eight_pairs(empty_memo):
    mesh = loop.make_mesh()
    first = loop._compiled_steps(_Loss(0), (0.9, 0.999, 1e-7), mesh)
    for k in range(1, loop._STEP_CACHE_SIZE + 1):
        loop._compiled_steps(_Loss(k), (0.9, 0.999, 1e-7), mesh)
    info = loop._cached_steps.cache_info()
    assert info.maxsize == 8 and info.currsize == 8
    # the least recently used pair (the first) was dropped: asking again builds a new one
    assert loop._compiled_steps(_Loss(0), (0.9, 0.999, 1e-7), mesh) is not first


def test_unhashable_loss_is_built_afresh_not_memoised(empty_memo):
    class Unhashable:
        __hash__ = None

        def __call__(self, params, rest, batch, key):
            return jnp.sum(batch["x"] * params["w"], axis=1), {}

    mesh = loop.make_mesh()
    fn = Unhashable()
    a = loop._compiled_steps(fn, (0.9, 0.999, 1e-7), mesh)
    b = loop._compiled_steps(fn, (0.9, 0.999, 1e-7), mesh)
    assert a is not b and loop._cached_steps.cache_info().currsize == 0


def test_loop_record_has_exactly_the_keys_a_restore_checks():
    state = loop._LoopState(plateau=PlateauState(lr=1e-3), early=EarlyStoppingState(),
                            history={"loss": [float("nan"), 1.0]})
    rec = state.record(2, 100, 16)
    assert set(rec) == _LOOP_KEYS
    assert rec["epochs_done"] == 2 and rec["n_samples"] == 100 and rec["batch_size"] == 16
    assert rec["history"] == {"loss": ["nan", 1.0]}
    assert PlateauState(**rec["plateau"]) == state.plateau
    assert EarlyStoppingState(**rec["early_stopping"]) == state.early


def test_sample_count_checks_the_leading_axis():
    assert loop._sample_count({"a": jnp.zeros((5, 2)), "b": jnp.zeros(5)}) == 5
    with pytest.raises(ValueError, match="at least one array"):
        loop._sample_count({})
    with pytest.raises(ValueError, match="share the leading"):
        loop._sample_count({"a": jnp.zeros((5, 2)), "b": jnp.zeros(4)})
