"""Measurements: fast train_step vs the straightforward one (FLOPs, matmul roof), mean |φ| at scale, exporter speed.

Legend: B = batch, D = d_model, N = width, M = meta width.
"""

import dataclasses
import itertools
import os
import resource
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from metasae_jax.core import naive
from metasae_jax.core.errors import UserError
from metasae_jax.evaluation import cooccurrence
from metasae_jax.evaluation import firings as firings_lib
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


def synthetic_firings(width: int, num_tokens: int, k: int, seed: int = 0,
                      chunk: int = 65536) -> firings_lib.Firings:
  """Random firings with Zipf-like latent frequencies, ~k distinct latents per token (benchmarks)."""
  rng = np.random.default_rng(seed)
  weights = 1.0 / (np.arange(width) + 50.0)
  cdf = np.cumsum(weights / weights.sum())
  perm = rng.permutation(width)
  lens, lats = [], []
  for start in range(0, num_tokens, chunk):
    c = min(chunk, num_tokens - start)
    draw = perm[np.minimum(np.searchsorted(cdf, rng.random((c, 2 * k))), width - 1)]
    draw.sort(axis=1)
    dup = np.zeros_like(draw, bool)
    dup[:, 1:] = draw[:, 1:] == draw[:, :-1]
    # Keep k of the distinct draws chosen at random (not the k smallest ids).
    key = np.where(dup, 2.0, rng.random(draw.shape))
    pick = np.argpartition(key, k - 1, axis=1)[:, :k]
    keep = np.zeros_like(dup)
    np.put_along_axis(keep, pick, True, axis=1)
    keep &= ~dup
    lens.append(keep.sum(axis=1))
    lats.append(draw[keep].astype(np.int32))
  lens = np.concatenate(lens)
  lat = np.concatenate(lats)
  return firings_lib.Firings(np.concatenate([[0], np.cumsum(lens)]).astype(np.int64), lat,
                            np.ones(len(lat), np.float32), np.arange(num_tokens, dtype=np.int64), width)


def benchmark_phi(width: int = 9216, num_tokens: int = 1_000_000, k: int = 64, seed: int = 0,
                  workers: int = 2) -> dict:
  """Times `phi_stats` on synthetic firings (target: 9216 latents, 1M tokens, k=64 under 60 s)."""
  firings = synthetic_firings(width, num_tokens, k, seed)
  start = time.perf_counter()
  stats = cooccurrence.phi_stats(firings, workers=workers, progress=True)
  seconds = time.perf_counter() - start
  return {"width": width, "num_tokens": num_tokens, "k": k,
          "mean_l0": float(len(firings.latents_F) / num_tokens), "workers": workers,
          "seconds": seconds, "mean_abs_phi": stats.mean_abs_phi, "num_pairs": stats.num_pairs}


def benchmark_export(config, loaded=None, num_batches: int = 8, rounds: int = 2) -> dict:
  """Exporter tokens/s vs the raw truncated forward's tokens/s on the same batches (into a temp dir).

  `config` is an `lm.export.ExportConfig`, `loaded` an `lm.models.LoadedModel` (loaded here when None).
  """
  from metasae_jax.lm import corpus as corpus_lib  # pylint: disable=g-import-not-at-top  (torch side)
  from metasae_jax.lm import export, models  # pylint: disable=g-import-not-at-top
  if loaded is None:
    loaded = models.load_model(config.model)
  num_ctx = num_batches * config.batch_size
  ctx = corpus_lib.contexts(config.corpus, loaded.tokenizer, config.context_len, config.text_field)
  got = list(itertools.islice(ctx, num_ctx))
  if len(got) < num_ctx:
    raise UserError(f"--corpus {config.corpus} has fewer than {num_ctx} contexts to benchmark on.")
  tokens_NxC = np.stack(got)
  num_tokens = num_ctx * config.context_len

  def raw_forward():
    export.forward_only(loaded, tokens_NxC, config.batch_size, config.layer, config.site)

  export.forward_only(loaded, tokens_NxC[:config.batch_size], config.batch_size, config.layer,
                      config.site)  # warm-up
  # Alternate raw and export rounds and keep each one's best: other processes sharing the CPU
  # slow whichever happens to run at the time. CPU time (all threads of this process) is less
  # sensitive to them than wall time, so both are reported.
  raw_s, export_s, raw_cpu, export_cpu = [], [], [], []
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(rounds):
      bench = dataclasses.replace(
          config, out_dir=os.path.join(tmp, f"store{r}"), num_tokens=num_tokens, progress=False,
          shard_tokens=max(config.context_len, min(config.shard_tokens, num_tokens // 2)))
      t0, c0 = time.perf_counter(), time.process_time()
      raw_forward()
      t1, c1 = time.perf_counter(), time.process_time()
      export.export_activations(bench, loaded)
      t2, c2 = time.perf_counter(), time.process_time()
      raw_s.append(t1 - t0)
      export_s.append(t2 - t1)
      raw_cpu.append(c1 - c0)
      export_cpu.append(c2 - c1)
  return {"num_tokens": num_tokens, "rounds": rounds,
          "forward_tokens_per_s": num_tokens / min(raw_s),
          "export_tokens_per_s": num_tokens / min(export_s),
          "ratio": min(raw_s) / min(export_s),
          "cpu_ratio": min(raw_cpu) / min(export_cpu)}
