"""The training loop: files written, resume equals an uninterrupted run, refusals, NaN guard."""

import dataclasses
import filecmp
import json
import os

import numpy as np
import pytest

from metasae_jax.storage import artifact, synthetic
from metasae_jax.training import data
from metasae_jax.core.config import TrainConfig
from metasae_jax.core.errors import UserError
from metasae_jax.training.trainer import RunConfig, train_and_save

CFG = TrainConfig(d_model=16, width=64, k=4, meta_width=6, meta_k=2, batch_size=128, seed=0,
                  n_primary_steps=2, n_meta_steps=2, lr=1e-3)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("store") / "s")
  synthetic.write_sparse_store(path, 1536, 16, context_len=8, shard_tokens=512, num_features=48)
  return path


def _run(store_path, out_dir, **kw):
  return RunConfig(activations=store_path, out_dir=str(out_dir), num_tokens=6 * 128,
                   checkpoint_every_steps=2, log_every_steps=1, progress=False, **kw)


def test_writes_artifacts_metrics_and_checkpoints(store_path, tmp_path):
  metrics = train_and_save(CFG, _run(store_path, tmp_path / "r"))
  for sub in ("joint", "solo", "joint/meta"):
    tensors, cfg = artifact.load_sae_files(str(tmp_path / "r" / sub))
    np.testing.assert_allclose(np.linalg.norm(tensors["W_dec"], axis=1), 1.0, atol=1e-6)
    assert cfg["input_norm"] == "standardize_per_token"
  _, cfg = artifact.load_sae_files(str(tmp_path / "r" / "joint"))
  assert cfg["source"]["model"] == "synthetic" and cfg["k"] == 4 and cfg["skip_first_positions"] == 0
  lines = [json.loads(l) for l in open(tmp_path / "r" / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [1, 2, 3, 4, 5, 6]
  assert lines[-1]["tokens"] == 6 * 128 and metrics["joint/l0"] == pytest.approx(4.0)
  assert sorted(os.listdir(tmp_path / "r" / "checkpoints")) == ["4", "6"]


ARCH_CONFIGS = {"batchtopk": CFG,
                "matryoshka_batchtopk": dataclasses.replace(CFG, architecture="matryoshka_batchtopk",
                                                            matryoshka_widths=(16, 32)),
                "jumprelu": dataclasses.replace(CFG, architecture="jumprelu", jumprelu_init_threshold=0.3,
                                                jumprelu_bandwidth=0.2)}


@pytest.mark.parametrize("arch", list(ARCH_CONFIGS))
def test_resume_after_interruption_is_bit_identical(store_path, tmp_path, monkeypatch, arch):
  CFG = ARCH_CONFIGS[arch]  # pylint: disable=redefined-outer-name,invalid-name
  train_and_save(CFG, _run(store_path, tmp_path / "whole"))
  real = data.BatchSource.batch

  def dies_at_5(self, position):
    if position == 5:
      raise KeyboardInterrupt("simulated kill")
    return real(self, position)

  monkeypatch.setattr(data.BatchSource, "batch", dies_at_5)
  with pytest.raises(KeyboardInterrupt):
    train_and_save(CFG, _run(store_path, tmp_path / "cut"))
  assert not os.path.exists(tmp_path / "cut" / "joint")
  monkeypatch.setattr(data.BatchSource, "batch", real)
  train_and_save(CFG, _run(store_path, tmp_path / "cut"))
  for sub in ("joint", "solo", "joint/meta"):
    for f in ("sae.safetensors", "cfg.json"):
      assert filecmp.cmp(tmp_path / "whole" / sub / f, tmp_path / "cut" / sub / f, shallow=False), (sub, f)
  assert _untimed(tmp_path / "whole") == _untimed(tmp_path / "cut")


def _untimed(run_dir):
  """metrics.jsonl without the wall-clock throughput (the only field a resume may change)."""
  lines = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
  assert all(l["tokens_per_s"] > 0 for l in lines)
  return [{k: v for k, v in l.items() if k != "tokens_per_s"} for l in lines]


def test_different_config_in_existing_run_dir_is_refused_untouched(store_path, tmp_path):
  out = tmp_path / "r"
  train_and_save(CFG, _run(store_path, out))
  before = {p: open(os.path.join(d, p), "rb").read() for d, _, fs in os.walk(out) for p in fs}
  with pytest.raises(UserError, match="different config.*lambda2"):
    train_and_save(dataclasses.replace(CFG, lambda2=1.0), _run(store_path, out))
  after = {p: open(os.path.join(d, p), "rb").read() for d, _, fs in os.walk(out) for p in fs}
  assert before == after


def test_a_run_started_before_architectures_resumes(store_path, tmp_path):
  """run_config.json of an older version: `activation` instead of `architecture`, no architecture options."""
  out = tmp_path / "r"
  train_and_save(CFG, _run(store_path, out))
  path = out / "run_config.json"
  old = json.load(open(path))
  train = old["train"]
  train["activation"] = train.pop("architecture")
  for name in ("matryoshka_widths", "l0_coefficient", "jumprelu_bandwidth", "jumprelu_init_threshold"):
    del train[name]
  json.dump(old, open(path, "w"))
  train_and_save(CFG, _run(store_path, out))  # the same run: accepted (nothing left to train)
  with pytest.raises(UserError, match="different config.*architecture"):
    train_and_save(dataclasses.replace(CFG, architecture="topk"), _run(store_path, out))


def test_d_model_mismatch_is_refused(store_path, tmp_path):
  with pytest.raises(UserError, match="d_model 16"):
    train_and_save(dataclasses.replace(CFG, d_model=32), _run(store_path, tmp_path / "r"))


def test_divergence_stops_with_step_and_keeps_checkpoint(store_path, tmp_path):
  cfg = dataclasses.replace(CFG, lr=1e30)
  with pytest.raises(UserError, match=r"non-finite .* at step \d"):
    train_and_save(cfg, _run(store_path, tmp_path / "r"))


def test_skip_default_is_every_position_and_old_runs_keep_theirs(tmp_path):
  import json
  from metasae_jax.training import trainer as trainer_lib
  assert trainer_lib.RunConfig(activations="a", out_dir="o").skip_first_positions == 0
  assert trainer_lib.recorded_skip_first_positions(str(tmp_path)) is None
  with open(tmp_path / trainer_lib.RUN_CONFIG, "w") as f:
    json.dump({"train": {}, "data": {"skip_first_positions": 1}}, f)
  assert trainer_lib.recorded_skip_first_positions(str(tmp_path)) == 1


def test_train_binary_resumes_with_recorded_skip(store_path, tmp_path):
  import json
  import subprocess
  import sys
  from metasae_jax.training import trainer as trainer_lib
  out = tmp_path / "old_run"
  out.mkdir()
  # A run recorded with the old default; its train section differs on purpose so the claim fails fast
  # and its message lists every differing field.
  with open(out / trainer_lib.RUN_CONFIG, "w") as f:
    json.dump({"train": {"width": -1}, "data": {"skip_first_positions": 1}}, f)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  flags = [f"--activations={store_path}", f"--out_dir={out}", "--width=32", "--k=4", "--meta_width=8",
           "--meta_k=2", "--batch_size=128"]
  run = lambda *extra: subprocess.run([sys.executable, "-m", "experiments.train", *flags, *extra],
                                      capture_output=True, text=True, cwd=repo)
  implicit, explicit = run(), run("--skip_first_positions=0")
  assert implicit.returncode == explicit.returncode == 1
  assert "train.width" in implicit.stderr and "skip_first_positions" not in implicit.stderr
  assert "data.skip_first_positions: 1 -> 0" in explicit.stderr


def test_closing_lines_report_standardised_mse_and_heldout_fvu_typical(tmp_path):
  """The train binary's last lines: the last batch's standardised MSE, and on held-out tokens past position 0
  fvu_typical (sink-like outliers left out) beside the raw FVU, both recomputed here from the artifacts."""
  import subprocess
  import sys
  from safetensors.numpy import load_file
  from metasae_jax.storage import store as store_lib
  ctx, d = 8, 16
  acts = synthetic.sparse_activations(1024, d, num_features=48)
  heldout_start = 768
  sinks = heldout_start + np.array([3 * ctx + 1, 9 * ctx + 2, 20 * ctx + 5])  # past position 0
  acts[sinks] *= 300.0  # attention-sink-like: far above 10x the median norm
  path = str(tmp_path / "s")
  store_lib.write_store(path, acts, None, context_len=ctx, source={"model": "synthetic"}, shard_tokens=256)
  train_view, held_view = store_lib.write_split(store_lib.open_store(path), 0.25)
  out = tmp_path / "run"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-m", "experiments.train", f"--activations={path}", f"--out_dir={out}",
                         "--width=64", "--k=4", "--meta_width=6", "--meta_k=2", "--batch_size=128",
                         "--num_tokens=768", "--noprogress", "--log_every_steps=1"],
                        capture_output=True, text=True, cwd=repo)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()[-4:]
  assert lines[0] == f"done: {out}"
  last = [json.loads(l) for l in open(out / "metrics.jsonl")][-1]
  kept = np.array([t for t in range(heldout_start, 1024) if t % ctx != 0])
  x = acts[kept].astype(np.float64)
  for line, name in zip(lines[1:3], ("joint", "solo")):
    w = load_file(str(out / name / "sae.safetensors"))
    mean, std = x.mean(1, keepdims=True), x.std(1, ddof=1, keepdims=True)
    pre = np.maximum(((x - mean) / (std + 1e-5) - w["b_dec"]) @ w["W_enc"], 0)
    # BatchTopK over batches of the run's batch size (128), as in training.
    acts_TxN = np.concatenate([np.where(p >= np.sort(p.ravel())[-4 * len(p)], p, 0)
                               for p in (pre[i:i + 128] for i in range(0, len(x), 128))])
    err_T = (((acts_TxN @ w["W_dec"] + w["b_dec"]) * std + mean - x) ** 2).sum(1)
    typical = np.linalg.norm(x, axis=1) <= 10 * np.median(np.linalg.norm(x, axis=1))
    assert typical.sum() == len(x) - 3
    fvu = err_T.sum() / ((x - x.mean(0)) ** 2).sum()
    fvu_typ = err_T[typical].sum() / ((x[typical] - x[typical].mean(0)) ** 2).sum()
    assert line.split()[0] == name and f"mse {last[f'{name}/mse']:.4f} (standardised, last batch)" in line
    fvu_out = err_T[~typical].sum() / ((x - x.mean(0)) ** 2).sum()
    assert f"fvu_typical {fvu_typ:.4f}" in line and f"raw fvu {fvu:.4f} ({fvu_out:.4f} of it from high-norm" in line
  assert f"first {len(kept)} tokens of {held_view}" in lines[3] and "3 token(s) there have more than 10x" in lines[3]
  var = ((x - x.mean(0)) ** 2).sum(1)
  assert f"hold {var[~typical].sum() / var.sum():.0%} of the raw variance" in lines[3]
