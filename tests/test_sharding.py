"""Scale-out: per-device steps on (data, model) meshes and under pmap, trainer runs on N fake devices and
2 processes, checkpoints moved between meshes: every layout equals one device.

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
from tests.conftest import fake_devices_flags

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
  env = dict(os.environ, XLA_FLAGS=fake_devices_flags(devices),
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


def test_pmap_step_equals_global_jit():
  # Researchers may wrap the per-device step in jax.pmap themselves. 5 steps with n_primary_steps=2 cross
  # two meta phases; the last case puts one device's row far above the rest, so BatchTopK's candidate
  # overflow path runs under the axis too.
  out = _python("""
    import functools
    import numpy as np
    import jax.numpy as jnp
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

    pstep = jax.pmap(functools.partial(train_step, axis_name="data"), axis_name="data")
    stacked = jax.tree.map(lambda a: np.stack([np.asarray(a)] * n), init)
    for x_BxD in x_TxBxD:
      stacked, p_metrics = pstep(stacked, x_BxD.reshape(n, -1, 16))
    pmapped = jax.tree.map(lambda a: a[0], stacked)
    values = [k for k in ref_metrics if not k.endswith("dense_fallback")]
    metric_diff = max(abs(float(ref_metrics[k]) - float(p_metrics[k][0])) for k in values)
    pmap_replicas = max(diff(pmapped, jax.tree.map(lambda a: a[i], stacked)) for i in range(n))

    pre_BxN = np.random.default_rng(0).uniform(size=(32, 256)).astype(np.float32)
    pre_BxN[3] += 100.0
    want = np.asarray(topk.batchtopk_reference(jnp.asarray(pre_BxN), 4))
    got_p = np.asarray(jax.pmap(functools.partial(topk.batchtopk, k=4, axis_name="data"), axis_name="data")(
        pre_BxN.reshape(n, -1, 256))).reshape(32, 256)
    print(json.dumps({"devices": n, "pmap": diff(ref, pmapped), "replicas": pmap_replicas,
                      "metrics": metric_diff, "aux": float(ref_metrics["joint/aux"]),
                      "meta_step": int(ref.meta.opt_state[0].count), "overflow_rows": int(np.sum(want[3] > 0)),
                      "topk_pmap": float(np.max(np.abs(got_p - want)))}))
  """, devices=8)
  print(out)
  assert out["devices"] == 8 and out["meta_step"] == 4  # two meta phases of 2 steps ran
  assert out["pmap"] < 1e-5 and out["replicas"] == 0.0 and out["metrics"] < 1e-5 and out["aux"] > 0, out
  assert out["overflow_rows"] > 8 and out["topk_pmap"] == 0.0, out


MESHES = [(1, 8), (8, 1), (2, 4), (4, 2)]


def test_every_mesh_equals_one_device():
  """(data, model) meshes over 8 devices, both algorithms, BatchTopK and TopK, 6 steps each.

  Joint (with the penalty) and the lockstep solo (without) train side by side, dead_after_batches=1 keeps
  AuxK running, and n_primary_steps=2 gives three meta phases, split over all devices.
  """
  out = _python("""
    import dataclasses
    import numpy as np
    from metasae_jax.storage import synthetic
    from metasae_jax.core.config import TrainConfig
    from metasae_jax.core.train_step import init_train_state, train_step
    from metasae_jax.training import sharding

    def diff(a, b):
      return max(float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))))
                 for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    # width 1280, meta width 40: the slots path decodes over slots (1280 >= 8 x its 36 candidates).
    base = TrainConfig(d_model=16, width=1280, k=4, meta_width=40, meta_k=2, batch_size=64,
                       n_primary_steps=2, n_meta_steps=2, lr=1e-3, dead_after_batches=1)
    x_TxBxD = synthetic.sparse_activations(6 * 64, 16, num_features=48).reshape(6, 64, 16)
    result = {}
    for activation in ("batchtopk", "topk"):
      for algorithm in ("slots", "dense"):
        cfg = dataclasses.replace(base, architecture=activation, algorithm=algorithm)
        ref, step = init_train_state(cfg), jax.jit(train_step)
        for x_BxD in x_TxBxD:
          ref, ref_m = step(ref, x_BxD)
        for shape in %r:
          mesh = sharding.Mesh(cfg, model_parallel=shape[1])
          state, mstep = mesh.init_state(), mesh.step_fn()
          assert tuple(state.joint.params["W_enc"].sharding.spec) == (None, "model")
          for x_BxD in x_TxBxD:
            state, m = mstep(state, mesh.put_batch(x_BxD))
          values = [k for k in ref_m if not k.endswith("dense_fallback")]
          result[f"{activation} {algorithm} {shape}"] = {
              "params": diff(ref, state), "metrics": max(abs(float(ref_m[k]) - float(m[k])) for k in values),
              "aux": float(ref_m["joint/aux"]), "solo_aux": float(ref_m["solo/aux"]),
              "penalty": float(ref_m["penalty"]), "meta_steps": int(state.meta.opt_state[0].count)}
    print(json.dumps(result))
  """ % (MESHES,), devices=8, timeout=900)
  assert len(out) == 16
  for case, r in out.items():
    print(case, r)
    assert r["params"] < 2e-5 and r["metrics"] < 2e-5, case
    assert r["aux"] > 0 and r["solo_aux"] > 0 and r["penalty"] > 0 and r["meta_steps"] == 6, case


def test_matryoshka_and_jumprelu_on_meshes_equal_one_device():
  """The dense-only architectures on a data-only and a 2 x 4 mesh (prefixes and θ split over the model axis)."""
  out = _python("""
    import dataclasses
    import numpy as np
    from metasae_jax.storage import synthetic
    from metasae_jax.core.config import TrainConfig
    from metasae_jax.core.train_step import init_train_state, train_step
    from metasae_jax.training import sharding

    base = TrainConfig(d_model=16, width=256, k=4, meta_width=12, meta_k=2, batch_size=64, n_primary_steps=2,
                       n_meta_steps=2, lr=1e-3, dead_after_batches=1)
    x_TxBxD = synthetic.sparse_activations(4 * 64, 16, num_features=48).reshape(4, 64, 16)
    result = {}
    for name, extra in (("matryoshka_batchtopk", {"matryoshka_widths": (40, 100)}),
                        ("jumprelu", {"jumprelu_init_threshold": 0.3, "jumprelu_bandwidth": 0.2})):
      cfg = dataclasses.replace(base, architecture=name, **extra)
      ref, step = init_train_state(cfg), jax.jit(train_step)
      for x_BxD in x_TxBxD:
        ref, ref_m = step(ref, x_BxD)
      for shape in ((8, 1), (2, 4)):
        mesh = sharding.Mesh(cfg, model_parallel=shape[1])
        state, mstep = mesh.init_state(), mesh.step_fn()
        for x_BxD in x_TxBxD:
          state, m = mstep(state, mesh.put_batch(x_BxD))
        leaves = [abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()
                  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(state))]
        result[f"{name} {shape}"] = {"params": float(max(leaves)),
                                     "metrics": max(abs(float(ref_m[k]) - float(m[k])) for k in ref_m),
                                     "terms": sorted(k for k in m if "prefix_mse" in k or "l0_penalty" in k),
                                     "penalty": float(ref_m["penalty"])}
    print(json.dumps(result))
  """, devices=8, timeout=900)
  assert len(out) == 4
  for case, r in out.items():
    print(case, r)
    # JumpReLU's θ gradient counts entries in a window: psum order can move one across an edge (see
    # test_architectures), so its tolerance is a fraction of an lr step.
    tol = 2e-4 if case.startswith("jumprelu") else 2e-5
    assert r["params"] < tol and r["metrics"] < tol and r["penalty"] > 0, case
    assert r["terms"] == (["joint/prefix_mse/100", "joint/prefix_mse/40", "solo/prefix_mse/100",
                           "solo/prefix_mse/40"] if case.startswith("matryoshka") else
                          ["joint/l0_penalty", "solo/l0_penalty"]), case


@pytest.mark.parametrize("devices,model_parallel", [(8, 2), (4, 1)])
def test_trainer_on_n_devices_equals_one_device(store_path, one_device_run, tmp_path, devices, model_parallel):
  out = _python(f"""
    from metasae_jax.core.config import TrainConfig
    from metasae_jax.core.errors import UserError
    from metasae_jax.training.trainer import RunConfig, train_and_save
    cfg = TrainConfig(**{CFG.to_dict()!r})
    run = RunConfig(activations={store_path!r}, out_dir={str(tmp_path / "r")!r}, num_tokens={STEPS * 128},
                    checkpoint_every_steps=2, log_every_steps=1, progress=False, model_parallel={model_parallel},
                    data_streams=2)
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
  assert out["error"] == (f"--batch_size 66 is not divisible by the data-parallel size {devices} "
                          f"({devices} devices / --model_parallel 1). Use a multiple of {devices}.")
  assert not os.path.exists(tmp_path / "bad")


def test_checkpoint_from_one_mesh_resumes_on_another(store_path, one_device_run, tmp_path):
  """Steps 1-4 on (8 x 1), the run's last checkpoint and artifacts gone, then resumed on (2 x 4) from step 4."""
  out = str(tmp_path / "r")
  flags = [f"--activations={store_path}", f"--out_dir={out}"] + TRAIN_FLAGS
  for model_parallel in (1, 4):
    proc = subprocess.run([sys.executable, "-m", "experiments.train", *flags, f"--model_parallel={model_parallel}",
                           "--noprogress"], env=_env(8), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if model_parallel == 1:  # as if the first run had been killed after its step-4 checkpoint
      assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["4", "6"]
      import shutil  # pylint: disable=g-import-not-at-top
      for gone in ("checkpoints/6", "joint", "solo"):
        shutil.rmtree(os.path.join(out, gone))
  diff = _max_param_diff(one_device_run, out)
  print(f"(8 x 1) to step 4, then (2 x 4) to step 6, vs one device: max |param diff| {diff:.3g}")
  assert diff < 1e-4
  assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))] == list(range(1, STEPS + 1))


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
  # A (2 x 2) mesh: the data axis spans the processes, each process's two devices split the latents.
  out = str(tmp_path / "r")
  flags = [f"--activations={store_path}", f"--out_dir={out}", "--model_parallel=2"] + TRAIN_FLAGS
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
