"""End-to-end job from a preset: export → split → train (or the sweep) → matryoshka arm → evaluate →
(autointerp) → table.

Every stage resumes or is skipped when its outputs are complete, so rerunning
the same command continues where it stopped. A preset with a grid runs
`workflows.sweep` (the only sweep loop), one process per point and seed. A preset
with `matryoshka_fractions` also trains a solo Matryoshka BatchTopK SAE per seed
(OUT_DIR/matryoshka/seed<s>/, its SAE in that run's joint/) for the table.
"""

import dataclasses
import json
import os
import time
from typing import Optional

from metasae_jax.core.config import TrainConfig, default_meta_width
from metasae_jax.core.errors import UserError
from metasae_jax.storage import atomic, markdown, store
from metasae_jax.evaluation.evaluate import EvalConfig, evaluate_run
from metasae_jax.training.trainer import RunConfig, recorded_skip_first_positions, train_and_save
from metasae_jax.workflows import matryoshka_arm, sweep

CONFIG_JSON = "config.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Preset:
  """A whole experiment: the paper's settings for one model, or a small CPU job."""
  name: str
  description: str
  export: dict
  """ExportConfig fields (minus out_dir): model, layer, site, corpus, context_len, num_tokens, ..."""
  heldout_shards: int
  """The store's last shards held out for evaluation (never trained on)."""
  train: dict
  """TrainConfig fields minus d_model (taken from the store)."""
  num_tokens: int = 0
  """Training tokens (0 = one pass over the training shards)."""
  checkpoint_every_steps: int = 1000
  log_every_steps: int = 50
  grid: Optional[dict] = None
  """{"lambda2": (...), "sigma_sq": (...)[, "seeds": (...)]} to sweep instead of a single run; with seeds,
  every point is trained once per seed and the table shows mean ± sd over seeds."""
  eval: dict = dataclasses.field(default_factory=dict)
  """EvalConfig fields minus run_dir / activations."""
  autointerp: dict = dataclasses.field(default_factory=dict)
  """AutointerpConfig fields used when an --llm is given."""
  paper: dict = dataclasses.field(default_factory=dict)
  """The paper's own numbers for this setting, for table.md ({} when the paper has none)."""
  d_model: int = 0
  """The model's residual width, for cost estimates before anything is exported (0 = unknown)."""
  model_params: float = 0.0
  """Model parameters, for the export cost estimate (0 = unknown)."""
  matryoshka_fractions: tuple = ()
  """The matryoshka arm: per seed, a solo Matryoshka BatchTopK SAE (λ₂ 0, no twin) at `train`'s width and k,
  nested prefixes at these fractions of the width (the full width last); () = no arm."""


def estimate_cost(preset: Preset, train_tflops: float = 15.0, export_tflops: float = 30.0) -> dict:
  """Disk and compute of a preset from its settings (an estimate; FLOP rates are assumptions).

  Export: 2 FLOPs per parameter per token, scaled by the fraction of blocks run.
  Training: per step 5 matmuls of 2·B·d·n FLOPs for each of joint and solo, plus
  the meta SAE (penalty every step, n_meta/n_primary meta steps).
  """
  e, t = preset.export, preset.train
  d, n, b = preset.d_model, t["width"], t["batch_size"]
  m = t.get("meta_width") or default_meta_width(n)
  tokens = e["num_tokens"]
  disk_gb = tokens * d * (2 if e.get("dtype", "float16") == "float16" else 4) / 1e9
  points = (len(sweep.grid(preset.grid["lambda2"], preset.grid["sigma_sq"], preset.grid.get("seeds", ())))
            if preset.grid else 1)
  matryoshka_runs = len(_seeds(preset)) if preset.matryoshka_fractions else 0
  steps = (preset.num_tokens or tokens) // b
  meta_fwd = 4 * n * d * m
  step_flops = 2 * 5 * 2 * b * d * n + meta_fwd * (1 + 3 * t.get("n_meta_steps", 5) / t.get("n_primary_steps", 10))
  export_flops = 2 * preset.model_params * tokens * 0.6  # blocks up to the hooked layer, roughly
  # A matryoshka run trains one SAE (no twin, no meta SAE): about half of a point.
  return {"disk_gb": disk_gb, "points": points, "matryoshka_runs": matryoshka_runs, "steps_per_point": steps,
          "train_hours_per_point": steps * step_flops / (train_tflops * 1e12) / 3600,
          "train_hours_total": (points + 0.5 * matryoshka_runs) * steps * step_flops / (train_tflops * 1e12) / 3600,
          "export_hours": export_flops / (export_tflops * 1e12) / 3600,
          "assumed_tflops": {"train": train_tflops, "export": export_tflops}}


def _log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def export_stage(preset: Preset, data_dir: str) -> store.Store:
  from metasae_jax.lm.export import ExportConfig, export_activations
  from metasae_jax.lm.export_config import preflight
  path = os.path.join(data_dir, "store")
  _log(f"export: {preset.export.get('model', 'default model')} → {path}")
  # The pipeline splits by whole shards itself (split_stage), as it always has: existing workdirs resume.
  config = ExportConfig(out_dir=path, **dict(dict(heldout_fraction=0.0), **preset.export))
  preflight(config)  # the model's layer count and the corpus, before the model loads
  export_activations(config)
  return store.open_store(path)


def split_stage(full: store.Store, data_dir: str, heldout_shards: int,
                shard_tokens: Optional[int]) -> tuple[str, str]:
  """Train / held-out views of the store (metadata only; the data is shared): the last `heldout_shards` shards of
  a format-1 store, the last heldout_shards x shard_tokens tokens of a zarr one (the same tokens; without
  shard_tokens, x its chunk)."""
  train_dir, held_dir = os.path.join(data_dir, "train"), os.path.join(data_dir, "heldout")
  if full.format == store.FORMAT_NPY:
    n = len(full.segment_offsets) - 1
    if not 0 < heldout_shards < n:
      raise UserError(f"the store {full.path} has {n} shards; holding out {heldout_shards} leaves "
                      "nothing to train or evaluate on. Export more tokens or lower --shard_tokens.")
    store.write_view(train_dir, full, range(n - heldout_shards))
    store.write_view(held_dir, full, range(n - heldout_shards, n))
    return train_dir, held_dir
  shard = (shard_tokens or int(full.chunk_offsets[1])) // full.context_len * full.context_len
  cut = full.num_tokens - heldout_shards * shard
  if not 0 < cut < full.num_tokens:
    raise UserError(f"the store {full.path} has {full.num_tokens} tokens; holding out {heldout_shards} x "
                    f"{shard} leaves nothing to train or evaluate on. Export more tokens or lower --shard_tokens.")
  store.write_token_view(train_dir, full, 0, cut)
  store.write_token_view(held_dir, full, cut, full.num_tokens)
  return train_dir, held_dir


def _run_config(preset: Preset, train_dir: str, run_dir: str) -> RunConfig:
  # A run started before training defaulted to every position resumes with its recorded rule.
  skip = recorded_skip_first_positions(run_dir) or 0
  return RunConfig(activations=train_dir, out_dir=run_dir, num_tokens=preset.num_tokens, skip_first_positions=skip,
                   checkpoint_every_steps=preset.checkpoint_every_steps, log_every_steps=preset.log_every_steps)


def train_stage(preset: Preset, train_dir: str, run_dir: str) -> None:
  d_model = store.read_manifest(train_dir)["d_model"]
  config = TrainConfig(d_model=d_model, **preset.train)
  _log(f"train: width {config.width}, k {config.k}, λ₂ {config.lambda2}, σ² {config.sigma_sq} → {run_dir}")
  train_and_save(config, _run_config(preset, train_dir, run_dir))


def evaluate_stage(preset: Preset, run_dir: str, held_dir: str) -> dict:
  if sweep.is_evaluated(run_dir):
    _log(f"evaluate: {run_dir}/{sweep.REPORT} is up to date")
    with open(os.path.join(run_dir, sweep.REPORT)) as f:
      return json.load(f)
  _log(f"evaluate: {run_dir} on {held_dir}")
  return evaluate_run(EvalConfig(run_dir=run_dir, activations=held_dir, **preset.eval))


def sweep_stage(preset: Preset, train_dir: str, held_dir: str, workdir: str) -> dict:
  """The preset's grid through `workflows.sweep` (one process per point and seed); returns its summary."""
  d_model = store.read_manifest(train_dir)["d_model"]
  config = sweep.SweepConfig(
      out_dir=os.path.join(workdir, "sweep"), lambda2s=tuple(preset.grid["lambda2"]),
      sigma_sqs=tuple(preset.grid["sigma_sq"]), seeds=tuple(preset.grid.get("seeds", ())),
      train=TrainConfig(d_model=d_model, **preset.train), run=_run_config(preset, train_dir, ""),
      evaluation=EvalConfig(run_dir="", activations=held_dir, **preset.eval))
  summary = sweep.run_sweep(config, report=_log)
  if summary["failed"]:
    rows = {r["name"]: r for r in summary["points"]}
    details = "\n".join(f"{n}: {rows[n]['error']}\n{rows[n].get('stderr_tail', '')}" for n in summary["failed"])
    raise UserError(f"{len(summary['failed'])} sweep points failed (rerun to retry them; finished points are "
                    f"kept):\n{details}")
  return summary


def _seeds(preset: Preset) -> tuple:
  """The seeds the preset trains: its grid's, else its train seed."""
  return tuple((preset.grid or {}).get("seeds", ())) or (int(preset.train.get("seed", 0)),)


def matryoshka_dir(workdir: str, seed: int) -> str:
  return os.path.join(workdir, "matryoshka", f"seed{seed}")


def matryoshka_stage(preset: Preset, train_dir: str, held_dir: str, workdir: str) -> list:
  """Trains and evaluates the matryoshka arm once per seed (it has no λ₂ or σ²); returns its rows."""
  d_model = store.read_manifest(train_dir)["d_model"]
  rows = []
  for seed in _seeds(preset):
    run_dir = matryoshka_dir(workdir, seed)
    config = TrainConfig(d_model=d_model, **matryoshka_arm.train_fields(preset.train, preset.matryoshka_fractions,
                                                                        seed))
    _log(f"matryoshka arm: width {config.width}, k {config.k}, prefixes {list(config.matryoshka_widths)}, "
         f"seed {seed} → {run_dir}")
    train_and_save(config, _run_config(preset, train_dir, run_dir))
    evaluate_stage(preset, run_dir, held_dir)
    rows.append(sweep.point_summary({"name": f"matryoshka_seed{seed}", "run_dir": run_dir, "lambda2": 0.0,
                                     "sigma_sq": None, "seed": seed, "eval": "evaluated"}))
  return rows


def autointerp_stage(preset: Preset, run_dir: str, held_dir: str, llm: str) -> dict:
  from metasae_jax.autointerp.pipeline import AutointerpConfig, run_autointerp  # pylint: disable=g-import-not-at-top
  _log(f"autointerp: {llm} on {run_dir}")
  return run_autointerp(AutointerpConfig(run_dir=run_dir, activations=held_dir, llm=llm, **preset.autointerp))


def _fmt(v, spec=".4g"):
  return "—" if v is None else format(v, spec)


def _mean(rows: list, sae: str, key: str) -> Optional[float]:
  return sweep.mean_sd_of([r.get(sae, {}).get(key) for r in rows])["mean"]


def table_markdown(preset: Preset, rows: list[dict], matryoshka_rows: Optional[list] = None) -> str:
  """The paper's Table 1 layout: per (λ₂, σ²), joint vs its own solo; mean ± sd over seeds where there are several."""
  lines = [f"# {markdown.text(preset.name)}: joint vs solo", "", markdown.text(preset.description), "",
           "| λ₂ | σ² | seeds | Δ mean abs φ % | ΔMSE % | ΔFVU % | paired p | ΔCE joint % | ΔCE solo % | L0 joint "
           "| fuzz joint | fuzz solo |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  by_name = {r["name"]: r for r in rows}
  aggregates = sweep.aggregate(rows)
  for a in aggregates:
    members = [by_name[n] for n in a["runs"]]
    fuzz = {s: sweep.mean_sd_of([r.get(f"fuzz_{s}") for r in members])["mean"] for s in ("joint", "solo")}
    lines.append(
        f"| {a['lambda2']:g} | {a['sigma_sq']:g} | {len(members)} | {sweep.mean_sd(a['delta_mean_abs_phi_pct'])} | "
        f"{sweep.mean_sd(a['delta_mse_pct'])} | {sweep.mean_sd(a['delta_fvu_pct'])} | "
        f"{_fmt(a['paired_mean_abs_phi']['p'], '.3g')} | {_fmt(_mean(members, 'joint', 'delta_ce_pct'), '.3f')} | "
        f"{_fmt(_mean(members, 'solo', 'delta_ce_pct'), '.3f')} | {_fmt(_mean(members, 'joint', 'l0'), '.1f')} | "
        f"{_fmt(fuzz['joint'], '.3f')} | {_fmt(fuzz['solo'], '.3f')} |")
  if any(len(a["runs"]) > 1 for a in aggregates):
    lines += ["", "Intervals are mean ± sd over seeds (n − 1 denominator); " + sweep.PAIRED_TEST_ASSUMES]
  if matryoshka_rows:
    lines += [""] + arms_markdown(rows, matryoshka_rows, int(preset.train.get("seed", 0)))
  if preset.paper:
    lines += ["", "## The paper's numbers for this setting", ""]
    lines += [f"- {markdown.text(k)}: {markdown.text(v)}" for k, v in preset.paper.items()]
  return "\n".join(lines) + "\n"


def _pct(a, b) -> Optional[float]:
  return None if a is None or b is None or not b else (a - b) / abs(b) * 100.0


def arms_markdown(rows: list[dict], matryoshka_rows: list[dict], default_seed: int = 0) -> list:
  """The three methods on the same data: solo BatchTopK, joint MetaSAE at each (λ₂, σ²), solo Matryoshka
  BatchTopK; each SAE's own numbers (mean ± sd over seeds) and its difference from the solo SAE of the same
  seed (same init seed, same batches)."""
  def seed_of(r):  # a sweep without seeds trains every point with the train config's seed
    return default_seed if r.get("seed") is None else r["seed"]

  solo_by_seed, solo_fuzz = {}, {}
  for r in rows:  # the solo SAE does not depend on λ₂ or σ²: one per seed
    if r.get("solo"):
      solo_by_seed.setdefault(seed_of(r), r["solo"])
      solo_fuzz.setdefault(seed_of(r), r.get("fuzz_solo"))
  arms = [("solo BatchTopK", [{"seed": seed, "stats": v, "fuzz": solo_fuzz[seed]} for seed, v in solo_by_seed.items()])]
  by_name = {r["name"]: r for r in rows}
  for a in sweep.aggregate(rows):
    arms.append((f"joint MetaSAE λ₂={a['lambda2']:g} σ²={a['sigma_sq']:g}",
                 [{"seed": seed_of(by_name[n]), "stats": by_name[n].get("joint") or {},
                   "fuzz": by_name[n].get("fuzz_joint")} for n in a["runs"]]))
  arms.append(("solo Matryoshka BatchTopK (λ₂ 0)",
               [{"seed": seed_of(r), "stats": r.get("joint") or {}, "fuzz": r.get("fuzz_joint")}
                for r in matryoshka_rows]))
  lines = ["## The methods side by side", "",
           "| SAE | seeds | mean abs φ | MSE | FVU | L0 | ΔCE % | fuzz | Δ mean abs φ % vs solo | ΔMSE % vs solo "
           "| ΔFVU % vs solo |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for label, members in arms:
    def stat(key, members=members):
      return sweep.mean_sd_of([m["stats"].get(key) for m in members])

    def vs_solo(key, members=members):
      return sweep.mean_sd_of([_pct(m["stats"].get(key), solo_by_seed.get(m["seed"], {}).get(key))
                               for m in members])
    fuzz = sweep.mean_sd_of([m.get("fuzz") for m in members])
    solo_row = label.startswith("solo BatchTopK")
    lines.append(
        f"| {label} | {len(members)} | {sweep.mean_sd(stat('mean_abs_phi'), '.4g')} | "
        f"{sweep.mean_sd(stat('mse'), '.4g')} | {sweep.mean_sd(stat('fvu'), '.4g')} | "
        f"{sweep.mean_sd(stat('l0'), '.1f')} | {sweep.mean_sd(stat('delta_ce_pct'), '.3f')} | "
        f"{sweep.mean_sd(fuzz, '.3f')} | "
        + " | ".join("—" if solo_row else sweep.mean_sd(vs_solo(k)) for k in ("mean_abs_phi", "mse", "fvu"))
        + " |")
  lines += ["", "Each SAE's numbers on the held-out tokens (mean ± sd over seeds); Δ % vs solo = (SAE − solo BatchTopK "
            "of the same seed) / solo. The Matryoshka SAE trains without the meta SAE penalty and without a twin, "
            "on the same batches and from the same init seed as the solo SAE."]
  return lines


def _with_scores(row: dict, scores: Optional[dict]) -> dict:
  if scores:
    row = dict(row, fuzz_joint=scores.get("joint", {}).get("fuzz_spearman"),
               fuzz_solo=scores.get("solo", {}).get("fuzz_spearman"))
  return row


def run_pipeline(preset: Preset, workdir: str, llm: str = "", config: Optional[dict] = None) -> str:
  """Runs the preset in `workdir`; returns the path of its report (report.md, or table.md for a grid).

  `config` (the resolved config tree the preset came from) is saved as workdir/config.json.
  """
  if config is not None:
    os.makedirs(workdir, exist_ok=True)
    atomic.write_json(os.path.join(workdir, CONFIG_JSON), config)
  data_dir = os.path.join(workdir, "data")
  full = export_stage(preset, data_dir)
  train_dir, held_dir = split_stage(full, data_dir, preset.heldout_shards,
                                     preset.export.get("shard_tokens"))
  if preset.grid:
    rows = sweep_stage(preset, train_dir, held_dir, workdir)["points"]
  else:
    train_stage(preset, train_dir, workdir)
    evaluate_stage(preset, workdir, held_dir)
    rows = [sweep.point_summary({"name": os.path.basename(os.path.abspath(workdir)), "run_dir": workdir,
                                 "lambda2": float(preset.train.get("lambda2", 0.3)),
                                 "sigma_sq": float(preset.train.get("sigma_sq", 1.0)),
                                 "seed": preset.train.get("seed", 0), "eval": "evaluated"})]
  mat_rows = matryoshka_stage(preset, train_dir, held_dir, workdir) if preset.matryoshka_fractions else []
  if llm:
    rows = [_with_scores(r, autointerp_stage(preset, r["run_dir"], held_dir, llm)) for r in rows]
    mat_rows = [_with_scores(r, autointerp_stage(preset, r["run_dir"], held_dir, llm)) for r in mat_rows]
  table = os.path.join(workdir, "table.md")
  atomic.write_text(table, table_markdown(preset, rows, mat_rows))
  _log(f"done: {table}")
  return os.path.join(workdir, "report.md") if not preset.grid else table
