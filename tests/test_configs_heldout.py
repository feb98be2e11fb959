"""Config files with overrides, the exporter's held-out split, and the README workflow on a tiny model.

Legend: T = tokens, D = d_model, C = context length.
"""

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from experiments import configs
from experiments.configs import base
from metasae_jax.core.config import TrainConfig
from metasae_jax.core.errors import UserError
from metasae_jax.lm import export
from metasae_jax.storage import store
from metasae_jax.training.trainer import RunConfig
from tests.conftest import REPO
from tests.test_export import model_dir, text_file  # noqa: F401  (fixtures: the tiny local model, a corpus)

D, C = 4, 8
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}


def _run(module: str, *argv, check=True) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, capture_output=True, text=True,
                        timeout=600, env=ENV, check=False)
  if check:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return proc


def _store(path, num_tokens=160, shard_tokens=48, fmt="npy"):
  """A store whose row t holds t in every column, so gathered rows name their global token index (format 1 by
  default: the shard-list views below need shards)."""
  acts_TxD = np.repeat(np.arange(num_tokens, dtype=np.float32)[:, None], D, axis=1)
  return store.write_store(str(path), acts_TxD, np.arange(num_tokens, dtype=np.int32), context_len=C,
                           shard_tokens=shard_tokens, fmt=fmt)


def _rows(s: store.Store) -> np.ndarray:
  return s.read_acts(0, s.num_tokens)[:, 0].astype(np.int64)


@pytest.mark.parametrize("fmt", ["npy", "zarr"])
@pytest.mark.parametrize("start,stop", [(0, 160), (8, 40), (48, 96), (40, 56), (152, 160)])
def test_token_view_holds_exactly_its_range(tmp_path, start, stop, fmt):
  view = store.write_token_view(str(tmp_path / "v"), _store(tmp_path / "s", fmt=fmt), start, stop)
  np.testing.assert_array_equal(_rows(view), np.arange(start, stop))
  np.testing.assert_array_equal(view.read_tokens(0, view.num_tokens), np.arange(start, stop))
  assert store.token_ranges(view.path)[1] == [(start, stop)]


def test_token_view_refuses_partial_contexts(tmp_path):
  with pytest.raises(UserError, match="whole contexts"):
    store.write_token_view(str(tmp_path / "v"), _store(tmp_path / "s"), 4, 40)


@pytest.mark.parametrize("fmt", ["npy", "zarr"])
@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.5])
def test_split_is_a_disjoint_tail_of_whole_contexts(tmp_path, fraction, fmt):
  s = _store(tmp_path / "s", fmt=fmt)  # 20 contexts over shards of 6 contexts: the tail cuts a shard
  train_dir, held_dir = store.write_split(s, fraction)
  held_contexts = int(np.ceil(fraction * 20 - 1e-9))
  train, held = _rows(store.open_store(train_dir)), _rows(store.open_store(held_dir))
  np.testing.assert_array_equal(held, np.arange(160 - held_contexts * C, 160))
  np.testing.assert_array_equal(train, np.arange(0, 160 - held_contexts * C))
  assert store.split_of(s.path) == (train_dir, held_dir) == store.split_of(held_dir)
  assert store.shared_tokens(train_dir, held_dir) == 0
  assert store.shared_tokens(s.path, held_dir) == len(held)


def test_shared_tokens_matches_brute_force_over_shard_and_token_views(tmp_path):
  s = _store(tmp_path / "s")
  views = {"all": s.path,
           "shards01": store.write_view(str(tmp_path / "a"), s, [0, 1]).path,
           "shard3": store.write_view(str(tmp_path / "b"), s, [3]).path,
           "t40_120": store.write_token_view(str(tmp_path / "c"), s, 40, 120).path,
           "other": _store(tmp_path / "o").path}
  rows = {k: set(_rows(store.open_store(v))) for k, v in views.items()}
  for a in views:
    for b in views:
      want = 0 if "other" in (a, b) and a != b else len(rows[a] & rows[b])
      assert store.shared_tokens(views[a], views[b]) == want, (a, b)


def test_exporter_writes_the_split_and_training_uses_its_view(tmp_path, model_dir, text_file):  # noqa: F811
  out = str(tmp_path / "acts")
  config = export.ExportConfig(out_dir=out, model=model_dir, layer=1, corpus=text_file, context_len=C,
                               num_tokens=20 * C, chunk_tokens=6 * C, progress=False, heldout_fraction=0.1)
  s = export.export_activations(config)
  train_dir, held_dir = store.split_of(out)
  whole = s.read_acts(0, s.num_tokens, None)
  held = store.open_store(held_dir).read_acts(0, store.open_store(held_dir).num_tokens, None)
  n_held = int(np.ceil(0.1 * (s.num_tokens // C))) * C
  np.testing.assert_array_equal(held, whole[-n_held:])
  assert store.open_store(train_dir).num_tokens == s.num_tokens - n_held
  proc = _run("experiments.train", f"--activations={out}", f"--out_dir={tmp_path / 'run'}", "--dry_run")
  record = json.loads(proc.stdout[proc.stdout.index("{"):])
  assert record["run"]["activations"] == train_dir
  assert record["run"]["eval_activations"] == held_dir  # validation and the closing lines check on it


# A non-default value for every TrainConfig / RunConfig field reachable from --config.
_NON_DEFAULT = {"width": 48, "k": 5, "meta_width": 7, "meta_k": 3, "lambda2": 0.7, "sigma_sq": 2.5,
                "penalty_grad": "through", "n_primary_steps": 4, "n_meta_steps": 2, "batch_size": 96, "lr": 0.002,
                "b1": 0.8, "b2": 0.95, "aux_k": 17, "aux_coeff": 0.125, "dead_after_batches": 9, "auxk_detach": True,
                "seed": 11, "baseline": False, "architecture": "matryoshka_batchtopk",
                "matryoshka_widths": (16, 48), "l0_coefficient": 0.5, "jumprelu_bandwidth": 0.01,
                "jumprelu_init_threshold": 0.02, "compute_dtype": "bfloat16", "algorithm": "dense"}
_RUN_NON_DEFAULT = {"num_tokens": 640, "skip_first_positions": 2, "checkpoint_every_steps": 7,
                    "log_every_steps": 3, "max_checkpoints": 4, "progress": False, "log_to": "jsonl,tensorboard",
                    "wandb_project": "p", "wandb_run_name": "r", "wandb_mode": "online", "eval_every_steps": 5,
                    "eval_activations": "held", "eval_tokens": 96, "curves": False,
                    "shuffle_buffer_tokens": 8192, "data_streams": 2, "model_parallel": 2}


def _dry_run(tmp_path, *argv) -> dict:
  path = _store(tmp_path / "s").path
  proc = _run("experiments.train", f"--activations={path}", f"--out_dir={tmp_path / 'run'}", "--dry_run", *argv)
  return json.loads(proc.stdout[proc.stdout.index("{"):])


def test_every_train_and_run_field_is_reachable_through_config_overrides(tmp_path):
  fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"d_model"}
  run_fields = {f.name for f in dataclasses.fields(RunConfig)} - {"activations", "out_dir"}
  assert set(_NON_DEFAULT) == fields and set(_RUN_NON_DEFAULT) == run_fields  # a new field needs a row here
  def flag(section, k, v):
    return f"--config.{section}.{k}={str(v).lower() if isinstance(v, bool) else v}"
  record = _dry_run(tmp_path, *[flag("train", k, v) for k, v in _NON_DEFAULT.items()],
                    *[flag("run", k, v) for k, v in _RUN_NON_DEFAULT.items()])
  assert {k: record["train"][k] for k in _NON_DEFAULT} == dict(_NON_DEFAULT, matryoshka_widths=[16, 48])
  assert {k: record["run"][k] for k in _RUN_NON_DEFAULT} == _RUN_NON_DEFAULT
  assert record["train"]["d_model"] == D


def test_config_file_then_overrides_then_shorthands(tmp_path):
  tiny = configs.get_config("tiny")
  record = _dry_run(tmp_path, "--config=experiments/configs/tiny.py", "--config.train.k=3", "--lambda2=0.9")
  assert record["train"]["width"] == tiny.train.width  # from the file
  assert record["train"]["k"] == 3 and record["train"]["lambda2"] == 0.9
  assert record["run"]["num_tokens"] == tiny.run.num_tokens
  plain = _dry_run(tmp_path, "--width=40", "--k=2", "--meta_k=2")  # no --config: the defaults, shorthands on top
  want = json.loads(json.dumps(dict(base.train_defaults(), width=40, k=2, meta_k=2)))  # tuples are lists
  assert {k: plain["train"][k] for k in want if k != "meta_width"} == {k: v for k, v in want.items()
                                                                       if k != "meta_width"}


def test_shorthand_and_override_that_disagree_are_refused(tmp_path):
  path = _store(tmp_path / "s").path
  proc = _run("experiments.train", f"--activations={path}", f"--out_dir={tmp_path / 'r'}", "--k=3",
              "--config.train.k=4", "--dry_run", check=False)
  assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: --k=3 and")


def test_presets_are_config_files_with_the_same_values():
  for name in configs.names():
    c, p = configs.get_config(name), configs.get(name)
    assert p.name == name and p.train == c.train.to_dict() and p.num_tokens == c.run.num_tokens
    assert set(p.train) == set(base.train_defaults())
  small = configs.get("gpt2_large_l20", "small")
  assert small.grid is None and small.num_tokens == 10_000_000
  assert small.train == configs.get("gpt2_large_l20").train


def test_deprecated_flag_name_warns_and_works(tmp_path):
  proc = _run("experiments.reproduce", "--preset=tiny", f"--workdir={tmp_path}", "--estimate")
  assert "--workdir is deprecated" in proc.stderr and json.loads(proc.stdout)["points"] == 2
  both = _run("experiments.reproduce", "--preset=tiny", f"--workdir={tmp_path}", f"--out_dir={tmp_path}",
              "--estimate", check=False)
  assert both.returncode == 1 and "pass only --out_dir" in both.stderr


def test_internal_flags_are_hidden_and_sweep_help_lists_train_flags():
  bench = _run("experiments.benchmark", "--help", check=False).stdout
  assert "--workdir" not in bench and "_naive_train" not in bench and "--out_dir" in bench
  sweep_help = _run("experiments.sweep", "--help", check=False).stdout
  for name in ("--width", "--k", "--batch_size", "--config", "--eval_activations", "allow_train_tokens"):
    assert name in sweep_help, name


def _readme_workflow(first: str, holding: str = "") -> list:
  """The commands (argv lists, comments dropped) of the README code block whose first line starts with `first`
  (and that holds `holding`)."""
  with open(os.path.join(REPO, "README.md")) as f:
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", f.read(), re.S | re.M)
  for block in blocks:
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    if lines and lines[0].startswith(first) and holding in block:
      return [shlex.split(line, comments=True) for line in lines]
  raise AssertionError(f"README.md has no code block starting with {first!r} holding {holding!r}")


def test_readme_workflow_runs_and_never_evaluates_on_training_tokens(tmp_path, model_dir, text_file):  # noqa: F811
  """The README's export → train → evaluate → sweep → browse commands, as written, plus tiny-shape flags."""
  tiny = {"export_activations": [f"--model={model_dir}", f"--corpus={text_file}", "--layer=1", f"--context_len={C}",
                                 "--num_tokens=640", "--chunk_tokens=128", "--noprogress"],
          "train": ["--width=64", "--k=4", "--meta_k=2", "--batch_size=64", "--noprogress"],
          # The tiny model stands in for the built-in one, so evaluate is told which model made the store.
          "evaluate": [f"--model={model_dir}", "--meta_fve_steps=0", "--bootstrap_replicates=0", "--batch_size=64",
                       "--ce_contexts=2"],
          "sweep": ["--lambda2=0,0.3", "--width=64", "--k=4", "--meta_k=2", "--batch_size=64", "--parallel=1",
                    "--eval_meta_fve_steps=0", "--noprogress"],
          "browse": ["--num_latents=4", "--num_tokens=256", "--batch_size=64"]}
  ran = []
  for argv in _readme_workflow("python -m experiments.export_activations"):
    module = argv[2]
    name = module.split(".")[1]
    if name not in tiny:
      continue
    args = [re.sub(r"^(data|runs)/", f"{tmp_path}/\\1/", a) for a in argv[3:]]
    _run(module, *args, *tiny[name])
    ran.append(name)
  assert ran == ["export_activations", "train", "evaluate", "sweep", "browse"]
  data, run = str(tmp_path / "data" / "l15"), str(tmp_path / "runs" / "l15")
  train_view, held_view = store.split_of(data)
  with open(os.path.join(run, "run_config.json")) as f:
    assert json.load(f)["data"]["activations"] == train_view
  with open(os.path.join(tmp_path, "runs", "grid", "summary.json")) as f:
    summary = json.load(f)
  assert summary["evaluation"]["activations"] == held_view and not summary["failed"]
  assert os.path.isfile(os.path.join(tmp_path, "runs", "grid", "pareto.png"))
  assert os.path.isfile(os.path.join(run, "report.json")) and os.path.isfile(os.path.join(run, "browser", "index.html"))
  refused = _run("experiments.evaluate", f"--run_dir={run}", f"--activations={data}", "--model=none", check=False)
  assert refused.returncode == 1 and "--allow_train_tokens" in refused.stderr.strip().splitlines()[-1]


def _tiny_demo_overrides(model_dir, text_file) -> list:
  """--config overrides that make the demo's config a seconds-long job on the tiny model and corpus."""
  return [f"--config.export.model={model_dir}", f"--config.export.corpus={text_file}", "--config.export.layer=1",
          f"--config.export.context_len={C}", "--config.export.num_tokens=384", "--config.export.shard_tokens=64",
          "--config.export.batch_size=4", "--config.train.width=64", "--config.train.k=4", "--config.train.meta_k=2",
          "--config.train.batch_size=64", "--config.run.num_tokens=320", "--config.run.checkpoint_every_steps=5",
          "--config.eval.batch_size=64", "--config.eval.ce_contexts=2", "--config.eval.meta_fve_steps=0",
          "--config.eval.bootstrap_replicates=0"]


def test_readme_after_the_demo_runs_as_written(tmp_path, model_dir, text_file):  # noqa: F811
  """The README's newcomer loop, as written: make demo → re-evaluate it → a second run → its evaluation → its
  browser page, with tiny-shape flags appended and runs/ under tmp_path; nothing but the README's commands."""
  with open(os.path.join(REPO, "Makefile")) as f:
    assert re.search(r"^demo:.*\n\t\$\(PY\) -m experiments\.demo$", f.read(), re.M)  # what `make demo` runs
  tiny = {"demo": _tiny_demo_overrides(model_dir, text_file),
          "train": ["--width=64", "--k=4", "--meta_k=2", "--batch_size=64", "--num_tokens=320", "--noprogress"],
          # The tiny model stands in for the built-in one, so evaluate is told which model made the store.
          "evaluate": [f"--model={model_dir}", "--meta_fve_steps=0", "--bootstrap_replicates=0", "--batch_size=64",
                       "--ce_contexts=2"],
          "browse": ["--num_latents=4", "--num_tokens=64", "--batch_size=64"]}
  ran = []
  for argv in _readme_workflow("make demo", holding="python -m experiments.train"):
    if argv[:2] == ["make", "demo"]:
      argv = ["python", "-m", "experiments.demo", "--out_dir", "runs/demo"]
    name = argv[2].split(".")[1]
    args = [re.sub(r"^(runs/)", f"{tmp_path}/\\1", a) for a in argv[3:]]
    _run(argv[2], *args, *tiny[name])
    ran.append(name)
  assert ran == ["demo", "evaluate", "train", "evaluate", "browse"]
  demo, second = str(tmp_path / "runs" / "demo"), str(tmp_path / "runs" / "demo_lambda1")
  data = os.path.join(demo, "data")
  for run in (demo, second):  # both evaluated on the held-out view, never on a token they trained on
    with open(os.path.join(run, "report.json")) as f:
      assert json.load(f)["activations"] == os.path.join(data, "heldout")
  with open(os.path.join(second, "run_config.json")) as f:  # given data/store, the second run trained on data/train
    assert json.load(f)["data"]["activations"] == os.path.join(data, "train")
  with open(os.path.join(second, "config.json")) as f:
    assert json.load(f)["train"]["lambda2"] == 1.0
  assert os.path.isfile(os.path.join(second, "browser", "index.html"))
  with open(os.path.join(REPO, "README.md")) as f:  # the layout the README describes is the one the demo left
    readme = f.read()
  for rel in ("data/store", "data/train", "data/heldout", "joint", "solo", "joint/meta", "report.json", "config.json",
              "run_config.json", "metrics.jsonl", "checkpoints"):
    assert f"runs/demo/{rel}" in readme or f"`{rel}" in readme, rel
    assert os.path.exists(os.path.join(demo, rel)), rel


def test_deprecated_alias_keeps_the_new_flags_type():
  code = ("from absl import flags\nfrom experiments import cli\n"
          "flags.DEFINE_integer('contexts_per_batch', 8, 'x')\ncli.deprecated_alias('batch_size', 'contexts_per_batch')\n"
          "cli.run(lambda argv: print(repr(flags.FLAGS.contexts_per_batch)))\n")
  proc = subprocess.run([sys.executable, "-c", code, "--batch_size=3"], cwd=REPO, env=ENV, capture_output=True,
                        text=True, timeout=120)
  assert proc.stdout.strip() == "3" and "--batch_size is deprecated" in proc.stderr


def test_sweep_takes_the_config_grid_and_defaults_to_the_heldout_view(tmp_path):
  s = _store(tmp_path / "s")
  train_dir, held_dir = store.write_split(s, 0.2)
  proc = _run("experiments.sweep", f"--activations={s.path}", f"--out_dir={tmp_path / 'g'}", "--dry_run",
              "--config=experiments/configs/tiny.py", "--config.train.width=40", "--k=2", "--meta_k=2")
  record = json.loads(proc.stdout[proc.stdout.index("{"):])
  assert record["grid"]["lambda2"] == list(configs.get_config("tiny").grid.lambda2)
  assert record["train"]["width"] == 40 and record["run"]["activations"] == train_dir
  assert record["evaluation"]["activations"] == held_dir
