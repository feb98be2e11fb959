"""Experiment tracking and validation during training: TensorBoard and W&B-offline logs read back with their own
readers equal metrics.jsonl; validation metrics equal a numpy recomputation from the final artifact."""

import dataclasses
import glob
import json
import os
import struct

import numpy as np
import pytest

from metasae_jax.core.config import TrainConfig
from metasae_jax.core.errors import UserError
from metasae_jax.evaluation import cooccurrence, firings
from metasae_jax.storage import artifact, heldout, synthetic
from metasae_jax.storage import store as store_lib
from metasae_jax.storage import npy_store
from metasae_jax.training import tracking, validation
from metasae_jax.training.trainer import RunConfig, train_and_save
from tests.conftest import fake_devices_flags

CFG = TrainConfig(d_model=16, width=64, k=4, meta_width=6, meta_k=2, batch_size=128, seed=0,
                  n_primary_steps=2, n_meta_steps=2, lr=1e-3)
STEPS = 6


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
  root = tmp_path_factory.mktemp("stores")
  train = str(root / "train")
  synthetic.write_sparse_store(train, 1024, 16, context_len=8, shard_tokens=512, num_features=48)
  held = str(root / "held")
  synthetic.write_sparse_store(held, 256, 16, seed=1, context_len=8, shard_tokens=512, num_features=48)
  return train, held


@pytest.fixture(scope="module")
def tracked_run(stores, tmp_path_factory):
  train, held = stores
  out = str(tmp_path_factory.mktemp("runs") / "r")
  run = RunConfig(activations=train, out_dir=out, num_tokens=STEPS * 128, checkpoint_every_steps=3,
                  log_every_steps=1, progress=False, log_to="tensorboard,wandb", wandb_project="proj",
                  wandb_run_name="name", eval_every_steps=2, eval_activations=held, eval_tokens=200)
  os.environ.setdefault("WANDB_SILENT", "true")
  train_and_save(CFG, run)
  rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
  return out, rows, run


def _jsonl_scalars(rows) -> dict:
  """{(step, name): value} of every metric in metrics.jsonl."""
  return {(r["step"], k): v for r in rows for k, v in r.items() if k not in ("step", "tokens")}


def test_jsonl_has_train_and_validation_metrics_and_curves(tracked_run):
  out, rows, _ = tracked_run
  train_steps = [r["step"] for r in rows if "loss" in r]
  val_steps = [r["step"] for r in rows if "val/joint/fvu" in r]
  assert train_steps == list(range(1, STEPS + 1)) and val_steps == [2, 4, 6]
  for key in ("joint/fvu", "solo/fvu", "joint/l0", "joint/dead_fraction", "penalty", "meta_mse", "tokens_per_s"):
    assert key in rows[-1] or key in rows[-2], key
  names = {k for r in rows for k in r}
  assert {f"val/{s}/{m}" for s in ("joint", "solo")
          for m in ("fvu", "mse", "l0", "dead_fraction", "mean_abs_phi")} <= names
  assert os.path.getsize(os.path.join(out, "training_curves.png")) > 10_000


def test_tensorboard_events_equal_jsonl(tracked_run):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  out, rows, _ = tracked_run
  acc = EventAccumulator(os.path.join(out, tracking.TENSORBOARD_DIR), size_guidance={"scalars": 0})
  acc.Reload()
  tb = {(e.step, tag): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
  want = _jsonl_scalars(rows)
  got = {key: v for key, v in tb.items() if not key[1].startswith("hparams/")}
  assert got.keys() == want.keys()
  for key, v in want.items():
    assert got[key] == pytest.approx(v, rel=1e-6, abs=1e-7), key  # event files hold float32
  assert tb[(0, "hparams/train/width")] == CFG.width


def _wandb_records(path: str) -> list:
  """Every protobuf record of a W&B transaction log (`.wandb`): a 7-byte header, then 32 KiB blocks of
  chunks, each `crc32 uint32, length uint16, type uint8` (1 full, 2 first, 3 middle, 4 last)."""
  from wandb.proto import wandb_internal_pb2
  data = open(path, "rb").read()
  assert data[:4] == b":W&B"
  pos, block, parts, records = 7, 32768, b"", []
  while pos + 7 <= len(data):
    if block - pos % block < 7:
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if kind == 0:
      break
    parts += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(parts)
      records.append(record)
      parts = b""
  return records


def test_wandb_offline_history_equals_jsonl(tracked_run):
  out, rows, _ = tracked_run
  [log] = glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))
  history, config = {}, {}
  for record in _wandb_records(log):
    kind = record.WhichOneof("record_type")
    if kind == "history":
      for item in record.history.item:
        name = item.key or "/".join(item.nested_key)
        if not name.startswith("_"):
          history[(record.history.step.num, name)] = json.loads(item.value_json)
    elif kind == "config":
      config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    elif kind == "run":
      assert record.run.project == "proj" and record.run.display_name == "name"
  assert history.keys() == _jsonl_scalars(rows).keys()
  for key, v in _jsonl_scalars(rows).items():
    assert history[key] == pytest.approx(v, rel=1e-12), key
  assert config["train/width"] == CFG.width
  assert config["run/eval_every_steps"] == 2


def test_validation_equals_numpy_on_final_artifacts(tracked_run, stores):
  out, rows, run = tracked_run
  store = store_lib.open_store(stores[1])
  x = np.concatenate([b.acts_BxD for b in heldout.iter_batches(store, 200, 200, 0)]).astype(np.float64)
  last = [r for r in rows if r["step"] == STEPS and "val/joint/fvu" in r][0]
  for sae in ("joint", "solo"):
    t, _ = artifact.load_sae_files(os.path.join(out, sae))
    mean = x.mean(1, keepdims=True)
    std = x.std(1, ddof=1, keepdims=True) + 1e-5
    xs = (x - mean) / std
    pre = np.maximum((xs - t["b_dec"]) @ t["W_enc"] + t["b_enc"], 0)
    cut = np.sort(pre.ravel())[-CFG.k * len(x)]  # BatchTopK over the whole sample
    acts = np.where(pre >= cut, pre, 0)
    recon_std = acts @ t["W_dec"] + t["b_dec"]
    recon = recon_std * std + mean
    fired = acts > 0
    phi = cooccurrence.phi_stats(firings.from_index_lists([np.nonzero(r)[0] for r in fired], CFG.width))
    want = {"fvu": ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum(),
            "mse": ((recon_std - xs) ** 2).mean(), "l0": fired.sum(1).mean(),
            "dead_fraction": (~fired.any(0)).mean(), "mean_abs_phi": phi.mean_abs_phi}
    for name, v in want.items():
      assert last[f"val/{sae}/{name}"] == pytest.approx(v, rel=2e-4, abs=1e-6), (sae, name)


@pytest.mark.parametrize("width,block", [(37, 8), (16, 16), (5, 512)])
def test_mean_abs_phi_equals_cooccurrence_phi_stats(width, block):
  rng = np.random.default_rng(width)
  fired = rng.random((300, width)) < rng.uniform(0.02, 0.5, width)
  fired[:, 0] = False  # dead: φ undefined, counts 0
  fired[:, 1] = True   # always on: φ undefined, counts 0
  want = cooccurrence.phi_stats(firings.from_index_lists([np.nonzero(r)[0] for r in fired], width)).mean_abs_phi
  assert float(validation.mean_abs_phi(fired, block)) == pytest.approx(want, rel=1e-5)


def test_heldout_lookup_explicit_then_manifest_view(tmp_path):
  path = str(tmp_path / "s")
  synthetic.write_sparse_store(path, 64, 4, shard_tokens=64, fmt="npy")  # edits its manifest.json below
  assert validation.heldout_store_path(path, "/x/h") == "/x/h"
  assert validation.heldout_store_path(path, "") is None
  manifest = store_lib.read_manifest(path)
  npy_store.write_manifest(path, dict(manifest, views={"heldout": {"path": "heldout"}}))
  assert validation.heldout_store_path(path, "") == os.path.join(path, "heldout")
  npy_store.write_manifest(path, dict(manifest, heldout="/abs/h"))
  assert validation.heldout_store_path(path, None) == "/abs/h"
  # The exporter's split: views STORE/train and STORE/heldout (a view's manifest records `view_of`).
  npy_store.write_manifest(path, manifest)
  synthetic.write_sparse_store(os.path.join(path, "heldout"), 16, 4, shard_tokens=16, fmt="npy")
  synthetic.write_sparse_store(os.path.join(path, "train"), 16, 4, shard_tokens=16, fmt="npy")
  train_view = os.path.join(path, "train")
  npy_store.write_manifest(train_view, dict(store_lib.read_manifest(train_view), view_of={"path": ".."}))
  assert validation.heldout_store_path(path, "") == os.path.join(path, "heldout")
  assert validation.heldout_store_path(train_view, "") == os.path.join(path, "heldout")
  assert validation.heldout_store_path(os.path.join(path, "heldout"), "") is None


def test_validation_without_heldout_or_bad_backend_is_refused_untouched(stores, tmp_path):
  train, held = stores
  base = RunConfig(activations=train, out_dir=str(tmp_path / "r"), num_tokens=256, progress=False)
  with pytest.raises(UserError, match="--eval_activations"):
    train_and_save(CFG, dataclasses.replace(base, eval_every_steps=1))
  with pytest.raises(UserError, match="--log_to tb"):
    train_and_save(CFG, dataclasses.replace(base, log_to="jsonl,tb"))
  with pytest.raises(UserError, match="d_model"):
    train_and_save(dataclasses.replace(CFG, d_model=8), dataclasses.replace(
        base, eval_every_steps=1, eval_activations=held))
  assert not os.path.exists(tmp_path / "r")


def test_train_binary_flags_reach_tracking_and_validation(stores, tmp_path):
  import subprocess
  import sys
  from tests.conftest import REPO
  train, held = stores
  out = tmp_path / "r"
  flags = [f"--activations={train}", f"--out_dir={out}", "--width=32", "--k=4", "--meta_width=8", "--meta_k=2",
           "--batch_size=128", "--num_tokens=512", "--log_every_steps=2", "--noprogress", "--log_to=tensorboard",
           "--eval_every_steps=2", f"--eval_activations={held}", "--eval_tokens=64"]
  done = subprocess.run([sys.executable, "-m", "experiments.train", *flags], cwd=REPO, capture_output=True,
                        text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr
  rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
  assert [r["step"] for r in rows if "val/solo/mean_abs_phi" in r] == [2, 4]
  assert os.listdir(out / tracking.TENSORBOARD_DIR) and (out / "training_curves.png").exists()


def test_resumed_tensorboard_log_has_each_step_once_equal_to_jsonl(stores, tmp_path, monkeypatch):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  from metasae_jax.training import data
  train, held = stores
  run = RunConfig(activations=train, out_dir=str(tmp_path / "r"), num_tokens=STEPS * 128,
                  checkpoint_every_steps=2, log_every_steps=1, progress=False, log_to="tensorboard",
                  eval_every_steps=3, eval_activations=held, eval_tokens=64)
  real = data.BatchSource.batch

  def dies_at_5(self, position):
    if position == 5:
      raise KeyboardInterrupt("simulated kill")
    return real(self, position)

  monkeypatch.setattr(data.BatchSource, "batch", dies_at_5)
  with pytest.raises(KeyboardInterrupt):
    train_and_save(CFG, run)
  monkeypatch.setattr(data.BatchSource, "batch", real)
  train_and_save(CFG, run)
  acc = EventAccumulator(os.path.join(run.out_dir, tracking.TENSORBOARD_DIR), size_guidance={"scalars": 0})
  acc.Reload()
  want = _jsonl_scalars([json.loads(line) for line in open(os.path.join(run.out_dir, "metrics.jsonl"))])
  for tag in ("loss", "joint/fvu", "val/solo/fvu"):
    steps = [e.step for e in acc.Scalars(tag)]
    assert steps == sorted(set(steps)) and steps == sorted(s for s, name in want if name == tag), tag
    for e in acc.Scalars(tag):
      assert e.value == pytest.approx(want[(e.step, tag)], rel=1e-6), (tag, e.step)


_SHARDED = """
import json, sys
import jax
jax.config.update("jax_numpy_dtype_promotion", "strict")
from metasae_jax.core.config import TrainConfig
from metasae_jax.training.trainer import RunConfig, train_and_save
cfg = TrainConfig(d_model=16, width=64, k=4, meta_width=6, meta_k=2, batch_size=128, seed=0, n_primary_steps=2,
                  n_meta_steps=2, lr=1e-3)
train_and_save(cfg, RunConfig(activations=sys.argv[1], out_dir=sys.argv[2], num_tokens=512, log_every_steps=2,
                              progress=False, eval_every_steps=2, eval_activations=sys.argv[3], eval_tokens=64))
print(json.dumps({"devices": jax.device_count()}))
"""


def test_validation_on_fake_devices_equals_one_device(stores, tmp_path):
  import subprocess
  import sys
  from tests.conftest import REPO
  train, held = stores
  vals = {}
  for devices in (1, 4):
    env = dict(os.environ, XLA_FLAGS=fake_devices_flags(devices), JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO)
    env.pop("JAX_NUM_CPU_DEVICES", None)
    out = str(tmp_path / f"d{devices}")
    done = subprocess.run([sys.executable, "-c", _SHARDED, train, out, held], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["devices"] == devices
    vals[devices] = [{k: v for k, v in json.loads(line).items() if k.startswith("val/")}
                     for line in open(os.path.join(out, "metrics.jsonl"))]
  assert [v for v in vals[4] if v] and len(vals[1]) == len(vals[4])
  for a, b in zip(vals[1], vals[4]):
    assert a.keys() == b.keys()
    for key in a:
      assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
