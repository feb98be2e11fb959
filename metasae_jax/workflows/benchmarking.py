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
          chunk_tokens=max(config.context_len, min(config.chunk_tokens, num_tokens // 2)))
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


# ---- Real activations: the store, steady-state steps, slow-path events, stages, scaling, memory ----

REAL_LAYER = 15
REAL_TOKENS = 262144
EVENT_KEYS = ("spill_rows", "dense_fallback")


def real_store(workdir: str, num_tokens: int = REAL_TOKENS, layer: int = REAL_LAYER, progress: bool = False):
  """The built-in model's layer-`layer` activations over the built-in corpus, exported once under `workdir`.

  The built-in corpus may hold fewer tokens than asked; the store then holds the whole corpus.
  """
  from metasae_jax.lm import export  # pylint: disable=g-import-not-at-top  (torch side)
  return export.export_activations(export.ExportConfig(
      out_dir=os.path.join(workdir, f"store-l{layer}"), layer=layer, num_tokens=num_tokens, progress=progress))


def store_batches(store_path: str, batch_size: int, count: int, seed: int = 0) -> list:
  """The trainer's first `count` batches from a store (its shuffle and skip rule), as host arrays."""
  from metasae_jax.storage import store as store_lib  # pylint: disable=g-import-not-at-top
  from metasae_jax.training import data  # pylint: disable=g-import-not-at-top
  source = data.BatchSource(store_lib.open_store(store_path), batch_size, seed, 1)
  return [source.batch(i) for i in range(count)]


def train_steps(config: TrainConfig, batches: list, warmup: int, steps: int) -> dict:
  """Steady-state seconds per fast step after `warmup` steps, on `batches` cycled, and slow-path events.

  Every step is timed (blocking on its state), so the per-step list shows how the
  step slows as dead latents and spilling rows appear; metrics are fetched after.
  """
  step = jax.jit(train_step, donate_argnums=0)
  state = init_train_state(config)
  on_device = [jax.device_put(b) for b in batches]
  t_compile = time.perf_counter()
  state, _ = step(state, on_device[0])
  jax.block_until_ready(state)
  first = time.perf_counter() - t_compile
  for i in range(1, warmup):
    state, _ = step(state, on_device[i % len(on_device)])
  jax.block_until_ready(state)
  times, metrics = [], []
  for i in range(warmup, warmup + steps):
    t0 = time.perf_counter()
    state, m = step(state, on_device[i % len(on_device)])
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
    metrics.append(m)
  metrics = jax.device_get(metrics)
  out = {"first_step_with_compile_s": first, "warmup_steps": warmup, "steps_timed": steps,
         "s_per_step": float(np.mean(times)), "s_per_step_median": float(np.median(times)),
         "s_per_step_first10": float(np.mean(times[:10])), "s_per_step_last10": float(np.mean(times[-10:])),
         "tokens_per_s": config.batch_size / float(np.mean(times))}
  for sae_name in ("joint", "solo"):
    if f"{sae_name}/spill_rows" not in metrics[0]:
      continue
    for key in EVENT_KEYS:
      vals = np.array([float(m[f"{sae_name}/{key}"]) for m in metrics])
      out[f"{sae_name}_{key}_per_step"] = float(vals.mean())
      out[f"{sae_name}_{key}_max"] = float(vals.max())
    out[f"{sae_name}_dead_fraction_end"] = float(metrics[-1][f"{sae_name}/dead_fraction"])
  out["joint_fvu_end"] = float(metrics[-1]["joint/fvu"])
  return out


def naive_steps(config: TrainConfig, batches: list, warmup: int, steps: int) -> dict:
  """The straightforward JAX step (core.naive), same batches, same timing rule."""
  state = init_train_state(config)
  on_device = [jax.device_put(b) for b in batches]
  for i in range(warmup):
    state = naive.run_steps(state, [on_device[i % len(on_device)]])
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for i in range(warmup, warmup + steps):
    state = naive.run_steps(state, [on_device[i % len(on_device)]])
  jax.block_until_ready(state)
  return {"warmup_steps": warmup, "steps_timed": steps, "s_per_step": (time.perf_counter() - t0) / steps}


def torch_steps(config: TrainConfig, batches: list, warmup: int, steps: int, device: str = "cpu") -> dict:
  """The PyTorch baseline (lm.torch_baseline) on `device` ("cpu" or "cuda"), same batches, same timing rule."""
  from metasae_jax.lm import torch_baseline  # pylint: disable=g-import-not-at-top  (torch side)
  times = torch_baseline.time_steps(config, batches, warmup, steps, device=device)
  return {"warmup_steps": warmup, "steps_timed": steps, "s_per_step": float(np.mean(times)),
          "s_per_step_first10": float(np.mean(times[:10])), "s_per_step_last10": float(np.mean(times[-10:]))}


def torch_train(store_path: str, config: TrainConfig, steps: int, device: str = "cpu") -> None:
  """The PyTorch baseline end to end on `device`: store → `steps` joint + solo steps (the trainer's batches)."""
  from metasae_jax.lm import torch_baseline  # pylint: disable=g-import-not-at-top  (torch side)
  from metasae_jax.storage import store as store_lib  # pylint: disable=g-import-not-at-top
  from metasae_jax.training import data  # pylint: disable=g-import-not-at-top
  source = data.BatchSource(store_lib.open_store(store_path), config.batch_size, config.seed, 1)
  base = torch_baseline.Baseline(config, device=device)
  for i in range(steps):
    base.step(source.batch(i))
  torch_baseline.synchronize(device)


def _timed(f, *args, repeats: int = 3) -> float:
  jax.block_until_ready(f(*args))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def stage_breakdown(config: TrainConfig, batches: list, warmup: int = 20, repeats: int = 3,
                    read_batch=None) -> dict:
  """Seconds per stage of one SAE's step, each stage compiled on its own, on a state trained `warmup` steps.

  Stages: host-side batch read, encoder matmul, candidate selection + threshold,
  sparse decoder with its gradients, AuxK (value + gradient), the penalty's meta
  forward, one meta phase (amortised over n_primary_steps), the optimiser. The
  whole fused step is measured too; the pieces need not add up to it exactly.
  `read_batch(position)` is the host-side data path (store read, gather, device put);
  the trainer overlaps it with the step on a prefetch thread.
  """
  from metasae_jax.core import losses, meta, optimizer, sae, sparse, topk  # pylint: disable=g-import-not-at-top
  from metasae_jax.core import train_step as ts  # pylint: disable=g-import-not-at-top
  step = jax.jit(train_step, donate_argnums=0)
  state = init_train_state(config)
  for i in range(warmup):
    state, _ = step(state, jax.device_put(batches[i % len(batches)]))
  x = jax.device_put(batches[warmup % len(batches)]).astype(jnp.float32)
  params, since = state.joint.params, state.joint.since_fired
  xs = sae.standardize(x)[0]
  k = config.k
  out = {}
  if read_batch is not None:
    reads = []
    for i in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(jax.device_put(read_batch(i)))
      reads.append(time.perf_counter() - t0)
    out["host_data_s"] = min(reads)
  out["encoder_matmul_s"] = _timed(jax.jit(lambda p, xs: sae.pre_activations(p, xs)), params, xs, repeats=repeats)
  pre = jax.jit(sae.pre_activations)(params, xs)

  def select(pre):
    cand, idx = topk.candidates(pre, k)
    sel = topk.threshold_from_candidates(cand, pre, k)
    return sel.thresh, cand, idx, sel.spill_B

  out["select_threshold_s"] = _timed(jax.jit(select), pre, repeats=repeats)
  thresh, cand, idx, spill = jax.jit(select)(pre)

  def dec(p, cand, idx):
    def f(p):
      vals = jnp.where((cand >= thresh) & (cand > 0),
                       sparse.slot_pre(cand, idx, xs, p["W_enc"], p["b_dec"], p["b_enc"]), 0.0)
      return jnp.mean((sparse.slot_decode(vals, idx, p["W_dec"]) + p["b_dec"] - xs) ** 2)
    return jax.grad(f)(p)

  out["sparse_decoder_and_grads_s"] = _timed(jax.jit(dec), params, cand, idx, repeats=repeats)
  dead = since >= config.dead_after_batches
  out["dead_latents"] = int(jnp.sum(dead))
  residual = jax.random.normal(jax.random.PRNGKey(0), xs.shape) * 0.1

  def aux(p, pre):
    return jax.grad(lambda p: losses.sae_auxk(p, xs, pre, dead, residual, config.aux_k, config.auxk_detach))(p)

  out["auxk_s"] = _timed(jax.jit(aux), params, pre, repeats=repeats)
  if config.lambda2 > 0:
    pen = jax.jit(jax.grad(lambda w, mp: meta.penalty(w, mp, config.meta_k, config.sigma_sq)[0]))
    out["meta_penalty_s"] = _timed(pen, params["W_dec"], state.meta.params, repeats=repeats)
    phase = jax.jit(lambda m, w: ts._meta_phase(m, w, config))  # pylint: disable=protected-access
    out["meta_phase_s"] = _timed(phase, state.meta, params["W_dec"], repeats=repeats)
    out["meta_phase_amortised_s"] = out["meta_phase_s"] / config.n_primary_steps
  tx = optimizer.adam(config.lr, config.b1, config.b2)
  grads = jax.tree.map(jnp.ones_like, params)
  out["optimizer_s"] = _timed(jax.jit(lambda p, g, o: optimizer.apply(tx, p, g, o)), params, grads,
                              state.joint.opt_state, repeats=repeats)
  batch = jax.device_put(batches[0])

  def whole(state):
    return step(state, batch)[0]

  t0 = time.perf_counter()
  for _ in range(repeats):
    state = whole(state)
  jax.block_until_ready(state)
  out["whole_step_s"] = (time.perf_counter() - t0) / repeats
  out["saes_per_step"] = 2 if config.baseline else 1
  return out


def compiled_memory(config: TrainConfig) -> dict:
  """XLA's memory analysis of the compiled joint + solo + meta step (nothing is run or allocated)."""
  state = jax.eval_shape(lambda: init_train_state(config))
  batch = jax.ShapeDtypeStruct((config.batch_size, config.d_model), jnp.float16)
  compiled = jax.jit(train_step, donate_argnums=0).lower(state, batch).compile()
  mem = compiled.memory_analysis()
  mb = lambda v: float(v) / 2**20
  return {"argument_mb": mb(mem.argument_size_in_bytes), "output_mb": mb(mem.output_size_in_bytes),
          "temp_mb": mb(mem.temp_size_in_bytes), "alias_mb": mb(mem.alias_size_in_bytes),
          "generated_code_mb": mb(mem.generated_code_size_in_bytes),
          "peak_estimate_mb": mb(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                 - mem.alias_size_in_bytes + mem.temp_size_in_bytes)}


def scaling(config: TrainConfig, batches_by_size: dict, widths, batch_sizes, warmup: int, steps: int) -> list:
  """Fast joint + solo step time over widths (at config's batch) and batch sizes (at config's width)."""
  rows = []
  for n in widths:
    c = dataclasses.replace(config, width=n, meta_width=0)
    rows.append({"sweep": "width", "width": n, "batch_size": c.batch_size,
                 **train_steps(c, batches_by_size[c.batch_size], warmup, steps)})
  for b in batch_sizes:
    c = dataclasses.replace(config, batch_size=b)
    rows.append({"sweep": "batch", "width": c.width, "batch_size": b,
                 **train_steps(c, batches_by_size[b], warmup, steps)})
  return rows


def plot_scaling(rows: list, path: str, title: str) -> None:
  """Step time vs width and vs batch size, side by side, into a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
  for ax, sweep, key in ((axes[0], "width", "width"), (axes[1], "batch", "batch_size")):
    pts = sorted((r[key], r["s_per_step"]) for r in rows if r["sweep"] == sweep)
    if not pts:
      continue
    xs, ys = zip(*pts)
    ax.plot(xs, ys, "o-", label="measured")
    ax.plot(xs, [ys[0] * x / xs[0] for x in xs], "--", color="gray", label="linear from first point")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("width N" if sweep == "width" else "batch B (tokens)")
    ax.set_ylabel("s per joint + solo step")
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ---- The data stage: what the chunked reader delivers (docs/storage.md) ----

def benchmark_data(store_path: str, batch_size: int = TrainConfig.batch_size, steps: int = 30,
                   shuffle_buffer_tokens: int = 32768, read_threads: int = 4) -> dict:
  """Tokens/s the trainer's reader delivers back to back (no step to hide reads behind: its ceiling).

  The first batch (its window read before anything else) is timed on its own; the rest include reading every
  later window on the reader's threads while the current one is gathered.
  """
  from metasae_jax.storage import store as store_lib  # pylint: disable=g-import-not-at-top
  from metasae_jax.training import data  # pylint: disable=g-import-not-at-top
  store = store_lib.open_store(store_path)
  source = data.BatchSource(store, batch_size, 0, 0, shuffle_buffer_tokens=shuffle_buffer_tokens,
                            read_threads=read_threads)
  t0 = time.perf_counter()
  source.batch(0)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for position in range(1, steps + 1):
    source.batch(position)
  steady = time.perf_counter() - t0
  source.close()
  row_bytes = store.d_model * np.dtype(store.dtype).itemsize
  return {"store": store_path, "format": store.format, "d_model": store.d_model, "dtype": store.dtype,
          "batch_size": batch_size, "steps": steps, "chunk_tokens": int(np.diff(store.chunk_offsets).max()),
          "window_chunks": source.window_chunks, "epochs": round((steps + 1) / source.batches_per_epoch, 2),
          "first_batch_s": first, "tokens_per_s": steps * batch_size / steady,
          "MB_per_s": steps * batch_size * row_bytes / steady / 1e6}
