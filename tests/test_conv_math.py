"""bfloat16 convolution math (pinn_jax.runtime.configure_conv_math): the setting, its wiring into
the command line and the ptychodus child, and what oneDNN computes under it (in child processes:
oneDNN fixes its math mode for the whole process at its first convolution).

Under bfloat16 math oneDNN rounds both operands of every product to bfloat16 (8 significant
bits, unit roundoff u = 2**-8) and sums in float32. Per output element, with S the same sum over
absolute values and n the number of products:

    |bf16 result - exact| <= (2u + u**2) * S  +  n * eps32 * (1 + 2u + u**2) * S

and XLA's float32 result is within n * eps32 * S of exact, so the two differ by at most
(2u + u**2 + 2.1 * n * eps32) * S. Where the CPU has AMX bfloat16 tiles (Sapphire Rapids and
later: checked there), oneDNN takes the bfloat16 path and the difference exceeds the float32
bound; elsewhere it may compute in float32, which the bound also admits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pinn_jax import runtime
from pinn_jax.models import onednn

needs_onednn = pytest.mark.skipif(not onednn.automatic(), reason="the oneDNN path is off on this host or jaxlib")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


# ---------------------------------------------------------------------------------------------
# the setting
# ---------------------------------------------------------------------------------------------


def test_default_is_float32_and_changes_nothing():
    env: dict[str, str] = {}
    assert runtime.configure_conv_math(None, env) == "float32"
    assert env == {}
    assert runtime.conv_math_in_effect(env) == "float32"


@pytest.mark.parametrize("value", ["bfloat16", " BFloat16 ", "BFLOAT16"])
def test_the_environment_variable_chooses_bfloat16(value):
    env = {runtime.CONV_MATH_ENV: value}
    assert runtime.configure_conv_math(None, env) == "bfloat16"
    assert env[runtime.ONEDNN_FPMATH_ENV] == "BF16"
    assert runtime.conv_math_in_effect(env) == "bfloat16"


def test_an_explicit_choice_wins_over_the_environment():
    env = {runtime.CONV_MATH_ENV: "bfloat16", runtime.ONEDNN_FPMATH_ENV: "BF16"}
    assert runtime.configure_conv_math("float32", env) == "float32"
    assert env[runtime.ONEDNN_FPMATH_ENV] == "STRICT"
    assert runtime.configure_conv_math("bfloat16", env) == "bfloat16"
    assert env[runtime.ONEDNN_FPMATH_ENV] == "BF16"


def test_the_default_leaves_a_onednn_mode_set_outside_alone():
    for mode, seen in (("bf16", "bfloat16"), ("any", "oneDNN ANY"), ("strict", "float32")):
        env = {runtime.ONEDNN_FPMATH_ENV: mode}
        assert runtime.configure_conv_math(None, env) == seen
        assert env == {runtime.ONEDNN_FPMATH_ENV: mode}


def test_bad_values_name_the_setting_and_the_choices():
    with pytest.raises(ValueError, match=r"PINN_JAX_CONV_MATH='half'.*'bfloat16', 'float32'"):
        runtime.configure_conv_math(None, {runtime.CONV_MATH_ENV: "half"})
    with pytest.raises(ValueError, match=r"conv_math='tf32'"):
        runtime.configure_conv_math("tf32", {})


def test_after_onednn_ran_it_warns_and_changes_nothing(monkeypatch):
    monkeypatch.delenv(runtime.ONEDNN_FPMATH_ENV, raising=False)
    monkeypatch.setattr(onednn, "_compiled", True)
    assert onednn.calls_compiled()
    with pytest.warns(RuntimeWarning, match="already run oneDNN convolutions"):
        assert runtime.configure_conv_math("bfloat16") == "float32"
    assert runtime.ONEDNN_FPMATH_ENV not in os.environ
    # asking for what is in effect is fine
    assert runtime.configure_conv_math("float32") == "float32"


def test_the_onednn_self_test_runs_in_float32_whatever_the_user_chose(monkeypatch):
    seen = {}

    def fake(module, env, timeout):
        seen.update(env)
        return True

    monkeypatch.setattr(onednn, "self_test_in_child", fake)
    onednn._child_self_test.cache_clear()
    try:
        assert onednn._child_self_test()
    finally:
        onednn._child_self_test.cache_clear()
    assert seen[runtime.ONEDNN_FPMATH_ENV] == "STRICT"


# ---------------------------------------------------------------------------------------------
# wiring: the command line and the ptychodus child configure it before anything computes
# ---------------------------------------------------------------------------------------------


def _argv(cmd: str, tmp_path: Path) -> list[str]:
    """A command line whose inputs exist but cannot be read: the run fails after configuring."""
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    bad_model = tmp_path / "model"
    bad_model.mkdir(exist_ok=True)
    (bad_model / "wts.h5.zip").write_bytes(b"not a zip")
    return {"train": ["train", "--train_data_file", str(bad)],
            "infer": ["infer", "--model_path", str(bad_model), "--test_data", str(bad)],
            "reconstruct": ["reconstruct", "--test_data", str(bad), "--output_dir", str(tmp_path / "o")],
            "demo": ["demo"]}[cmd]


@pytest.mark.parametrize("cmd", ["train", "infer", "reconstruct", "demo"])
def test_the_commands_take_conv_math(cmd, capsys, tmp_path):
    from pinn_jax import cli
    from pinn_jax.cli_parser import build_parser

    argv = _argv(cmd, tmp_path)
    assert build_parser().parse_args([*argv, "--conv_math", "bfloat16"]).conv_math == "bfloat16"
    assert build_parser().parse_args(argv).conv_math is None
    assert cli.main([*argv, "--conv_math", "half"]) == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["train", "infer", "reconstruct"])
def test_the_command_applies_it_before_anything_else(cmd, monkeypatch, capsys, tmp_path):
    from pinn_jax import cli

    calls = []
    monkeypatch.setattr(runtime, "configure_conv_math", lambda math=None, environ=None: calls.append(math) or "x")
    assert cli.main([*_argv(cmd, tmp_path), "--conv_math", "bfloat16"]) == 2  # then fails on the input
    capsys.readouterr()
    assert calls == ["bfloat16"]


def test_a_bad_environment_value_is_a_one_line_error_before_any_work(monkeypatch, capsys, tmp_path):
    from pinn_jax import cli

    monkeypatch.setenv(runtime.CONV_MATH_ENV, "fp8")
    rc = cli.main(_argv("reconstruct", tmp_path))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "PINN_JAX_CONV_MATH='fp8'" in err and err.startswith("pinn-jax reconstruct: error:")
    assert not (tmp_path / "o").exists()


def test_the_ptychodus_child_reads_the_environment_variable(monkeypatch):
    from pinn_jax.backend import JaxBackend

    calls = []
    monkeypatch.setattr(runtime, "configure_conv_math", lambda math=None, environ=None: calls.append(math))
    monkeypatch.setattr(runtime, "configure_compile_cache", lambda environ=None: None)
    monkeypatch.setattr(runtime, "configure_cpu_runtime", lambda environ=None: [])
    JaxBackend.configure_runtime()
    assert calls == [None]


# ---------------------------------------------------------------------------------------------
# what oneDNN computes under each math, in child processes
# ---------------------------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from pinn_jax import runtime
    math = runtime.configure_conv_math()           # from PINN_JAX_CONV_MATH, before any convolution
    import jax, jax.numpy as jnp
    from pinn_jax.models import onednn
    DN = ("NHWC", "HWIO", "NHWC")
    rng = np.random.default_rng(0)
    out = {"math": math, "enabled": onednn.enabled(), "cases": []}
    for ci, co, pad in ((64, 32, ((1, 1), (1, 1))), (5, 7, ((0, 2), (2, 1)))):
        x = jnp.asarray(rng.standard_normal((2, 9, 11, ci)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((3, 3, ci, co)), jnp.float32)
        conv = lambda a, b, p: jax.lax.conv_general_dilated(a, b, (1, 1), p, dimension_numbers=DN,
                                                            precision="highest")
        y = jax.jit(lambda x, k: onednn.conv2d(x, k, pad))(x, k)
        ref, scale = conv(x, k, pad), conv(jnp.abs(x), jnp.abs(k), pad)
        g = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)
        dx = jax.jit(lambda g, k: onednn.conv2d_input_grad(g, k, pad))(g, k)
        dx_ref = jax.vjp(lambda v: conv(v, k, pad), x)[1](g)[0]
        dx_scale = jax.vjp(lambda v: conv(v, jnp.abs(k), pad), x)[1](jnp.abs(g))[0]
        for got, want, s, n in ((y, ref, scale, 9 * ci), (dx, dx_ref, dx_scale, 9 * co)):
            err = np.abs(np.asarray(got) - np.asarray(want))
            out["cases"].append({"n": n, "err_over_scale": (err / (np.asarray(s) + 1e-30)).max().item(),
                                 "rel_l2": float(np.linalg.norm(err) / np.linalg.norm(np.asarray(want)))})
    print(json.dumps(out))
""")


def _run_child(math: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != runtime.ONEDNN_FPMATH_ENV}
    env.update({runtime.CONV_MATH_ENV: math, "JAX_PLATFORMS": "cpu"})
    done = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


EPS32 = float(np.finfo(np.float32).eps)
U_BF16 = 2.0 ** -8


@needs_onednn
def test_float32_math_is_within_the_float32_bound():
    out = _run_child("float32")
    assert out["math"] == "float32" and out["enabled"]
    for case in out["cases"]:
        assert case["err_over_scale"] <= 2 * case["n"] * EPS32, case


@needs_onednn
def test_bfloat16_math_is_within_its_bound_and_taken_where_the_cpu_has_amx():
    out = _run_child("bfloat16")
    assert out["math"] == "bfloat16" and out["enabled"]
    for case in out["cases"]:
        bound = 2 * U_BF16 + U_BF16 ** 2 + 2.1 * case["n"] * EPS32
        assert case["err_over_scale"] <= bound, case
    if "amx_bf16" in _cpu_flags():
        # the bfloat16 path was taken: errors of bfloat16's size, far beyond float32's
        assert all(case["err_over_scale"] > 2 * case["n"] * EPS32 for case in out["cases"]), out
        assert all(case["rel_l2"] > 1e-4 for case in out["cases"]), out
