"""Benchmarks, printing one JSON line per measurement (ratios against the PyTorch baseline).

Real activations (the built-in model's layer 15 over the built-in corpus, exported once into
--out_dir) come first; synthetic stores stay as a second line.

  python -m experiments.benchmark                        # steady-state steps: fast, naive JAX, PyTorch
  python -m experiments.benchmark --what end_to_end      # `experiments.train` vs PyTorch, from process start
  python -m experiments.benchmark --what stages          # per-stage breakdown of the fast step
  python -m experiments.benchmark --what scaling         # width / batch sweep into docs/scaling.png
  python -m experiments.benchmark --what memory          # compiled step memory, GPT-2 large shape
  python -m experiments.benchmark --what phi,export      # mean |φ| at 9216 x 1M, exporter vs raw forward
  python -m experiments.benchmark --what devices         # compiled step per device on 1/2/4/8 devices, every mesh
  python -m experiments.benchmark --what data [--data_store s3://bucket/store]  # the reader's tokens/s

`--device` says where `steps` and `end_to_end` run: auto (default) = JAX on its default backend and the
PyTorch baseline on CUDA when torch.cuda.is_available(), so on a GPU host both share the GPU; cpu = both
on the CPU; cuda = both on the GPU (an error without one). Every `steps` and `end_to_end` line names the
device each implementation ran on, and the ratio lines say whether those were the same kind.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import flags

from experiments import cli, configs, dataclass_flags
from metasae_jax.core.config import TrainConfig  # JAX-free
from metasae_jax.core.errors import UserError

F = flags.FLAGS
flags.DEFINE_list("what", ["steps"], "Any of: steps, end_to_end, stages, scaling, memory, phi, export, data, devices.")
# `devices` compiles the step of these presets' TrainConfigs (their config files).
DEVICE_PRESETS = {"gpt2_large": "gpt2_large_l20", "gemma2_9b": "gemma2_9b_l23"}
flags.DEFINE_enum("devices_shape", "gpt2_large", list(DEVICE_PRESETS),
                  "SAE shape for `devices`: the train section of experiments/configs/gpt2_large_l20.py (n 20480) or "
                  "gemma2_9b_l23.py (n 65536).")
flags.DEFINE_list("devices_counts", ["1", "2", "4", "8"], "Device counts for `devices` (fake CPU devices when the "
                  "host has fewer; every (data, model) mesh over each count).")
flags.DEFINE_enum("devices_algorithm", "dense", ["dense", "slots"], "Step algorithm compiled for `devices` (dense: "
                  "what GPU/TPU run; slots: the CPU's).")
flags.DEFINE_list("impl", ["fast", "torch", "naive"], "Implementations for `steps` and `end_to_end`: fast "
                  "(experiments.train), torch (the PyTorch baseline), naive (straightforward JAX).")
flags.DEFINE_enum("device", "auto", ["auto", "cpu", "cuda"], "Where `steps` and `end_to_end` run: auto = JAX on "
                  "its default backend, PyTorch on CUDA when torch.cuda.is_available(); cpu = both on the CPU; "
                  "cuda = both on the GPU (an error if either has none).")
flags.DEFINE_list("data", ["real", "synthetic"], "Activations for `steps`: real (exported store), synthetic.")
flags.DEFINE_integer("warmup", 10, "Steps run before timing starts (compilation, first meta phase).")
flags.DEFINE_integer("real_tokens", 262144, "Tokens to export for the real store (the built-in corpus may "
                     "hold fewer; then all of it).")
flags.DEFINE_list("scaling_widths", ["4608", "9216", "18432", "36864"], "Widths for `scaling`.")
flags.DEFINE_list("scaling_batches", ["1024", "2048", "4096", "8192"], "Batch sizes for `scaling`.")
flags.DEFINE_integer("scaling_steps", 10, "Timed steps per `scaling` point.")
flags.DEFINE_string("plot", "docs/scaling.png", "Where `scaling` writes its plot.")
flags.DEFINE_integer("d_model", 576, "Input width (SmolLM2-135M).")
# Every other TrainConfig field is a flag generated from the dataclass (its default the dataclass's), except the
# benchmark's shape: 16 x d_model latents, and 830 meta latents (the speed issue's paper-shaped job; the training
# default would be 810).
BENCH_SHAPE = {"width": 9216, "meta_width": 830}
TRAIN_FLAGS = dataclass_flags.define_from(TrainConfig, skip=("d_model",), defaults=BENCH_SHAPE)
flags.DEFINE_integer("steps", 50, "Timed steps per configuration (a multiple of 10 covers a meta phase).")
flags.DEFINE_integer("e2e_steps", 50, "Training steps for end_to_end.")
flags.DEFINE_string("out_dir", "runs/bench", "Cache for the real store and scratch for end_to_end runs.")
cli.deprecated_alias("workdir", "out_dir")
flags.DEFINE_string("store", "", "Use this existing activation store as the real one (no export).")
flags.DEFINE_string("data_store", "", "Store for `data` (any location); default: a synthetic GPT-2 large layer "
                    "shaped store (d 1280, float16, --data_tokens tokens) written once under --out_dir.")
flags.DEFINE_integer("data_tokens", 131072, "Tokens of the synthetic store for `data`.")
flags.DEFINE_integer("shuffle_buffer_tokens", 32768, "Shuffle buffer for `data` (several windows per epoch).")
cli.internal_flag(flags.DEFINE_string, "_torch_train", "", "run the PyTorch baseline trainer on this store.")
cli.internal_flag(flags.DEFINE_string, "_naive_train", "", "run the straightforward trainer on this store.")
cli.internal_flag(flags.DEFINE_string, "_out", "", "output directory for --_naive_train.")
cli.internal_flag(flags.DEFINE_string, "_torch_device", "cpu", "device of --_torch_train (cpu or cuda).")
cli.internal_flag(flags.DEFINE_bool, "_devices_child", False, "this process runs `devices` on fake devices.")

# Where each implementation runs (`_resolve_devices`): {"jax": backend, "torch": "cpu"|"cuda", "names": {impl: name}}.
_DEVICES: dict = {}


def _train_values() -> dict:
  """The TrainConfig fields the command line sets, on top of the benchmark's shape."""
  return dict(BENCH_SHAPE, **dataclass_flags.given(TRAIN_FLAGS))


def _config(**overrides) -> TrainConfig:
  """The benchmarked TrainConfig: the dataclass's defaults, the benchmark's shape, the flags, then `overrides`."""
  return TrainConfig(d_model=F.d_model, **dict(_train_values(), **overrides))


def _paper_shaped_store() -> str:
  """A zarr store shaped like GPT-2 large layer 20 activations (d 1280, float16), written once under --out_dir."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from metasae_jax.storage import store, zarr_store  # pylint: disable=g-import-not-at-top
  path = os.path.join(F.out_dir, f"paper-shaped-1280-{F.data_tokens}")
  if not store.exists(path):
    rng = np.random.default_rng(0)
    writer = zarr_store.Writer.create(path, 1280, "float16", 128, zarr_store.CHUNK_TOKENS, {"model": "synthetic"},
                                      False, F.data_tokens)
    for _ in range(0, F.data_tokens, 16384):
      writer.append(rng.normal(size=(16384, 1280)).astype(np.float16), None)
    writer.finish()
  return path


def _emit(line: dict) -> None:
  print(json.dumps(line), flush=True)


def devices_lines() -> None:
  """One line per (devices, mesh): the compiled step's per-device FLOPs, bytes, memory and collectives.

  Compiled, never run. A CPU host with fewer devices than asked for reruns this
  part in a child process with that many fake devices (XLA_FLAGS must be set
  before JAX starts).
  """
  counts = sorted({int(c) for c in F.devices_counts})
  if not F._devices_child:
    import jax
    if jax.default_backend() == "cpu" and jax.device_count() < max(counts):
      env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={max(counts)}", JAX_PLATFORMS="cpu")
      cmd = [sys.executable, "-m", "experiments.benchmark", "--what=devices", "--_devices_child",
             f"--devices_shape={F.devices_shape}", f"--devices_counts={','.join(map(str, counts))}",
             f"--devices_algorithm={F.devices_algorithm}"]
      subprocess.run(cmd, env=env, check=True)
      return
  from metasae_jax.workflows import devices
  config = configs.train_config(DEVICE_PRESETS[F.devices_shape], algorithm=F.devices_algorithm)
  rows = []
  for data, model in devices.mesh_shapes(counts):
    if config.width % (data * model) or config.batch_size % data:
      continue
    row = devices.analyze(config, data, model)
    rows.append(row)
    _emit(dict(what="devices", shape=F.devices_shape, algorithm=F.devices_algorithm,
               compiled_for=_platform(), **row))
  print(devices.markdown(rows), file=sys.stderr)


def _platform() -> str:
  import jax
  return jax.devices()[0].platform


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


def _resolve_devices() -> dict:
  """Applies --device (before any JAX computation) and names the device of every implementation in --impl."""
  import jax
  from metasae_jax.workflows import bench_device
  if F.device == "cpu":
    jax.config.update("jax_platforms", "cpu")
  torch_cuda = False
  if "torch" in F.impl and F.device != "cpu":
    from metasae_jax.lm import torch_baseline  # torch is imported only when the baseline is asked for
    torch_cuda = torch_baseline.cuda_available()
  devices = bench_device.resolve(F.device, jax.default_backend(), torch_cuda)
  if devices["jax"] != jax.default_backend():  # JAX started its backend before --device could choose
    raise UserError(f"--device {F.device}: JAX already runs on {jax.default_backend()}; set JAX_PLATFORMS=cpu in "
                    "the environment instead.")
  torch_name = None
  if "torch" in F.impl:
    from metasae_jax.lm import torch_baseline
    torch_name = torch_baseline.device_name(devices["torch"])
  jax_name = bench_device.jax_device_name()
  devices["names"] = {impl: bench_device.impl_device(impl, jax_name, torch_name) for impl in F.impl}
  return devices


def _comparison(impls) -> dict:
  from metasae_jax.workflows import bench_device
  return bench_device.comparison({impl: _DEVICES["names"][impl] for impl in impls})


def _shape() -> dict:
  c = _config()
  return {"d": c.d_model, "n": c.width, "k": c.k, "m": c.meta_width, "meta_k": c.meta_k, "B": c.batch_size}


def _load() -> dict:
  from metasae_jax.core import native
  return {"loadavg_1m": os.getloadavg()[0], "cpus": os.cpu_count(), "native_kernel": native.available()}


def _real_store_path() -> str:
  if F.store:
    return F.store
  from metasae_jax.workflows import benchmarking
  return benchmarking.real_store(F.out_dir, F.real_tokens, progress=True).path


def _synthetic_store_path(num_tokens: int) -> str:
  from metasae_jax.storage import synthetic
  path = os.path.join(F.out_dir, f"synthetic-{F.d_model}-{num_tokens}")
  if not os.path.exists(os.path.join(path, "manifest.json")):
    synthetic.write_sparse_store(path, num_tokens, F.d_model, num_features=4 * _config().width, active=32,
                                 shard_tokens=65536)
  return path


def _size_flags() -> list:
  """The benchmarked config's flags for a child process (experiments.train or this binary)."""
  return dataclass_flags.as_argv(_train_values())


def end_to_end(steps: int) -> dict:
  """Each implementation as its own process on the real store, timed from process start to exit."""
  store_path = _real_store_path()
  stamp = time.time_ns()
  env = dict(os.environ)
  if F.device == "cpu":  # the fast run is its own process: it must pick the same backend as this one
    env["JAX_PLATFORMS"] = "cpu"
  commands = {
      "fast": [sys.executable, "-m", "experiments.train", "--activations", store_path,
               "--out_dir", os.path.join(F.out_dir, f"fast-{stamp}"),
               "--num_tokens", str(steps * _config().batch_size), "--checkpoint_every_steps", "1000"]
              + _size_flags(),
      "torch": [sys.executable, "-m", "experiments.benchmark", "--_torch_train", store_path,
                "--out_dir", F.out_dir, f"--e2e_steps={steps}", f"--d_model={F.d_model}",
                f"--_torch_device={_DEVICES.get('torch', 'cpu')}"] + _size_flags(),
      "naive": [sys.executable, "-m", "experiments.benchmark", "--_naive_train", store_path,
                "--_out", os.path.join(F.out_dir, f"naive-{stamp}"), f"--e2e_steps={steps}",
                f"--d_model={F.d_model}"] + _size_flags(),
  }
  runs, loads, rss = {}, {}, {}
  for name in F.impl:
    loads[name] = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(commands[name], stdout=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS, not the max over children
    runs[name] = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
      raise subprocess.CalledProcessError(proc.returncode, commands[name])
    rss[name] = usage.ru_maxrss / 1024
  out = {"what": "end_to_end", "data": "real", "steps": steps, **{f"{k}_s": v for k, v in runs.items()},
         **{f"{k}_peak_rss_mb": v for k, v in rss.items()},
         **{f"{k}_loadavg_at_start": v for k, v in loads.items()}}
  if "torch" in runs:
    for name in runs:
      if name != "torch":
        out[f"speedup_{name}_vs_torch"] = runs["torch"] / runs[name]
  return dict(out, **_comparison(runs), shape=_shape(), **_load())


def steps_lines():
  """Steady-state step times per implementation on real (then synthetic) batches, ratios against torch."""
  from metasae_jax.workflows import benchmarking
  config = _config()
  count = min(F.warmup + F.steps, 64)
  for data in F.data:
    path = _real_store_path() if data == "real" else _synthetic_store_path(count * _config().batch_size + 4096)
    batches = benchmarking.store_batches(path, _config().batch_size, count)
    lines = {}
    for impl in F.impl:
      fn = {"fast": benchmarking.train_steps, "naive": benchmarking.naive_steps,
            "torch": benchmarking.torch_steps}[impl]
      load = os.getloadavg()[0]
      kwargs = {"device": _DEVICES["torch"]} if impl == "torch" else {}
      lines[impl] = dict(what="steps", data=data, impl=impl, device=_DEVICES["names"][impl],
                         loadavg_at_start=load, **fn(config, batches, F.warmup, F.steps, **kwargs),
                         shape=_shape(), **_load())
      _emit(lines[impl])  # as soon as it is measured; the ratios follow in a summary line
    if "torch" in lines:
      _emit({"what": "steps_ratios", "data": data, **{
          f"speedup_{impl}_vs_torch": lines["torch"]["s_per_step"] / line["s_per_step"]
          for impl, line in lines.items() if impl != "torch"}, **_comparison(lines)})


def main(argv):
  del argv
  if F._naive_train:
    naive_train(F._naive_train, F._out, F.e2e_steps)
    return
  if F._torch_train:
    from metasae_jax.workflows import benchmarking
    benchmarking.torch_train(F._torch_train, _config(), F.e2e_steps, F._torch_device)
    return
  unknown = sorted(set(F.impl) - {"fast", "torch", "naive"})
  if unknown:
    raise UserError(f"--impl: unknown implementation(s) {', '.join(unknown)}; pick from fast, torch, naive.")
  if "steps" in F.what or "end_to_end" in F.what:
    _DEVICES.update(_resolve_devices())  # a device that cannot be had fails here, before any export or run
  if "steps" in F.what:
    steps_lines()
  if "end_to_end" in F.what:
    _emit(end_to_end(F.e2e_steps))
  if "stages" in F.what:
    from metasae_jax.workflows import benchmarking
    from metasae_jax.storage import store
    from metasae_jax.training import data
    path = _real_store_path()
    batches = benchmarking.store_batches(path, _config().batch_size, F.warmup + 2)
    source = data.BatchSource(store.open_store(path), _config().batch_size, 1, 1)
    _emit(dict(what="stages", data="real", **benchmarking.stage_breakdown(
        _config(), batches, F.warmup, read_batch=source.batch), shape=_shape(), **_load()))
  if "scaling" in F.what:
    from metasae_jax.workflows import benchmarking
    path = _real_store_path()
    sizes = sorted({_config().batch_size, *map(int, F.scaling_batches)})
    count = min(F.warmup + F.scaling_steps, 24)
    batches = {b: benchmarking.store_batches(path, b, count) for b in sizes}
    rows = benchmarking.scaling(_config(), batches, list(map(int, F.scaling_widths)),
                                list(map(int, F.scaling_batches)), F.warmup, F.scaling_steps)
    for row in rows:
      _emit(dict(what="scaling", data="real", **row, **_load()))
    benchmarking.plot_scaling(rows, F.plot, f"joint + solo step, real activations (d {F.d_model}, k {_config().k}); "
                              f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs")
  if "memory" in F.what:
    from metasae_jax.workflows import benchmarking
    gpt2 = TrainConfig(d_model=1280, width=20480)  # the paper's batch size is TrainConfig's default
    _emit(dict(what="memory", config="gpt2_large d 1280 n 20480 B 4096 joint+solo+meta",
               **benchmarking.compiled_memory(gpt2)))
  if "devices" in F.what:
    devices_lines()
  if "phi" in F.what:
    from metasae_jax.workflows import benchmarking
    _emit(dict(what="phi", **benchmarking.benchmark_phi()))
  if "data" in F.what:
    from metasae_jax.workflows import benchmarking
    path = F.data_store or _paper_shaped_store()
    _emit(dict(what="data", **benchmarking.benchmark_data(path, _config().batch_size, F.steps,
                                                          F.shuffle_buffer_tokens), **_load()))
  if "export" in F.what:
    from metasae_jax.lm import export
    from metasae_jax.workflows import benchmarking
    _emit(dict(what="export", **benchmarking.benchmark_export(export.ExportConfig(out_dir="unused"))))


if __name__ == "__main__":
  cli.run(main)
