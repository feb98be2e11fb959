"""Ground-truth atomicity benchmark: synthetic data with known features, joint vs solo SAEs over λ₂ × seeds.

  python -m experiments.groundtruth --out_dir runs/gt            # five scenarios, 3 seeds, a few minutes
  python -m experiments.groundtruth --out_dir runs/gt4 --scale 4 --seeds 5
  python -m experiments.groundtruth --out_dir runs/gth --scenarios hierarchy \\
      --scenario_params hierarchy.p_group=0.2,hierarchy.group_size=4

Writes report.json, report.md and plots/ into --out_dir (definitions: docs/groundtruth.md). Rerunning the
same command resumes; a directory holding a study with other flags is refused.
"""

from absl import flags

from experiments import cli
from metasae_jax.workflows.groundtruth import scenarios

F = flags.FLAGS
flags.DEFINE_string("out_dir", None, "Study directory to create or resume.")
flags.DEFINE_string("scenarios", ",".join(scenarios.KINDS), "Comma-separated scenarios to run.")
flags.DEFINE_string("scenario_params", "", "Generator overrides, name.field=value,... "
                    "(fields: d_model, num_features, p_fire, mag_low, mag_high, noise, num_groups, group_size, "
                    "p_group, p_conditional, p_alone).")
flags.DEFINE_integer("scale", 1, "Multiplies widths, feature counts and steps of the defaults.")
flags.DEFINE_string("lambda2", "0,0.3,1", "Comma-separated penalty weights; 0 is the identical-training control.")
flags.DEFINE_integer("seeds", 3, "Seeds per (scenario, λ₂) point.")
flags.DEFINE_integer("width", 0, "SAE latents; 0 = 64 * scale.")
flags.DEFINE_integer("k", 3, "Active latents per token (BatchTopK).")
flags.DEFINE_integer("meta_width", 0, "Meta SAE latents; 0 = round(width * 1800 / 20480), the paper's ratio.")
flags.DEFINE_integer("meta_k", 2, "Active meta latents per decoder row.")
flags.DEFINE_float("sigma_sq", 1.0, "Penalty bandwidth σ². Paper: 1.0.")
flags.DEFINE_enum("penalty_grad", "stop", ["stop", "through"],
                  "stop: meta reconstruction is a constant (paper); through: gradient flows through the meta SAE.")
flags.DEFINE_enum("auxk_detach", "default", ["default", "true", "false"],
                  "Detach the AuxK target; 'default' keeps the library's rule (needs TrainConfig.auxk_detach "
                  "for the others).")
flags.DEFINE_integer("n_primary_steps", 10, "Primary steps between meta phases. Paper text: 10.")
flags.DEFINE_integer("n_meta_steps", 5, "Meta steps per phase. Paper text: 5.")
flags.DEFINE_integer("steps", 0, "Training steps per SAE; 0 = 1500 * scale.")
flags.DEFINE_integer("batch_size", 256, "Tokens per batch.")
flags.DEFINE_float("lr", 1e-3, "Adam learning rate.")
flags.DEFINE_integer("aux_k", 32, "Dead latents per token in AuxK.")
flags.DEFINE_integer("train_tokens", 32768, "Tokens in each scenario's training store.")
flags.DEFINE_integer("heldout_tokens", 8192, "Tokens in each scenario's held-out store (scores).")
flags.DEFINE_integer("data_seed", 0, "Seed of the synthetic data.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.mark_flag_as_required("out_dir")


def main(argv):
  del argv
  cli.check_out_dir(F.out_dir)
  from metasae_jax.workflows.groundtruth import study  # pylint: disable=g-import-not-at-top  (JAX)
  from metasae_jax.workflows.sweep import parse_floats  # pylint: disable=g-import-not-at-top
  chosen = scenarios.select([s.strip() for s in F.scenarios.split(",") if s.strip()], F.scale,
                            F.scenario_params)
  config = study.StudyConfig(
      out_dir=F.out_dir, scenarios=chosen, scale=F.scale, lambda2s=parse_floats(F.lambda2, "lambda2"),
      seeds=F.seeds, width=F.width, k=F.k, meta_width=F.meta_width, meta_k=F.meta_k, sigma_sq=F.sigma_sq,
      penalty_grad=F.penalty_grad, auxk_detach={"default": None, "true": True, "false": False}[F.auxk_detach],
      n_primary_steps=F.n_primary_steps, n_meta_steps=F.n_meta_steps, steps=F.steps, batch_size=F.batch_size,
      lr=F.lr, aux_k=F.aux_k, train_tokens=F.train_tokens, heldout_tokens=F.heldout_tokens,
      data_seed=F.data_seed)
  report = study.run_study(config, progress=F.progress)
  for name, s in report["scenarios"].items():
    print(f"{name}: {s['verdict']}")
  print(f"wrote {F.out_dir}/report.md, report.json, plots/")


if __name__ == "__main__":
  cli.run(main)
