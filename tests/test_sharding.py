"""Scale-out: per-device steps (pmap, shard_map), 1 vs N fake devices, 2 processes equal 1 device.

Legend: B = global batch, D = d_model. Fake devices need XLA_FLAGS before JAX
starts, so every multi-device run happens in a subprocess.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from metasae_jax.storage import artifact, synthetic
from metasae_jax.core.config import TrainConfig
from metasae_jax.training.trainer import RunConfig, train_and_save

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = TrainConfig(d_model=16, width=64, k=4, meta_width=6, meta_k=2, batch_size=128, seed=0,
                  n_primary_steps=2, n_meta_steps=2, lr=1e-3)
STEPS = 6
# The same run as flags of experiments.train.
TRAIN_FLAGS = ["--width=64", "--k=4", "--meta_width=6", "--meta_k=2", "--batch_size=128", "--seed=0",
               "--n_primary_steps=2", "--n_meta_steps=2", "--lr=1e-3", f"--num_tokens={STEPS * 128}",
               "--checkpoint_every_steps=2", "--log_every_steps=1", "--data_streams=2"]
# Every run here reads 2 data streams (the order depends on the streams, not on the processes), so one process
# and two processes see the same batches.
SAES = ("joint", "solo", "joint/meta")

PRELUDE = """
import json, sys
import jax
jax.config.update("jax_numpy_dtype_promotion", "strict")
"""


def _env(devices: int) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("JAX_NUM_CPU_DEVICES", None)
  return env


def _python(code: str, devices: int, timeout: int = 300) -> dict:
  """Runs `code` on `devices` fake CPU devices; it prints one JSON line last, which is returned."""
  proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], env=_env(devices),
                        cwd=REPO, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _max_param_diff(dir_a, dir_b) -> float:
  worst = 0.0
  for sub in SAES:
    a, _ = artifact.load_sae_files(os.path.join(dir_a, sub))
    b, _ = artifact.load_sae_files(os.path.join(dir_b, sub))
    worst = max(worst, max(float(np.max(np.abs(a[k] - b[k]))) for k in a))
  return worst


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("store") / "s")
  synthetic.write_sparse_store(path, 1536, 16, context_len=8, shard_tokens=512, num_features=48)
  return path


def _run(store_path, out_dir):
  return RunConfig(activations=store_path, out_dir=str(out_dir), num_tokens=STEPS * 128,
                   checkpoint_every_steps=2, log_every_steps=1, progress=False, data_streams=2)


@pytest.fixture(scope="module")
def one_device_run(store_path, tmp_path_factory):
  """The reference: the trainer on this process's single device."""
  out = tmp_path_factory.mktemp("one") / "r"
  train_and_save(CFG, _run(store_path, out))
  return str(out)


def test_pmap_and_shard_map_steps_equal_global_jit():
  # 5 steps with n_primary_steps=2 cross two meta phases. The last case puts one
  # device's row far above the rest, so BatchTopK's candidate overflow path (the
  # exact all-gathered selection) runs under the axis too.
  out = _python("""
    import functools
    import numpy as np
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from metasae_jax.storage import synthetic
    from metasae_jax.core import topk
    from metasae_jax.core.config import TrainConfig
    from metasae_jax.core.train_step import init_train_state, train_step

    n = jax.device_count()
    # dead_after_batches=1 makes latents dead from step 2 on, so AuxK runs under the axis too; width 1280
    # takes the sparse slot path (slots * SPARSE_MIN_RATIO <= width), whose kernels see per-device values.
    cfg = TrainConfig(d_model=16, width=1280, k=4, meta_width=6, meta_k=2, batch_size=64,
                      n_primary_steps=2, n_meta_steps=2, lr=1e-3, dead_after_batches=1)
    x_TxBxD = synthetic.sparse_activations(5 * 64, 16, num_features=48).reshape(5, 64, 16)
    init = init_train_state(cfg)

    def diff(a, b):
      return max(float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))))
                 for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    step = jax.jit(train_step)
    ref = init
    for x_BxD in x_TxBxD:
      ref, ref_metrics = step(ref, x_BxD)

    per_device = functools.partial(train_step, axis_name="data")
    pstep = jax.pmap(per_device, axis_name="data")
    stacked = jax.tree.map(lambda a: np.stack([np.asarray(a)] * n), init)
    for x_BxD in x_TxBxD:
      stacked, p_metrics = pstep(stacked, x_BxD.reshape(n, -1, 16))
    pmapped = jax.tree.map(lambda a: a[0], stacked)

    mesh = jax.make_mesh((n,), ("data",))
    rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    sstep = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P(), P())))
    sharded = jax.device_put(init, rep)
    for x_BxD in x_TxBxD:
      sharded, s_metrics = sstep(sharded, jax.device_put(x_BxD, rows))

    # Slow-path event counts say how a device computed its share (a device's pair list can overflow
    # where the single device's does not); every value metric must agree.
    values = [k for k in ref_metrics if not k.endswith("dense_fallback")]
    metric_diff = max(max(abs(float(ref_metrics[k]) - float(p_metrics[k][0])),
                          abs(float(ref_metrics[k]) - float(s_metrics[k]))) for k in values)
    pmap_replicas = max(diff(pmapped, jax.tree.map(lambda a: a[i], stacked)) for i in range(n))

    pre_BxN = np.random.default_rng(0).uniform(size=(32, 256)).astype(np.float32)
    pre_BxN[3] += 100.0
    want = np.asarray(topk.batchtopk_reference(jnp.asarray(pre_BxN), 4))
    got_p = np.asarray(jax.pmap(functools.partial(topk.batchtopk, k=4, axis_name="data"), axis_name="data")(
        pre_BxN.reshape(n, -1, 256))).reshape(32, 256)
    got_s = np.asarray(jax.jit(jax.shard_map(functools.partial(topk.batchtopk, k=4, axis_name="data"),
                                             mesh=mesh, in_specs=P("data"), out_specs=P("data")))(
        jax.device_put(pre_BxN, rows)))
    print(json.dumps({"devices": n, "pmap": diff(ref, pmapped), "shard_map": diff(ref, sharded),
                      "replicas": pmap_replicas, "metrics": metric_diff, "aux": float(ref_metrics["joint/aux"]), "meta_step": int(ref.meta.opt_state[0].count),
                      "overflow_rows": int(np.sum(want[3] > 0)),
                      "topk_pmap": float(np.max(np.abs(got_p - want))),
                      "topk_shard_map": float(np.max(np.abs(got_s - want)))}))
  """, devices=8)
  print({k: v for k, v in out.items()})
  assert out["devices"] == 8 and out["meta_step"] == 4  # two meta phases of 2 steps ran
  assert out["pmap"] < 1e-5 and out["shard_map"] < 1e-5, out
  assert out["replicas"] == 0.0 and out["metrics"] < 1e-5 and out["aux"] > 0, out
  assert out["overflow_rows"] > 8 and out["topk_pmap"] == 0.0 and out["topk_shard_map"] == 0.0, out


@pytest.mark.parametrize("devices", [8, 4])
def test_trainer_on_n_devices_equals_one_device(store_path, one_device_run, tmp_path, devices):
  out = _python(f"""
    from metasae_jax.core.config import TrainConfig
    from metasae_jax.core.errors import UserError
    from metasae_jax.training.trainer import RunConfig, train_and_save
    cfg = TrainConfig(**{CFG.to_dict()!r})
    run = RunConfig(activations={store_path!r}, out_dir={str(tmp_path / "r")!r}, num_tokens={STEPS * 128},
                    checkpoint_every_steps=2, log_every_steps=1, progress=False, data_streams=2)
    train_and_save(cfg, run)
    try:
      train_and_save(TrainConfig(**dict(cfg.to_dict(), batch_size=66)),
                     RunConfig(activations={store_path!r}, out_dir={str(tmp_path / "bad")!r}, progress=False))
      error = None
    except UserError as e:
      error = str(e)
    print(json.dumps({{"devices": jax.device_count(), "error": error}}))
  """, devices=devices)
  assert out["devices"] == devices
  diff = _max_param_diff(one_device_run, tmp_path / "r")
  print(f"1 vs {devices} devices: max |param diff| {diff:.3g}")
  assert diff < 1e-4
  assert out["error"] == (f"--batch_size 66 is not divisible by the device count {devices}. "
                          f"Use a multiple of {devices}.")
  assert not os.path.exists(tmp_path / "bad")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# Process 1 runs experiments.train with every artifact/log writer replaced by a
# tripwire, so the run fails if anything but process 0 writes those files.
_TRIPWIRED_TRAIN = """
import sys
from metasae_jax.storage import artifact, atomic
from metasae_jax.training import trainer

def tripwire(*args, **kwargs):
  raise RuntimeError(f"process 1 wrote {args[:1]}")

artifact.save_sae = atomic.write_json = atomic.write_text = trainer._trim_metrics = tripwire
from experiments import cli, train
sys.argv = ["train"] + sys.argv[1:]
cli.run(train.main)
"""


def _two_processes(flags: list) -> list:
  port = _free_port()
  procs = []
  for i in range(2):
    dist = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
    cmd = ([sys.executable, "-m", "experiments.train"] if i == 0 else [sys.executable, "-c", _TRIPWIRED_TRAIN])
    procs.append(subprocess.Popen(cmd + flags + dist, env=_env(2), cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  results = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=300)
      results.append((p.returncode, out, err))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (code, _, err) in enumerate(results):
    assert code == 0, f"process {i}:\n{err[-3000:]}"
  return results


def test_two_processes_two_devices_each_equal_one_device(store_path, one_device_run, tmp_path):
  out = str(tmp_path / "r")
  flags = [f"--activations={store_path}", f"--out_dir={out}"] + TRAIN_FLAGS
  _two_processes(flags)
  diff = _max_param_diff(one_device_run, out)
  print(f"1 device vs 2 processes x 2 devices: max |param diff| {diff:.3g}")
  assert diff < 1e-3
  assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["4", "6"]
  steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
  assert steps == list(range(1, STEPS + 1))
  # Rerunning restores the final multi-process checkpoint on both processes and republishes the same SAEs.
  before = {sub: artifact.load_sae_files(os.path.join(out, sub))[0] for sub in SAES}
  _two_processes(flags)
  for sub in SAES:
    after, _ = artifact.load_sae_files(os.path.join(out, sub))
    for name, value in after.items():
      np.testing.assert_array_equal(value, before[sub][name])
  assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))] == steps
