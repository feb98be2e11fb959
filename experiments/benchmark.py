"""Benchmarks, printing one JSON line per configuration (ratios against the straightforward implementation).

  python -m experiments.benchmark                       # paper-shaped step times, fast vs naive
  python -m experiments.benchmark --what end_to_end     # `experiments.train` timed from process start
  python -m experiments.benchmark --what phi,export     # mean |φ| at 9216 x 1M, exporter vs raw forward
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import flags

from experiments import cli

F = flags.FLAGS
flags.DEFINE_list("what", ["steps"], "Any of: steps, end_to_end, phi, export.")
flags.DEFINE_list("impl", ["fast", "naive"], "Implementations for `steps` and `end_to_end`.")
flags.DEFINE_integer("d_model", 576, "Input width (SmolLM2-135M).")
flags.DEFINE_integer("width", 9216, "Primary latents (16 x d_model).")
flags.DEFINE_integer("k", 64, "Active latents per token.")
flags.DEFINE_integer("meta_width", 830, "Meta latents (~9 % of width).")
flags.DEFINE_integer("meta_k", 8, "Active meta latents per row.")
flags.DEFINE_integer("batch_size", 4096, "Tokens per batch.")
flags.DEFINE_integer("steps", 10, "Timed steps per configuration (a multiple of 10 covers a meta phase).")
flags.DEFINE_integer("e2e_steps", 50, "Training steps for end_to_end.")
flags.DEFINE_string("out_dir", "", "Scratch directory for end_to_end (default: a temp dir).")
cli.deprecated_alias("workdir", "out_dir")
cli.internal_flag(flags.DEFINE_string, "_naive_train", "", "run the straightforward trainer on this store.")
cli.internal_flag(flags.DEFINE_string, "_out", "", "output directory for --_naive_train.")


def _config(**overrides):
  from metasae_jax.core.config import TrainConfig
  return TrainConfig(d_model=F.d_model, width=F.width, k=F.k, meta_width=F.meta_width, meta_k=F.meta_k,
                     batch_size=F.batch_size, **overrides)


def _emit(line: dict) -> None:
  print(json.dumps(line), flush=True)


def naive_train(store_path: str, out_dir: str, steps: int) -> None:
  """The straightforward trainer, end to end: store → naive steps (joint, solo, meta) → artifacts."""
  import jax
  from metasae_jax.training import data, trainer
  from metasae_jax.core import naive
  from metasae_jax.storage import store
  from metasae_jax.core.train_step import init_train_state
  st = store.open_store(store_path)
  config = _config()
  source = data.BatchSource(st, config.batch_size, config.seed, 1)
  state = init_train_state(config)
  for i in range(steps):
    state = naive.run_steps(state, [jax.device_put(source.batch(i))])
  run = trainer.RunConfig(activations=store_path, out_dir=out_dir)
  trainer.write_artifacts(state, st, run, steps * config.batch_size)


def end_to_end(steps: int) -> dict:
  from metasae_jax.storage import synthetic
  work = F.out_dir or tempfile.mkdtemp(prefix="metasae-bench-")
  store_path = os.path.join(work, "store")
  if not os.path.exists(os.path.join(store_path, "manifest.json")):
    synthetic.write_sparse_store(store_path, steps * F.batch_size + 4096, F.d_model, num_features=4 * F.width,
                                 active=32, shard_tokens=65536)
  common = ["--width", str(F.width), "--k", str(F.k), "--meta_width", str(F.meta_width),
            "--meta_k", str(F.meta_k), "--batch_size", str(F.batch_size)]
  runs = {}
  commands = (
      ("fast", [sys.executable, "-m", "experiments.train", "--activations", store_path,
                "--out_dir", os.path.join(work, f"fast-{time.time_ns()}"),
                "--num_tokens", str(steps * F.batch_size), "--checkpoint_every_steps", "1000"] + common),
      ("naive", [sys.executable, "-m", "experiments.benchmark", "--_naive_train", store_path,
                 "--_out", os.path.join(work, f"naive-{time.time_ns()}"), "--e2e_steps", str(steps)] + [
                     f"--{k}={v}" for k, v in (("d_model", F.d_model), ("width", F.width), ("k", F.k),
                                               ("meta_width", F.meta_width), ("meta_k", F.meta_k),
                                               ("batch_size", F.batch_size))]))
  for name, cmd in commands:
    if name not in F.impl:
      continue
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    runs[name] = time.perf_counter() - t0
  out = {"what": "end_to_end", "steps": steps, **{f"{k}_s": v for k, v in runs.items()}}
  if len(runs) == 2:
    out["speedup"] = runs["naive"] / runs["fast"]
  return dict(out, shape={"d": F.d_model, "n": F.width, "k": F.k, "m": F.meta_width, "B": F.batch_size})


def main(argv):
  del argv
  if F._naive_train:
    naive_train(F._naive_train, F._out, F.e2e_steps)
    return
  if "steps" in F.what:
    from metasae_jax.workflows import benchmarking
    for impl in F.impl:
      _emit(dict(what="steps", **benchmarking.measure(_config(), impl, F.steps)))
  if "end_to_end" in F.what:
    _emit(end_to_end(F.e2e_steps))
  if "phi" in F.what:
    from metasae_jax.workflows import benchmarking
    _emit(dict(what="phi", **benchmarking.benchmark_phi()))
  if "export" in F.what:
    from metasae_jax.lm import export
    from metasae_jax.workflows import benchmarking
    _emit(dict(what="export", **benchmarking.benchmark_export(export.ExportConfig(out_dir="unused"))))


if __name__ == "__main__":
  cli.run(main)
