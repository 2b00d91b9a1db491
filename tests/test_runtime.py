"""pinn_jax.runtime: XLA flag merging (pure) and one subprocess check that the installed jaxlib
accepts the recommended flags and computes a convolution to float32 accuracy with them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pinn_jax import runtime


def test_flag_name_spellings():
    assert runtime.flag_name("--xla_cpu_use_xnnpack=false") == "xla_cpu_use_xnnpack"
    assert runtime.flag_name("--xla_cpu_use_xnnpack") == "xla_cpu_use_xnnpack"
    assert runtime.flag_name("--noxla_cpu_use_xnnpack") == "xla_cpu_use_xnnpack"
    assert runtime.flag_name("--xla_cpu_experimental_ynn_fusion_type=") == "xla_cpu_experimental_ynn_fusion_type"
    assert runtime.flag_name("junk") is None
    assert runtime.flag_name("--") is None


def test_merge_adds_only_missing_and_keeps_user_entries_first():
    rec = {"xla_a": "1", "xla_b": ""}
    merged, added = runtime.merge_xla_flags("--xla_force_host_platform_device_count=4 --xla_a=7", rec)
    assert added == ["--xla_b="]
    assert merged == "--xla_force_host_platform_device_count=4 --xla_a=7 --xla_b="
    merged, added = runtime.merge_xla_flags("", rec)
    assert merged == "--xla_a=1 --xla_b=" and added == ["--xla_a=1", "--xla_b="]
    # a boolean 'no' spelling counts as the user's choice
    merged, added = runtime.merge_xla_flags("--noxla_a", rec)
    assert added == ["--xla_b="] and merged.startswith("--noxla_a ")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(["--xla_a=1", "--xla_b=x,y", "--noxla_c", "--xla_d", "--xla_force_x=4"]),
                max_size=5))
def test_merge_never_overrides_and_is_idempotent(user):
    rec = {"xla_a": "9", "xla_b": "", "xla_c": "true", "xla_new": "v"}
    existing = " ".join(user)
    merged, added = runtime.merge_xla_flags(existing, rec)
    assert merged.split()[: len(user)] == user  # the user's entries, verbatim and first
    user_names = {runtime.flag_name(t) for t in user}
    assert all(runtime.flag_name(a) not in user_names for a in added)
    assert {runtime.flag_name(t) for t in merged.split()} >= set(rec)
    again, added2 = runtime.merge_xla_flags(merged, rec)
    assert again == merged and added2 == []


def test_configure_respects_opt_out_and_existing_setting():
    env = {"PINN_JAX_XLA_DEFAULTS": "0"}
    assert runtime.configure_cpu_runtime(env) == [] and "XLA_FLAGS" not in env
    env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    assert runtime.configure_cpu_runtime(env) == []
    assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"


def test_configure_adds_supported_flags_once():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    added = runtime.configure_cpu_runtime(env)
    assert added == [f"--{k}={v}" for k, v in runtime.recommended_xla_flags().items()]
    assert env["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=2")
    assert runtime.configure_cpu_runtime(env) == []


def test_unknown_flags_are_never_recommended():
    assert runtime.supported_flags({"xla_cpu_this_flag_does_not_exist_42": "1"}) == {}
    assert runtime.supported_flags({"xla_cpu_enable_fast_math": "NOT_A_REAL_ENUM_VALUE_42"}) == {}


_CHILD = r"""
import json, sys
import numpy as np
import jax, jax.numpy as jnp
from jax import lax
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 12, 12, 5)).astype(np.float32)
w = rng.standard_normal((3, 3, 5, 4)).astype(np.float32)
f = lambda x, w: jnp.sum(jnp.sin(lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))))
y = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
gw = jax.jit(jax.grad(f, argnums=1))(x, w)
print(json.dumps({"y": np.asarray(y).tolist(), "gw": np.asarray(gw).tolist()}))
"""


def _direct_conv(x, w):
    B, H, W, _ = x.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = np.zeros((B, H, W, w.shape[-1]))
    for i in range(3):
        for j in range(3):
            y += np.einsum("bhwc,co->bhwo", xp[:, i : i + H, j : j + W], w[i, j].astype(np.float64))
    return y


def test_recommended_flags_run_and_are_exact_enough():
    """The installed jaxlib starts with the flags (an unknown flag would abort it) and a conv and
    its weight gradient match a float64 reference to float32 accuracy."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    runtime.configure_cpu_runtime(env)
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 12, 12, 5)).astype(np.float32)
    w = rng.standard_normal((3, 3, 5, 4)).astype(np.float32)
    ref = _direct_conv(x, w)
    y = np.asarray(out["y"])
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-5
    # weight gradient of sum(sin(conv)): sum over positions of x-patch * cos(conv)
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    g = np.cos(ref)
    gw_ref = np.stack([np.stack([np.einsum("bhwc,bhwo->co", xp[:, i : i + 12, j : j + 12], g)
                                 for j in range(3)]) for i in range(3)])
    gw = np.asarray(out["gw"])
    assert np.linalg.norm(gw - gw_ref) / np.linalg.norm(gw_ref) < 1e-5


@pytest.mark.parametrize("bad", ["'unbalanced", "--xla_a='x y'"])
def test_merge_tolerates_quoting(bad):
    merged, added = runtime.merge_xla_flags(bad, {"xla_b": "1"})
    assert merged.startswith(bad) and added == ["--xla_b=1"]


# ---------------------------------------------------------------------------------------------
# No import-time side effect; the one public call (fresh interpreters: XLA_FLAGS is per process)

_IMPORT_PROBE = r"""
import json, os, sys, warnings
before = os.environ.get("XLA_FLAGS")
import pinn_jax
after_import = os.environ.get("XLA_FLAGS")
out = {"before": before, "after_import": after_import, "jax_loaded": "jax" in sys.modules}
if sys.argv[1] == "call":
    out["added"] = pinn_jax.configure_cpu_runtime()
    out["after_call"] = os.environ.get("XLA_FLAGS")
    out["again"] = pinn_jax.configure_cpu_runtime()
elif sys.argv[1] == "late":
    import jax
    jax.devices()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out["added"] = pinn_jax.configure_cpu_runtime()
    out["warnings"] = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    out["after_call"] = os.environ.get("XLA_FLAGS")
print(json.dumps(out))
"""


def _probe(mode: str, xla_flags: str | None, opt_out: str | None = None) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.pop(runtime.OPT_OUT_ENV, None)
    env["JAX_PLATFORMS"] = "cpu"
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    if opt_out is not None:
        env[runtime.OPT_OUT_ENV] = opt_out
    proc = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, mode], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("user_flags", [None, "--xla_force_host_platform_device_count=2"])
def test_import_pinn_jax_leaves_xla_flags_untouched(user_flags):
    out = _probe("import", user_flags)
    assert out["before"] == user_flags and out["after_import"] == user_flags
    assert not out["jax_loaded"]  # nothing to configure jax with has even been imported


def test_public_call_adds_flags_once_and_keeps_user_flags_first():
    user = "--xla_force_host_platform_device_count=2"
    out = _probe("call", user)
    assert out["after_import"] == user
    assert out["added"] == [f"--{k}={v}" for k, v in runtime.recommended_xla_flags().items()]
    assert out["after_call"] == " ".join([user] + out["added"])
    assert out["again"] == []
    assert runtime.configure_cpu_runtime is __import__("pinn_jax").configure_cpu_runtime


def test_public_call_never_overrides_a_user_flag_and_honours_opt_out():
    mine = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
    out = _probe("call", mine)
    assert out["added"] == [] and out["after_call"] == mine
    out = _probe("call", None, opt_out="0")
    assert out["added"] == [] and out["after_call"] is None


def test_public_call_after_jax_started_warns_and_changes_nothing():
    out = _probe("late", None)
    assert out["added"] == [] and out["after_call"] is None
    assert len(out["warnings"]) == 1 and "configure_cpu_runtime()" in out["warnings"][0]


def test_compile_cache_folder_threshold_and_opt_out(tmp_path):
    """The cache goes under XDG_CACHE_HOME with a 0.1 s threshold (jax's 1 s default would skip
    the ~0.8 s refinement step); a folder or threshold the user set wins; the opt-out leaves the
    environment alone."""
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    assert runtime.configure_compile_cache(env) == str(tmp_path / "pinn_jax" / "xla")
    assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "pinn_jax" / "xla")
    assert env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "0.1"
    mine = {"JAX_COMPILATION_CACHE_DIR": "/elsewhere", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "2"}
    assert runtime.configure_compile_cache(mine) == "/elsewhere"
    assert mine == {"JAX_COMPILATION_CACHE_DIR": "/elsewhere", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "2"}
    off = {"PINN_JAX_COMPILE_CACHE": "0"}
    assert runtime.configure_compile_cache(off) is None and off == {"PINN_JAX_COMPILE_CACHE": "0"}


@pytest.mark.slow
def test_cli_reuses_the_refinement_it_compiled(tmp_path):
    """Two `pinn-jax reconstruct` runs in fresh processes: the first writes the refinement's
    compiled programs to the cache folder, the second finds them (no new entries)."""
    from pinn_jax import simulate

    data = tmp_path / "data"
    simulate.simulate_to_npz(data, N=64, object_size=128, n_images=64, seed=0)
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)
    entries = []
    for k in range(2):
        r = subprocess.run([sys.executable, "-m", "pinn_jax", "reconstruct", "--test_data", str(data / "test_data.npz"),
                            "--iterations", "1", "--output_dir", str(tmp_path / f"out{k}"), "--quiet"],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        entries.append(sorted(p.name for p in (tmp_path / "cache" / "pinn_jax" / "xla").iterdir()))
    assert any(name.startswith("jit_step") for name in entries[0]), entries[0]
    assert entries[1] == entries[0]


def test_the_compile_cache_silences_only_the_uncacheable_onednn_programs(tmp_path, monkeypatch):
    """A program with oneDNN convolutions cannot be stored; jax's warning about that is silenced
    once the cache is configured (the program compiles in every process), other warnings of the
    same kind are not."""
    import warnings

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        monkeypatch.delenv(name, raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        monkeypatch.setattr(runtime, "sys", type("S", (), {"modules": {}})())  # leave jax's config alone
        runtime.configure_compile_cache()
        warnings.warn("Error writing persistent compilation cache entry for 'jit_step': MemoryError: std::bad_alloc",
                      UserWarning)
        warnings.warn("Error writing persistent compilation cache entry for 'jit_step': OSError: disk full", UserWarning)
    assert [str(w.message) for w in seen] == [
        "Error writing persistent compilation cache entry for 'jit_step': OSError: disk full"]


def test_configure_malloc_adds_the_huge_page_tunable_once(monkeypatch):
    """glibc's huge-page tunable joins GLIBC_TUNABLES (kept as the user has it), unless the user
    set that tunable, opted out, or the host is not Linux."""
    monkeypatch.setattr(runtime.sys, "platform", "linux")
    env = {}
    assert runtime.configure_malloc(env) and env == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert not runtime.configure_malloc(env) and env == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    theirs = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert runtime.configure_malloc(theirs)
    assert theirs["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    chosen = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert not runtime.configure_malloc(chosen) and chosen == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    for opt_out in ({"PINN_JAX_HUGE_PAGES": "0"}, {"PINN_JAX_XLA_DEFAULTS": "off"}):
        assert not runtime.configure_malloc(opt_out) and "GLIBC_TUNABLES" not in opt_out
    monkeypatch.setattr(runtime.sys, "platform", "darwin")
    assert not runtime.configure_malloc({})


def test_the_command_line_restarts_itself_with_the_tunable(monkeypatch):
    """``pinn-jax`` (main() without argv) re-executes itself, once, as ``python -m pinn_jax`` with
    the same arguments and the tunable in its environment; main(argv) (a caller in Python) and a
    process that already has the tunable do not."""
    from pinn_jax import cli

    class Restarted(Exception):
        pass

    calls = []

    def execv(path, args):
        calls.append((path, args, os.environ.get("GLIBC_TUNABLES")))
        raise Restarted

    monkeypatch.setattr(runtime.sys, "platform", "linux")
    monkeypatch.setattr(cli.os, "execv", execv)
    monkeypatch.setattr(cli.sys, "argv", ["pinn-jax", "simulate", "--help"])
    for name in ("PINN_JAX_HUGE_PAGES", "PINN_JAX_XLA_DEFAULTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "")  # empty = unset for glibc; restored after the test
    assert cli.main(["--version"]) == 0 and calls == []
    with pytest.raises(Restarted):
        cli.main()
    assert calls == [(sys.executable, [sys.executable, "-m", "pinn_jax", "simulate", "--help"],
                      "glibc.malloc.hugetlb=1")]
    assert cli.main() == 0 and len(calls) == 1  # the restarted process goes on (here: --help)


def test_switch_values_and_the_child_self_test(tmp_path):
    """Environment switches: off and on values (case and spaces ignored), anything else neither;
    ``self_test_in_child`` reports the child's verdict, and a child that cannot run the test
    (here: no such module) counts as failed."""
    from pinn_jax import runtime

    for value in ("0", " Off ", "FALSE", "no"):
        assert runtime.switched_off(value) and not runtime.switched_on(value)
    for value in ("1", " On ", "TRUE", "yes"):
        assert runtime.switched_on(value) and not runtime.switched_off(value)
    for value in (None, "", "auto"):
        assert not runtime.switched_on(value) and not runtime.switched_off(value)
    (tmp_path / "verdicts.py").write_text(
        "import os\ndef self_test():\n    return os.environ['VERDICT'] == 'pass'\n")
    env = {"PYTHONPATH": str(tmp_path)}
    assert runtime.self_test_in_child("verdicts", {**env, "VERDICT": "pass"}, timeout=120)
    assert not runtime.self_test_in_child("verdicts", {**env, "VERDICT": "fail"}, timeout=120)
    assert not runtime.self_test_in_child("no_such_module_here", env, timeout=120)
