"""The matryoshka arm of `reproduce`: its TrainConfig, the side-by-side table, and a tiny pipeline run."""

import json
import os

import numpy as np
import pytest

from metasae_jax.core.config import TrainConfig
from metasae_jax.storage import synthetic
from metasae_jax.workflows import matryoshka_arm, pipeline


def test_prefix_widths_and_train_fields():
  assert matryoshka_arm.prefix_widths(64, (0.125, 0.25, 0.5)) == (8, 16, 32)
  assert matryoshka_arm.prefix_widths(10, (0.01, 0.05, 0.5, 0.99)) == (1, 5)  # whole latents, below the width
  assert matryoshka_arm.check_fractions((0.5, 0.25)) and not matryoshka_arm.check_fractions((0.25, 0.5))
  shared = dict(width=64, k=4, meta_k=2, lambda2=0.3, seed=9, baseline=True, batch_size=128, lr=1e-3)
  tc = TrainConfig(d_model=16, **matryoshka_arm.train_fields(shared, (0.25, 0.5), seed=2))
  assert tc.architecture == "matryoshka_batchtopk" and tc.matryoshka_widths == (16, 32, 64)
  assert tc.lambda2 == 0 and not tc.baseline and tc.seed == 2
  assert (tc.width, tc.k, tc.batch_size, tc.lr) == (64, 4, 128, 1e-3)


def _stats(phi, mse, fvu):
  return {"mean_abs_phi": phi, "mse": mse, "fvu": fvu, "l0": 4.0, "delta_ce_pct": None}


def test_side_by_side_table_pairs_each_sae_with_the_solo_sae_of_its_seed():
  rows = [{"name": f"lam0.3_sig1_seed{s}", "lambda2": 0.3, "sigma_sq": 1.0, "seed": s, "eval": "evaluated",
           "joint": _stats(1.0 + s, 0.5, 0.2), "solo": _stats(2.0 + s, 0.4, 0.1), "delta_mean_abs_phi_pct": 0.0,
           "delta_mse_pct": 0.0, "delta_fvu_pct": 0.0} for s in (0, 1)]
  mats = [{"name": f"matryoshka_seed{s}", "lambda2": 0.0, "sigma_sq": None, "seed": s,
           "joint": _stats(3.0 + s, 0.6, 0.3)} for s in (1, 0)]  # order must not matter
  preset = pipeline.Preset(name="p", description="d", export={}, heldout_shards=1, train={})
  text = pipeline.table_markdown(preset, rows, mats)
  line = next(x for x in text.splitlines() if x.startswith("| solo Matryoshka"))
  cells = [c.strip() for c in line.strip("|").split("|")]
  assert cells[1] == "2"
  phi_pct = [(3.0 + s - (2.0 + s)) / (2.0 + s) * 100 for s in (0, 1)]
  assert cells[8] == f"{np.mean(phi_pct):+.2f} ± {np.std(phi_pct, ddof=1):.2f}"
  assert cells[9] == "+50.00 ± 0.00"  # (0.6 − 0.4) / 0.4
  solo = next(x for x in text.splitlines() if x.startswith("| solo BatchTopK"))
  assert solo.strip("|").split("|")[8].strip() == "—"
  assert "| joint MetaSAE λ₂=0.3 σ²=1 | 2 |" in text
  assert "solo Matryoshka" not in pipeline.table_markdown(preset, rows)  # no arm, no section


def test_preset_with_matryoshka_arm_trains_evaluates_and_tables_it(tmp_path, monkeypatch):
  from metasae_jax.storage import store as store_lib  # pylint: disable=g-import-not-at-top
  full = synthetic.write_sparse_store(str(tmp_path / "full"), 1024, 16, context_len=8, shard_tokens=256,
                                      num_features=48)
  monkeypatch.setattr(pipeline, "export_stage", lambda preset, data_dir: store_lib.open_store(full.path))
  preset = pipeline.Preset(
      name="single", description="one run", export={}, heldout_shards=1,
      train=dict(width=64, k=4, meta_width=6, meta_k=2, batch_size=128, n_primary_steps=2, n_meta_steps=2,
                 lr=1e-3, lambda2=0.3, sigma_sq=1.0),
      num_tokens=512, checkpoint_every_steps=2, log_every_steps=1,
      eval=dict(batch_size=128, meta_fve_steps=0, model="none", progress=False),
      matryoshka_fractions=(0.25, 0.5))
  work = str(tmp_path / "work")
  pipeline.run_pipeline(preset, work)
  run = pipeline.matryoshka_dir(work, 0)
  with open(os.path.join(run, "joint", "cfg.json")) as f:
    cfg = json.load(f)
  assert cfg.get("architecture", cfg.get("activation")) == "matryoshka_batchtopk" and cfg["width"] == 64
  with open(os.path.join(run, "report.json")) as f:
    rep = json.load(f)
  assert rep["joint"]["l0"] == pytest.approx(4, rel=0.25) and "solo" not in rep
  with open(os.path.join(work, "table.md")) as f:
    table = f.read()
  line = next(x for x in table.splitlines() if x.startswith("| solo Matryoshka"))
  assert line.strip("|").split("|")[1].strip() == "1" and f"{rep['joint']['mse']:.4g}" in line
