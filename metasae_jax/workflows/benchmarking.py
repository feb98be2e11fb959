"""Step-time measurements: fast train_step vs the straightforward implementation, FLOPs, matmul roof.

Legend: B = batch, D = d_model, N = width, M = meta width.
"""

import dataclasses
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from metasae_jax.core import naive
from metasae_jax.core.config import TrainConfig
from metasae_jax.core.train_step import init_train_state, train_step


def matmul_roof(b: int, d: int, n: int, repeats: int = 3) -> float:
  """Sustained fp32 GFLOP/s of one [B, D] x [D, N] matmul on this machine."""
  x = jax.random.normal(jax.random.PRNGKey(0), (b, d))
  w = jax.random.normal(jax.random.PRNGKey(1), (d, n))
  f = jax.jit(lambda x, w: x @ w)
  jax.block_until_ready(f(x, w))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x, w))
    best = min(best, time.perf_counter() - t0)
  return 2 * b * d * n / best / 1e9


def step_flops(config: TrainConfig, joint: bool, solo: bool, naive_impl: bool = False) -> float:
  """Matmul FLOPs of one step (amortising the meta phase over n_primary_steps)."""
  b, d, n, m = config.batch_size, config.d_model, config.width, config.meta_width
  per_sae = (6 if naive_impl else 5) * 2 * b * d * n  # enc fwd, dec fwd, d_acts, dW_dec, dW_enc (+ d b_dec)
  flops = per_sae * (int(joint) + int(solo))
  if joint and config.lambda2 > 0:
    meta_fwd = 2 * 2 * n * d * m
    flops += meta_fwd + config.n_meta_steps / config.n_primary_steps * 3 * meta_fwd
  return float(flops)


def _batches(config: TrainConfig, count: int):
  rng = np.random.default_rng(0)
  return [jnp.asarray(rng.normal(size=(config.batch_size, config.d_model)).astype(np.float16))
          for _ in range(count)]


def time_steps(config: TrainConfig, impl: str, steps: int, warmup: int = 1) -> float:
  """Seconds per step in steady state (after compilation and `warmup` steps)."""
  batches = _batches(config, 4)
  state = init_train_state(config)
  if impl == "fast":
    step = jax.jit(train_step, donate_argnums=0)
    run = lambda s, x: step(s, x)[0]
  else:
    run = lambda s, x: naive.run_steps(s, [x])
  for i in range(warmup):
    state = run(state, batches[i % 4])
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for i in range(steps):
    state = run(state, batches[i % 4])
  jax.block_until_ready(state)
  return (time.perf_counter() - t0) / steps


def measure(config: TrainConfig, impl: str, steps: int) -> dict:
  """One JSON-able line: solo-only, joint-only, joint+solo step times, ratio, FLOPs, utilisation."""
  solo_cfg = dataclasses.replace(config, lambda2=0.0, baseline=False)
  joint_cfg = dataclasses.replace(config, baseline=False)
  t_solo = time_steps(solo_cfg, impl, steps)
  t_joint = time_steps(joint_cfg, impl, steps)
  t_both = time_steps(config, impl, steps)
  roof = matmul_roof(config.batch_size, config.d_model, config.width)
  flops = step_flops(config, True, config.baseline, impl == "naive")
  return {"impl": impl, "shape": {"d": config.d_model, "n": config.width, "k": config.k, "m": config.meta_width,
                                  "meta_k": config.meta_k, "B": config.batch_size},
          "steps_timed": steps, "solo_s_per_step": t_solo, "joint_s_per_step": t_joint,
          "joint_plus_solo_s_per_step": t_both, "joint_over_solo": t_joint / t_solo,
          "tokens_per_s_joint_plus_solo": config.batch_size / t_both,
          "tokens_per_s_solo": config.batch_size / t_solo,
          "gflop_per_step": flops / 1e9, "matmul_roof_gflops": roof,
          "utilisation": flops / t_both / 1e9 / roof,
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
