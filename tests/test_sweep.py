"""The λ₂ × σ² (× seed) sweep: runs per point, per-seed rows and aggregates, plot, rerun skips, failures reported."""

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.stats

from metasae_jax.core.config import TrainConfig
from metasae_jax.storage import synthetic
from metasae_jax.training.trainer import RunConfig
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
                        capture_output=True, text=True, timeout=900)


def _mtimes(root: str) -> dict:
  return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, files in os.walk(root) for f in files}


def test_grid_runs_control_once_per_seed_and_names_points():
  points = sweep.grid((0.0, 0.3, 1.0), (0.3, 1.0))
  assert [p.name for p in points] == ["lam0_sig0.3", "lam0.3_sig0.3", "lam0.3_sig1", "lam1_sig0.3", "lam1_sig1"]
  seeded = sweep.grid((0.0, 0.3), (0.3, 1.0), seeds=(0, 2))
  assert [p.name for p in seeded] == ["lam0_sig0.3_seed0", "lam0_sig0.3_seed2", "lam0.3_sig0.3_seed0",
                                      "lam0.3_sig0.3_seed2", "lam0.3_sig1_seed0", "lam0.3_sig1_seed2"]
  assert sweep.parse_floats("0, 0.3,1", "lambda2") == (0.0, 0.3, 1.0)
  assert sweep.parse_ints("0,1, 2", "seeds") == (0, 1, 2) and sweep.parse_ints("", "seeds") == ()
  with pytest.raises(sweep.UserError, match="--sigma_sq must be a comma-separated list"):
    sweep.parse_floats("1,x", "sigma_sq")
  with pytest.raises(sweep.UserError, match="--seeds must be a comma-separated list of integers"):
    sweep.parse_ints("0,1.5", "seeds")
  train, run = TrainConfig(d_model=4, width=32, k=2, meta_width=4, meta_k=1), RunConfig(activations="a", out_dir="b")
  with pytest.raises(sweep.UserError, match="--lambda2 values must be >= 0"):
    sweep.SweepConfig(out_dir="x", lambda2s=(-1.0,), sigma_sqs=(1.0,), train=train, run=run)
  with pytest.raises(sweep.UserError, match="--seeds must be distinct"):
    sweep.SweepConfig(out_dir="x", lambda2s=(1.0,), sigma_sqs=(1.0,), train=train, run=run, seeds=(1, 1))


def _row(name, lam, seed, phi_j, phi_s, mse_pct, fvu_pct):
  return {"name": name, "lambda2": lam, "sigma_sq": 1.0, "seed": seed, "eval": "evaluated",
          "joint": {"mean_abs_phi": phi_j}, "solo": {"mean_abs_phi": phi_s},
          "delta_mean_abs_phi_pct": (phi_j - phi_s) / phi_s * 100, "delta_mse_pct": mse_pct, "delta_fvu_pct": fvu_pct}


def test_aggregates_match_a_hand_computation():
  joint, solo = [2.0e-3, 2.2e-3, 2.1e-3], [2.3e-3, 2.35e-3, 2.2e-3]
  rows = [_row(f"lam0.3_sig1_seed{s}", 0.3, s, j, o, m, f)
          for s, j, o, m, f in zip(range(3), joint, solo, (1.0, 2.0, 4.0), (0.5, 0.7, 0.9))]
  rows.append(dict(_row("lam0.3_sig1_seed3", 0.3, 3, 1.0, 1.0, 0.0, 0.0), error="failed", eval="failed",
                    joint={}, solo={}, delta_mean_abs_phi_pct=None, delta_mse_pct=None, delta_fvu_pct=None))
  (agg,) = sweep.aggregate(rows)
  phi_pct = [(j - o) / o * 100 for j, o in zip(joint, solo)]
  assert agg["delta_mean_abs_phi_pct"]["n"] == 3 and agg["failed"] == ["lam0.3_sig1_seed3"]
  assert math.isclose(agg["delta_mean_abs_phi_pct"]["mean"], sum(phi_pct) / 3)
  sd = math.sqrt(sum((x - sum(phi_pct) / 3) ** 2 for x in phi_pct) / 2)
  assert math.isclose(agg["delta_mean_abs_phi_pct"]["sd"], sd)
  assert agg["delta_mse_pct"]["mean"] == pytest.approx(7 / 3) and agg["delta_mse_pct"]["sd"] == pytest.approx(
      math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
  d = np.array(joint) - np.array(solo)
  t = d.mean() / (d.std(ddof=1) / math.sqrt(3))
  test = agg["paired_mean_abs_phi"]
  assert test["n"] == 3 and math.isclose(test["t"], t, rel_tol=1e-9)
  assert math.isclose(test["p"], 2 * scipy.stats.t.sf(abs(t), df=2), rel_tol=1e-9)
  assert "independent" in test["assumes"]
  # A control (joint = solo at every seed) has no spread of differences: no test, not a NaN.
  control = sweep.aggregate([_row(f"lam0_sig1_seed{s}", 0.0, s, 2e-3, 2e-3, 0.0, 0.0) for s in range(2)])[0]
  assert control["paired_mean_abs_phi"]["p"] is None and control["paired_mean_abs_phi"]["mean_difference"] == 0
  summary = {"points": rows, "aggregates": [agg]}
  line = sweep.table(summary).splitlines()[2]
  assert f"{sum(phi_pct) / 3:+.2f} ± {sd:.2f}" in line and "failed: lam0.3_sig1_seed3" in line


def test_sweep_with_seeds_writes_runs_summary_plot_and_rerun_skips(stores, tmp_path):
  train_store, heldout = stores
  out = str(tmp_path / "sweep")
  args = [f"--activations={train_store}", f"--out_dir={out}", "--lambda2=0.3", "--sigma_sq=1", "--seeds=0,1",
          f"--eval_activations={heldout}", "--eval_meta_fve_steps=0", "--parallel=2"] + TRAIN_FLAGS
  first = _sweep(args)
  assert first.returncode == 0, first.stderr[-3000:]
  names = ["lam0.3_sig1_seed0", "lam0.3_sig1_seed1"]
  inits = {}
  for name in names:
    run_dir = os.path.join(out, name)
    assert sweep.is_trained(run_dir) and sweep.is_evaluated(run_dir)
    with open(os.path.join(run_dir, "run_config.json")) as f:
      train_cfg = json.load(f)["train"]
    assert train_cfg["lambda2"] == 0.3 and train_cfg["width"] == 64
    assert train_cfg["seed"] == int(name[-1])
    with open(os.path.join(run_dir, "report.json")) as f:
      inits[name] = json.load(f)["solo"]["mse"]
  assert inits["lam0.3_sig1_seed0"] != inits["lam0.3_sig1_seed1"]  # the seed reached training
  with open(os.path.join(out, "summary.json")) as f:
    summary = json.load(f)
  rows = {r["name"]: r for r in summary["points"]}
  assert set(rows) == set(names) and summary["failed"] == [] and summary["seeds"] == [0, 1]
  (penalised,) = summary["aggregates"]
  values = [rows[f"lam0.3_sig1_seed{s}"]["delta_mean_abs_phi_pct"] for s in (0, 1)]
  assert penalised["delta_mean_abs_phi_pct"]["n"] == 2
  assert penalised["delta_mean_abs_phi_pct"]["mean"] == pytest.approx(np.mean(values))
  assert penalised["delta_mean_abs_phi_pct"]["sd"] == pytest.approx(np.std(values, ddof=1))
  assert penalised["paired_mean_abs_phi"]["n"] == 2 and "assumes" in penalised["paired_mean_abs_phi"]
  assert "±" in first.stdout
  with open(os.path.join(out, "pareto.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"

  before = {k: v for k, v in _mtimes(out).items() if os.sep + "lam" in k}
  t0 = time.time()
  second = _sweep(args)
  assert time.time() - t0 < 90  # no training: start-up and the summary only
  assert second.returncode == 0, second.stderr[-3000:]
  assert "skipped (finished)" in second.stdout
  assert {k: v for k, v in _mtimes(out).items() if os.sep + "lam" in k} == before


def test_failed_point_is_reported_with_its_log_tail(stores, tmp_path):
  train_store, _ = stores
  out = tmp_path / "s"
  # Someone else's files in the point's run directory: the trainer refuses it, inside the point's process.
  (out / "lam0.3_sig1").mkdir(parents=True)
  (out / "lam0.3_sig1" / "metrics.jsonl").write_text("{}\n")
  cfg = sweep.SweepConfig(out_dir=str(out), lambda2s=(0.3,), sigma_sqs=(1.0,),
                          train=TrainConfig(d_model=16, width=64, k=4, meta_width=6, meta_k=2, batch_size=128),
                          run=RunConfig(activations=train_store, out_dir="", num_tokens=256))
  lines = []
  summary = sweep.run_sweep(cfg, report=lines.append)
  assert summary["failed"] == ["lam0.3_sig1"]
  row = summary["points"][0]
  assert "training exited with 1" in row["error"]
  assert "holds metrics.jsonl but no run_config.json" in row["stderr_tail"]
  assert any("lam0.3_sig1: FAILED" in line for line in lines)
  assert os.path.exists(out / "summary.json") and summary["pareto"] is None


def test_reproduce_table_shows_seed_mean_and_sd():
  from metasae_jax.workflows import pipeline
  preset = pipeline.Preset(name="p", description="d", export={}, heldout_shards=1, train={})
  rows = [dict(_row(f"lam0.3_sig1_seed{s}", 0.3, s, j, 2.0e-3, m, 0.1), fuzz_joint=f, fuzz_solo=0.2)
          for s, j, m, f in ((0, 1.8e-3, 1.0, 0.3), (1, 1.9e-3, 3.0, 0.5))]
  for r, ce in zip(rows, (0.5, 0.7)):
    r["joint"].update(delta_ce_pct=ce, l0=10.0)
  text = pipeline.table_markdown(preset, rows)
  line = next(x for x in text.splitlines() if x.startswith("| 0.3 |"))
  cells = [c.strip() for c in line.strip("|").split("|")]
  phi = [-10.0, -5.0]
  assert cells[2] == "2"
  assert cells[3] == f"{np.mean(phi):+.2f} ± {np.std(phi, ddof=1):.2f}"
  assert cells[4] == f"{2.0:+.2f} ± {np.std([1.0, 3.0], ddof=1):.2f}"
  assert cells[7] == "0.600" and cells[10] == "0.400"
  assert "mean ± sd over seeds" in text


def test_preset_grid_runs_through_the_sweep(stores, tmp_path):
  from metasae_jax.workflows import pipeline
  train_store, heldout = stores
  preset = pipeline.Preset(
      name="t", description="tiny grid", export={}, heldout_shards=1,
      train=dict(width=64, k=4, meta_width=6, meta_k=2, batch_size=128, n_primary_steps=2, n_meta_steps=2,
                 lr=1e-3, lambda2=0.0, sigma_sq=3.0),
      num_tokens=512, checkpoint_every_steps=2, log_every_steps=1, grid={"lambda2": (0.3,), "sigma_sq": (1.0,)},
      eval=dict(batch_size=128, meta_fve_steps=0, model="none"))
  summary = pipeline.sweep_stage(preset, train_store, heldout, str(tmp_path))
  run_dir = str(tmp_path / "sweep" / "lam0.3_sig1")
  assert [r["run_dir"] for r in summary["points"]] == [run_dir]
  assert sweep.is_trained(run_dir) and sweep.is_evaluated(run_dir)
  with open(os.path.join(run_dir, "run_config.json")) as f:
    cfg = json.load(f)
  assert cfg["train"]["lambda2"] == 0.3 and cfg["train"]["sigma_sq"] == 1.0 and cfg["data"]["num_tokens"] == 512
  with open(os.path.join(run_dir, "report.json")) as f:
    phi_pct = json.load(f)["comparison"]["mean_abs_phi_pct"]
  line = next(x for x in pipeline.table_markdown(preset, summary["points"]).splitlines() if x.startswith("| 0.3 |"))
  assert line.split("|")[4].strip() == f"{phi_pct:+.2f}"


def test_preset_without_grid_trains_evaluates_and_writes_the_table(tmp_path, monkeypatch):
  from metasae_jax.storage import store as store_lib
  from metasae_jax.workflows import pipeline
  full = synthetic.write_sparse_store(str(tmp_path / "full"), 1024, 16, context_len=8, shard_tokens=256,
                                      num_features=48)
  monkeypatch.setattr(pipeline, "export_stage", lambda preset, data_dir: store_lib.open_store(full.path))
  preset = pipeline.Preset(
      name="single", description="one run", export={}, heldout_shards=1,
      train=dict(width=64, k=4, meta_width=6, meta_k=2, batch_size=128, n_primary_steps=2, n_meta_steps=2,
                 lr=1e-3, lambda2=0.3, sigma_sq=1.0),
      num_tokens=512, checkpoint_every_steps=2, log_every_steps=1,
      eval=dict(batch_size=128, meta_fve_steps=0, model="none", progress=False))
  work = str(tmp_path / "work")
  assert pipeline.run_pipeline(preset, work) == os.path.join(work, "report.md")
  with open(os.path.join(work, "report.json")) as f:
    phi_pct = json.load(f)["comparison"]["mean_abs_phi_pct"]
  with open(os.path.join(work, "table.md")) as f:
    line = next(x for x in f.read().splitlines() if x.startswith("| 0.3 |"))
  cells = [c.strip() for c in line.strip("|").split("|")]
  assert cells[2] == "1" and cells[3] == f"{phi_pct:+.2f}" and cells[6] == "—"


def test_every_training_flag_reaches_the_points_config(stores, tmp_path):
  """The sweep builds each point's TrainConfig from the train flags: a non-default value of each must arrive."""
  train_store, _ = stores
  given = {"width": 64, "k": 4, "meta_width": 6, "meta_k": 3, "penalty_grad": "through", "n_primary_steps": 3,
           "n_meta_steps": 1, "batch_size": 64, "lr": 0.01, "seed": 7, "baseline": False, "architecture": "topk",
           "auxk_detach": True, "compute_dtype": "bfloat16"}
  argv = [f"--activations={train_store}", f"--out_dir={tmp_path}", "--lambda2=0.1,1", "--sigma_sq=2",
          "--skip_first_positions=2", "--num_tokens=128"]
  argv += [f"--{k}" if v is True else f"--no{k}" if v is False else f"--{k}={v}" for k, v in given.items()]
  code = ("import dataclasses, json, sys\nfrom absl import flags\nfrom experiments import sweep\n"
          "flags.FLAGS(sys.argv)\n"
          "config, run = sweep.train.configs_from_flags(lambda2=0.1, sigma_sq=2.0)\n"
          "print(json.dumps({'train': config.to_dict(), 'run': dataclasses.asdict(run)}))\n")
  proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  flagged = {k: out["train"][k] for k in given}
  assert flagged == given and out["train"]["lambda2"] == 0.1 and out["train"]["sigma_sq"] == 2.0
  assert out["train"]["d_model"] == 16
  assert out["run"]["skip_first_positions"] == 2 and out["run"]["num_tokens"] == 128


def test_is_evaluated_keys_on_content_not_file_times(tmp_path):
  """A report describes the weights' bytes: touching them keeps it, changing them asks for a new evaluation."""
  import json as _json
  import os as _os

  import numpy as _np

  from metasae_jax.storage import artifact as _artifact
  from metasae_jax.workflows import sweep as _sweep
  run = tmp_path / "run"
  rng = _np.random.default_rng(0)

  def save(name, scale):
    params = {"W_enc": scale * rng.normal(size=(4, 8)), "b_enc": _np.zeros(8), "W_dec": rng.normal(size=(8, 4)),
              "b_dec": _np.zeros(4)}
    _artifact.save_sae(str(run / name), params, {"k": 2, "activation": "batchtopk",
                                                 "input_norm": "standardize_per_token"})

  for name in _artifact.SAE_NAMES:
    save(name, 1.0)
  assert not _sweep.is_evaluated(str(run))  # no report yet
  digests = {n: _artifact.weights_digest(str(run / n)) for n in _artifact.SAE_NAMES}
  (run / "report.json").write_text(_json.dumps({"artifact_sha256": digests}))
  assert _sweep.is_evaluated(str(run))
  future = _os.path.getmtime(run / "report.json") + 100
  _os.utime(run / "joint" / _artifact.WEIGHTS, (future, future))  # rewritten with the same bytes
  assert _sweep.is_evaluated(str(run))
  save("solo", 2.0)  # retrained: other bytes
  assert not _sweep.is_evaluated(str(run))
