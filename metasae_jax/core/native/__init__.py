"""Native CPU kernels as XLA FFI custom calls, built from source on first use; XLA fallbacks elsewhere.

Selections (`row_kth.cc`): `row_kth(x, k)` is each row's k-th largest value (the
threshold of per-token TopK); `row_top_k(x, k)` is lax.top_k(x, k) itself (the
candidates of BatchTopK); `row_top_k_masked(x, mask, k)` the positive top k among
the masked columns (AuxK's dead latents). Linear-time selection, rows over
threads: ~10x faster than XLA:CPU's single-core top_k at AuxK's shape.

Slot products (`slots.cc`), for K (latent, value) slots per token, a slot of
value 0 being absent: `slot_gather_sum` (a decoder over the slots),
`slot_gather_dot` (its value gradient at the present slots) and
`slot_scatter_outer` (a weight gradient and the per-latent value sums). At most
2*B*K*D work each instead of a dense matmul's 2*B*N*D.

On GPU/TPU, or when the kernels cannot be built, the same results come from XLA
(lax.top_k; dense matmuls for the slot products). The library is compiled once
per (sources, jaxlib, CPU, compiler and flags) with the C++ compiler (`$CXX`, else `c++`;
`-march=native`) into `$METASAE_JAX_CACHE` (default ~/.cache/metasae-jax); `make
install` builds it. METASAE_JAX_NATIVE=0 turns it off. Without a compiler a
warning says so once and the fallbacks run.
"""

import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

_SOURCES = tuple(os.path.join(os.path.dirname(__file__), f) for f in ("row_kth.cc", "slots.cc"))
_HEADERS = (os.path.join(os.path.dirname(__file__), "ranges.h"),)
# FFI target name -> symbol in the library.
_TARGETS = {"metasae_row_kth": "MetasaeRowKth", "metasae_row_top_k": "MetasaeRowTopK",
            "metasae_row_top_k_masked": "MetasaeRowTopKMasked",
            "metasae_slot_gather_sum": "MetasaeSlotGatherSum", "metasae_slot_gather_dot": "MetasaeSlotGatherDot",
            "metasae_slot_scatter_outer": "MetasaeSlotScatterOuter"}


def cache_dir() -> str:
  return os.environ.get("METASAE_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "metasae-jax")


def _cpu_flags() -> bytes:
  """What -march=native compiles for: the CPU's feature flags (a shared cache serves each CPU its own build)."""
  try:
    with open("/proc/cpuinfo", "rb") as f:
      return next((line for line in f if line.startswith((b"flags", b"Features"))), b"")
  except OSError:
    return b""


def _compile_command(out: str) -> list:
  return [os.environ.get("CXX", "c++"), "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
          "-I", jax.ffi.include_dir(), *_SOURCES, "-o", out, "-lpthread"]


def _compiler_identity(cxx: str) -> bytes:
  """The compiler's own version banner (a different compiler or version is a different build)."""
  try:
    return subprocess.run([cxx, "--version"], check=True, capture_output=True, timeout=60).stdout
  except (OSError, subprocess.SubprocessError):
    return b"unavailable"


def _library_path() -> str:
  import jaxlib  # pylint: disable=g-import-not-at-top
  cmd = _compile_command("OUT")
  h = hashlib.sha256(jaxlib.__version__.encode() + platform.machine().encode() + _cpu_flags())
  # The build key includes the compiler, its version and every flag, not just the sources.
  h.update(" ".join(cmd).encode() + _compiler_identity(cmd[0]))
  for src in _SOURCES + _HEADERS:
    with open(src, "rb") as f:
      h.update(f.read())
  return os.path.join(cache_dir(), f"kernels-{h.hexdigest()[:16]}.so")


def build() -> str:
  """Compiles the kernel into the cache (atomically; concurrent builds are harmless) and returns its path."""
  path = _library_path()
  if os.path.exists(path):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
  os.close(fd)
  cmd = _compile_command(tmp)
  try:
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    os.replace(tmp, path)
  except (OSError, subprocess.CalledProcessError) as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    detail = getattr(e, "stderr", "") or str(e)
    raise RuntimeError(f"building {', '.join(_SOURCES)} failed ({' '.join(cmd[:1])}): {detail.strip()[-500:]}") from e
  return path


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """Whether the CPU kernels are built and registered (builds them on first call).

  Only when the default backend is the CPU: a GPU/TPU host never compiles or
  registers them (its steps lower the XLA forms, and the CPU branch of a
  platform-dependent op is dropped when lowering for an accelerator).
  """
  if os.environ.get("METASAE_JAX_NATIVE", "1") == "0" or jax.default_backend() != "cpu":
    return False
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    lib = ctypes.cdll.LoadLibrary(build())
    for target, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return True
  except (OSError, RuntimeError, AttributeError) as e:
    logging.warning("metasae-jax: native kernels unavailable, using XLA's top_k and dense matmuls instead "
                    "(slower on CPU): %s", e)
    return False


def _threads() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def row_kth_reference(x: jax.Array, k: int) -> jax.Array:
  """Each row's k-th largest value via lax.top_k (a reduction of the values: slicing a top_k
  result makes XLA:CPU lower it as a full sort)."""
  return jnp.min(jax.lax.top_k(x, k)[0], axis=-1)


def _call(target: str, args: tuple, native: Optional[bool], fallback, results, vmap_method: str, **attrs):
  """Runs the custom call `target` on CPU (when built, not turned off, and every float argument is
  float32), else `fallback(*args)`. No gradient: callers define it (custom_vjp) where needed.

  `results` gives the custom call's output shapes and dtypes.
  """
  args = tuple(jax.lax.stop_gradient(a) for a in args)
  floats_ok = all(a.dtype == jnp.float32 for a in args if jnp.issubdtype(a.dtype, jnp.floating))
  if native is False or not floats_ok or not available():
    return fallback(*args)

  def on_cpu(*vs):
    out = jax.ffi.ffi_call(target, results, vmap_method=vmap_method)(
        *vs, threads=np.int64(_threads()), **{k: np.int64(v) for k, v in attrs.items()})
    # + a zero derived from the first argument: under shard_map the results must vary over the mesh
    # axes as the inputs do (the custom call's outputs carry no such type), or the branches would differ.
    vary = jnp.zeros_like(vs[0], shape=(), dtype=jnp.float32)
    return jax.tree.map(lambda o: o + vary.astype(o.dtype), out)

  return jax.lax.platform_dependent(*args, cpu=on_cpu, default=fallback)


def _check_k(x, k, what):
  if not 1 <= k <= x.shape[-1]:
    raise ValueError(f"{what} needs 1 <= k <= {x.shape[-1]}, got {k}")


def row_kth(x: jax.Array, k: int, native: Optional[bool] = None) -> jax.Array:
  """The k-th largest value of each row (last axis) of a float32 array, without gradient.

  `native` None: the kernel on CPU when available, else the reference; False: always the reference.
  """
  _check_k(x, k, "row_kth")
  return _call("metasae_row_kth", (x,), native, lambda v: row_kth_reference(v, k),
               jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32), "broadcast_all", k=k)


def row_top_k(x: jax.Array, k: int, native: Optional[bool] = None, sorted: bool = True) -> tuple:  # pylint: disable=redefined-builtin
  """lax.top_k(x, k) without gradient: the same values and indices, in the same order (values
  descending, ties by ascending index). On CPU the kernel selects in linear time over threads.

  `sorted=False` leaves the k chosen entries in an unspecified order (the kernel: ascending index;
  the fallback: top_k's), which saves sorting them when only the set matters.
  """
  _check_k(x, k, "row_top_k")
  batch = x.shape[:-1]
  return _call("metasae_row_top_k", (x,), native, lambda v: tuple(jax.lax.top_k(v, k)),
               (jax.ShapeDtypeStruct(batch + (k,), jnp.float32), jax.ShapeDtypeStruct(batch + (k,), jnp.int32)),
               "broadcast_all", k=k, sorted=int(sorted))


def row_top_k_masked(x: jax.Array, mask: jax.Array, k: int, native: Optional[bool] = None) -> tuple:
  """Each row's largest *positive* entries among the columns where `mask` (last axis) is set, up to k,
  without gradient: (values, indices), [..., k]. Ties go to the lower index; the slots left over (fewer
  than k positive masked entries) hold value 0 and an unspecified valid index; the chosen slots come in
  an unspecified order. AuxK's selection: the kernel never writes the masked matrix."""
  if not k >= 1 or mask.shape != x.shape[-1:]:
    raise ValueError(f"row_top_k_masked needs k >= 1 and a mask of shape {x.shape[-1:]}, got k={k}, "
                     f"{mask.shape}")

  def fallback(v, on):
    k_eff = min(k, v.shape[-1])
    top, idx = jax.lax.top_k(jnp.where(on & ~(v <= 0), v, 0.0), k_eff)  # NaN stays
    pad = [(0, 0)] * (v.ndim - 1) + [(0, k - k_eff)]
    return jnp.pad(top, pad), jnp.pad(idx, pad)

  batch = x.shape[:-1]
  return _call("metasae_row_top_k_masked", (x, mask.astype(bool)), native, fallback,
               (jax.ShapeDtypeStruct(batch + (k,), jnp.float32), jax.ShapeDtypeStruct(batch + (k,), jnp.int32)),
               "sequential", k=k)


def _slots_dense(vals_BxK: jax.Array, idx_BxK: jax.Array, n: int) -> jax.Array:
  """The slots as a dense [B, N] matrix (duplicate slots add up)."""
  b = vals_BxK.shape[0]
  return jnp.zeros((b, n), vals_BxK.dtype).at[jnp.arange(b)[:, None], idx_BxK].add(vals_BxK)


def _check_slots(vals_BxK, idx_BxK, what):
  if vals_BxK.ndim != 2 or vals_BxK.shape != idx_BxK.shape:
    raise ValueError(f"{what} needs [B, K] values and indices of one shape, got {vals_BxK.shape} and "
                     f"{idx_BxK.shape}")


# The slot products take `matmul(a, b)` for their fallbacks (e.g. with low-precision inputs).


def slot_gather_sum(vals_BxK: jax.Array, idx_BxK: jax.Array, w_NxD: jax.Array, native: Optional[bool] = None,
                    matmul=jnp.matmul) -> jax.Array:
  """out[b] = Σ_j vals[b, j] · w[idx[b, j]]: a decoder over K slots per token, [B, D]. No gradient."""
  _check_slots(vals_BxK, idx_BxK, "slot_gather_sum")
  return _call("metasae_slot_gather_sum", (vals_BxK, idx_BxK, w_NxD), native,
               lambda v, i, w: matmul(_slots_dense(v, i, w.shape[0]), w),
               jax.ShapeDtypeStruct((vals_BxK.shape[0], w_NxD.shape[1]), jnp.float32), "sequential")


def slot_gather_dot(g_BxD: jax.Array, idx_BxK: jax.Array, w_NxD: jax.Array, vals_BxK: jax.Array,
                    native: Optional[bool] = None, matmul=jnp.matmul) -> jax.Array:
  """out[b, j] = g[b] · w[idx[b, j]] where vals[b, j] != 0, else 0: the value gradient of
  `slot_gather_sum` at its present slots, [B, K]. No gradient."""
  _check_slots(vals_BxK, idx_BxK, "slot_gather_dot")
  return _call("metasae_slot_gather_dot", (g_BxD, idx_BxK, w_NxD, vals_BxK), native,
               lambda g, i, w, v: jnp.where(v != 0, jnp.take_along_axis(matmul(g, w.T), i, axis=1), 0.0),
               jax.ShapeDtypeStruct(idx_BxK.shape, jnp.float32), "sequential")


def slot_scatter_outer(vals_BxK: jax.Array, idx_BxK: jax.Array, rows_BxD: jax.Array, n: int,
                       native: Optional[bool] = None, matmul=jnp.matmul) -> tuple:
  """(Σ over slots of vals[b, j] · rows[b] into row idx[b, j] of [N, D], Σ of vals per latent [N]):
  the weight gradient of `slot_gather_sum` (rows = the output's gradient) or of an encoder over the
  slots (rows = its inputs, vals = the values' gradient). No gradient."""
  _check_slots(vals_BxK, idx_BxK, "slot_scatter_outer")

  def dense(v, i, r):
    a = _slots_dense(v, i, n)
    return matmul(a.T, r), jnp.sum(a, axis=0)

  return _call("metasae_slot_scatter_outer", (vals_BxK, idx_BxK, rows_BxD), native, dense,
               (jax.ShapeDtypeStruct((n, rows_BxD.shape[1]), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.float32)),
               "sequential")
