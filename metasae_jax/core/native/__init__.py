"""Native CPU kernels as XLA FFI custom calls, built from source on first use; lax fallbacks elsewhere.

`row_kth(x, k)` is each row's k-th largest value: what AuxK and per-token TopK
need from a top_k (their thresholds). `row_top_k(x, k)` is lax.top_k(x, k) itself
(the candidates of BatchTopK). On CPU they run `row_kth.cc` (linear-time selection
over the positive entries, rows over threads: ~10x faster than XLA:CPU's
single-core top_k at AuxK's shape, 4096 x 5760, k 512); on GPU/TPU, or when the
kernel cannot be built, lax.top_k. Same values either way.

The kernel is compiled once per (source, jaxlib) with the C++ compiler (`$CXX`,
else `c++`) into `$METASAE_JAX_CACHE` (default ~/.cache/metasae-jax); `make install`
builds it. METASAE_JAX_NATIVE=0 turns it off. Without a compiler a warning says
so once and the fallback runs.
"""

import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = os.path.join(os.path.dirname(__file__), "row_kth.cc")
_TARGET = "metasae_row_kth"
_TARGET_TOP_K = "metasae_row_top_k"


def cache_dir() -> str:
  return os.environ.get("METASAE_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "metasae-jax")


def _library_path() -> str:
  import jaxlib  # pylint: disable=g-import-not-at-top
  with open(_SOURCE, "rb") as f:
    key = hashlib.sha256(f.read() + jaxlib.__version__.encode()).hexdigest()[:16]
  return os.path.join(cache_dir(), f"row_kth-{key}.so")


def build() -> str:
  """Compiles the kernel into the cache (atomically; concurrent builds are harmless) and returns its path."""
  path = _library_path()
  if os.path.exists(path):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
  os.close(fd)
  cmd = [os.environ.get("CXX", "c++"), "-O3", "-std=c++17", "-shared", "-fPIC", "-w",
         "-I", jax.ffi.include_dir(), _SOURCE, "-o", tmp, "-lpthread"]
  try:
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    os.replace(tmp, path)
  except (OSError, subprocess.CalledProcessError) as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    detail = getattr(e, "stderr", "") or str(e)
    raise RuntimeError(f"building {_SOURCE} failed ({' '.join(cmd[:1])}): {detail.strip()[-500:]}") from e
  return path


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """Whether the CPU kernel is built and registered (builds it on first call)."""
  if os.environ.get("METASAE_JAX_NATIVE", "1") == "0":
    return False
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    lib = ctypes.cdll.LoadLibrary(build())
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.MetasaeRowKth), platform="cpu")
    jax.ffi.register_ffi_target(_TARGET_TOP_K, jax.ffi.pycapsule(lib.MetasaeRowTopK), platform="cpu")
    return True
  except (OSError, RuntimeError, AttributeError) as e:
    logging.warning("metasae-jax: native row_kth kernel unavailable, using lax.top_k instead (slower on CPU): %s", e)
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


def _select(x: jax.Array, k: int, native: Optional[bool], target: str, fallback, results):
  """Runs `target` on x's rows on CPU (when built and not turned off), else `fallback(x)`; no gradient.

  `results(batch_shape)` gives the custom call's output shapes and dtypes.
  """
  x = jax.lax.stop_gradient(x)
  if not 1 <= k <= x.shape[-1]:
    raise ValueError(f"{target} needs 1 <= k <= {x.shape[-1]}, got {k}")
  if native is False or x.dtype != jnp.float32 or not available():
    return fallback(x)

  def on_cpu(v):
    out = jax.ffi.ffi_call(target, results(v.shape[:-1]), vmap_method="broadcast_all")(
        v, k=np.int64(k), threads=np.int64(_threads()))
    # + a zero derived from v: under shard_map the results must vary over the mesh axes as v does
    # (the custom call's outputs carry no such type), or the two platform branches would differ.
    vary = jnp.zeros_like(v, shape=())
    return jax.tree.map(lambda o: o + vary.astype(o.dtype), out)

  return jax.lax.platform_dependent(x, cpu=on_cpu, default=fallback)


def row_kth(x: jax.Array, k: int, native: Optional[bool] = None) -> jax.Array:
  """The k-th largest value of each row (last axis) of a float32 array, without gradient.

  `native` None: the kernel on CPU when available, else the reference; False: always the reference.
  """
  return _select(x, k, native, _TARGET, lambda v: row_kth_reference(v, k),
                 lambda batch: jax.ShapeDtypeStruct(batch, jnp.float32))


def row_top_k(x: jax.Array, k: int, native: Optional[bool] = None) -> tuple:
  """lax.top_k(x, k) without gradient: the same values and indices, in the same order (values
  descending, ties by ascending index). On CPU the kernel selects in linear time over threads.
  """
  return _select(x, k, native, _TARGET_TOP_K, lambda v: tuple(jax.lax.top_k(v, k)),
                 lambda batch: (jax.ShapeDtypeStruct(batch + (k,), jnp.float32),
                                jax.ShapeDtypeStruct(batch + (k,), jnp.int32)))
