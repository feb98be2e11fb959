"""The λ₂ × σ² sweep: runs per point, summary and plot, rerun skips finished points, failures reported."""

import json
import os
import subprocess
import sys
import time

import pytest

from metasae_jax.storage import synthetic
from metasae_jax.workflows import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_FLAGS = ["--width=64", "--k=4", "--meta_width=6", "--meta_k=2", "--batch_size=128",
               "--n_primary_steps=2", "--n_meta_steps=2", "--lr=1e-3", "--num_tokens=512",
               "--checkpoint_every_steps=2", "--log_every_steps=1"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
  root = tmp_path_factory.mktemp("stores")
  synthetic.write_sparse_store(str(root / "train"), 1024, 16, context_len=8, shard_tokens=512, num_features=48)
  synthetic.write_sparse_store(str(root / "heldout"), 512, 16, seed=1, context_len=8, num_features=48)
  return str(root / "train"), str(root / "heldout")


def _sweep(args: list) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", "experiments.sweep", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def _mtimes(root: str) -> dict:
  return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, files in os.walk(root) for f in files}


def test_grid_runs_control_once_and_names_points():
  points = sweep.grid((0.0, 0.3, 1.0), (0.3, 1.0))
  assert [p.name for p in points] == ["lam0_sig0.3", "lam0.3_sig0.3", "lam0.3_sig1", "lam1_sig0.3", "lam1_sig1"]
  assert sweep.parse_floats("0, 0.3,1", "lambda2") == (0.0, 0.3, 1.0)
  with pytest.raises(sweep.UserError, match="--sigma_sq must be a comma-separated list"):
    sweep.parse_floats("1,x", "sigma_sq")
  with pytest.raises(sweep.UserError, match="--lambda2 values must be >= 0"):
    sweep.SweepConfig(out_dir="x", lambda2s=(-1.0,), sigma_sqs=(1.0,))


def test_sweep_writes_runs_summary_plot_and_rerun_skips(stores, tmp_path):
  train_store, heldout = stores
  out = str(tmp_path / "sweep")
  args = [f"--activations={train_store}", f"--out_dir={out}", "--lambda2=0,0.3", "--sigma_sq=1",
          f"--eval_activations={heldout}", "--eval_meta_fve_steps=0", "--parallel=2"] + TRAIN_FLAGS
  first = _sweep(args)
  assert first.returncode == 0, first.stderr[-3000:]
  for name in ("lam0_sig1", "lam0.3_sig1"):
    run_dir = os.path.join(out, name)
    assert sweep.is_trained(run_dir) and sweep.is_evaluated(run_dir)
    with open(os.path.join(run_dir, "run_config.json")) as f:
      train_cfg = json.load(f)["train"]
    assert train_cfg["lambda2"] == (0.0 if name.startswith("lam0_") else 0.3) and train_cfg["width"] == 64
  with open(os.path.join(out, "summary.json")) as f:
    summary = json.load(f)
  rows = {r["name"]: r for r in summary["points"]}
  assert set(rows) == {"lam0_sig1", "lam0.3_sig1"} and summary["failed"] == []
  # The control's joint SAE is its solo SAE (same init, same batches, no penalty).
  assert rows["lam0_sig1"]["delta_mse_pct"] == 0.0 and rows["lam0_sig1"]["delta_mean_abs_phi_pct"] == 0.0
  assert rows["lam0.3_sig1"]["delta_mse_pct"] is not None
  with open(os.path.join(out, "pareto.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"

  before = {k: v for k, v in _mtimes(out).items() if os.sep + "lam" in k}
  t0 = time.time()
  second = _sweep(args)
  assert time.time() - t0 < 60  # no training: start-up and the summary only
  assert second.returncode == 0, second.stderr[-3000:]
  assert "skipped (finished)" in second.stdout
  assert {k: v for k, v in _mtimes(out).items() if os.sep + "lam" in k} == before


def test_failed_point_is_reported_with_its_log_tail(stores, tmp_path):
  train_store, _ = stores
  cfg = sweep.SweepConfig(out_dir=str(tmp_path / "s"), lambda2s=(0.3,), sigma_sqs=(1.0,),
                          train_args=(f"--activations={train_store}", "--width=64", "--k=100"))
  lines = []
  summary = sweep.run_sweep(cfg, report=lines.append)
  assert summary["failed"] == ["lam0.3_sig1"]
  row = summary["points"][0]
  assert "experiments.train exited with 1" in row["error"]
  assert "k must be in [1, width)" in row["stderr_tail"]
  assert any("lam0.3_sig1: FAILED" in line for line in lines)
  assert os.path.exists(tmp_path / "s" / "summary.json") and summary["pareto"] is None
