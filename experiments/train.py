"""Trains a MetaSAE (joint primary + meta SAE) and the solo baseline in lockstep.

  python -m experiments.train --activations STORE --out_dir runs/x --width 4096 --k 64

Rerunning the same command resumes from the latest checkpoint.
"""

import dataclasses

from absl import flags

from experiments import cli
from metasae_jax.training import sharding, trainer
from metasae_jax.core.config import TrainConfig
from metasae_jax.storage.store import read_manifest
from metasae_jax.training.trainer import RunConfig, train_and_save

F = flags.FLAGS
flags.DEFINE_string("activations", None, "Activation store directory (metasae-activations/1).")
flags.DEFINE_string("out_dir", None, "Run directory to create or resume.")
flags.DEFINE_integer("width", 4096, "Primary SAE latents.")
flags.DEFINE_integer("k", 64, "Active latents per token (BatchTopK keeps k * batch_size). Paper: 64.")
flags.DEFINE_integer("meta_width", 0,
                     "Meta SAE latents; 0 = round(width * 1800 / 20480), the paper's 1800 at its width 20480.")
flags.DEFINE_integer("meta_k", 8, "Active meta latents per decoder row. Default: the paper's text (8); the "
                     "reference's run script for GPT-2 large uses 4 (preset gpt2_large_l20).")
flags.DEFINE_float("lambda2", 0.3, "Decomposability penalty weight; 0 = no penalty (control). Paper: 0.3.")
flags.DEFINE_float("sigma_sq", 1.0, "Penalty bandwidth sigma^2. Paper: 1.0.")
flags.DEFINE_enum("penalty_grad", "stop", ["stop", "through"],
                  "stop: meta reconstruction is a constant (paper); through: gradient flows through the frozen meta SAE.")
flags.DEFINE_integer("n_primary_steps", 10, "Primary steps between meta phases. Default: the paper's text "
                     "(10); the reference's run script uses 100 (preset gpt2_large_l20).")
flags.DEFINE_integer("n_meta_steps", 5, "Meta steps per meta phase. Default: the paper's text (5); the "
                     "reference's run script uses 10 (preset gpt2_large_l20).")
flags.DEFINE_integer("batch_size", 4096, "Tokens per global batch. Paper: 4096.")
flags.DEFINE_integer("num_tokens", 0, "Training tokens after skipping; 0 = one pass over the store.")
flags.DEFINE_float("lr", 3e-4, "Adam learning rate. Paper: 3e-4.")
flags.DEFINE_integer("seed", 0, "Seed for init and data order (joint and solo share the init).")
flags.DEFINE_bool("baseline", True, "Train the solo SAE in lockstep on identical batches.")
flags.DEFINE_enum("activation", "batchtopk", ["batchtopk", "topk"], "Primary SAE activation.")
flags.DEFINE_bool("auxk_detach", False,
                  "Detach the AuxK target residual (OpenAI's TopK recipe). Default: not detached, as the paper's "
                  "reference code, so AuxK's gradient also reaches the main reconstruction.")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                  "Matmul input dtype of the primary SAEs; bfloat16 (for GPUs/TPUs) accumulates in float32 and "
                  "keeps float32 weights and Adam state.")
flags.DEFINE_integer("skip_first_positions", 0,
                     "Skip this many positions at the start of every context; 0 (default, as the paper's "
                     "code) trains on every position.")
flags.DEFINE_integer("checkpoint_every_steps", 1000, "Orbax checkpoint interval (steps).")
flags.DEFINE_integer("log_every_steps", 50, "metrics.jsonl interval (steps).")
flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_bool("distributed", False,
                  "Multi-host run with auto-detected peers (TPU pod slices, SLURM): run the same command on "
                  "every host. Alternative to --coordinator_address.")
# Tracking and validation during training (docs/tracking.md).
flags.DEFINE_string("log_to", "jsonl", "Trackers, comma-separated, any of jsonl,tensorboard,wandb; metrics.jsonl is "
                  "always written, tensorboard writes OUT_DIR/tensorboard, wandb OUT_DIR/wandb.")
flags.DEFINE_string("wandb_project", "metasae-jax", "W&B project (with --log_to wandb).")
flags.DEFINE_string("wandb_run_name", "", "W&B run name; empty = the --out_dir's name.")
flags.DEFINE_enum("wandb_mode", "offline", ["offline", "online"],
                  "W&B mode: offline needs no account or network (upload later with `wandb sync`).")
flags.DEFINE_integer("eval_every_steps", 0, "Validate joint and solo on a fixed held-out sample every this many "
                     "steps (and at the end); 0 = never.")
flags.DEFINE_string("eval_activations", "", "Held-out store for --eval_every_steps; empty = the training store's "
                    "recorded held-out view.")
flags.DEFINE_integer("eval_tokens", 4096, "Held-out tokens in the validation sample.")
flags.mark_flags_as_required(["activations", "out_dir"])


def configs_from_flags(**overrides) -> tuple[TrainConfig, RunConfig]:
  """TrainConfig (every field with a flag of its name, `overrides` winning) and RunConfig from the flags."""
  fields = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "d_model"]
  values = {name: overrides[name] if name in overrides else F[name].value
            for name in fields if name in overrides or name in F}
  config = TrainConfig(d_model=read_manifest(F.activations)["d_model"], **values)
  skip = F.skip_first_positions
  if not F["skip_first_positions"].present:
    # Resuming without the flag keeps the rule the run was started with (the default used to be 1).
    skip = trainer.recorded_skip_first_positions(F.out_dir)
    skip = F.skip_first_positions if skip is None else skip
  run = RunConfig(activations=F.activations, out_dir=F.out_dir, num_tokens=F.num_tokens,
                  skip_first_positions=skip,
                  checkpoint_every_steps=F.checkpoint_every_steps, log_every_steps=F.log_every_steps,
                  progress=F.progress, log_to=F.log_to, wandb_project=F.wandb_project,
                  wandb_run_name=F.wandb_run_name, wandb_mode=F.wandb_mode, eval_every_steps=F.eval_every_steps,
                  eval_activations=F.eval_activations, eval_tokens=F.eval_tokens)
  return config, run


def main(argv):
  del argv
  sharding.initialize_distributed(F.coordinator_address, F.num_processes, F.process_id, F.distributed)
  config, run = configs_from_flags()
  metrics = train_and_save(config, run)
  if metrics:
    print(f"done: {F.out_dir}  joint fvu {metrics['joint/fvu']:.4f}  l0 {metrics['joint/l0']:.1f}"
          + (f"  solo fvu {metrics['solo/fvu']:.4f}" if "solo/fvu" in metrics else ""))
  else:
    print(f"done: {F.out_dir} (already finished; nothing changed)")


if __name__ == "__main__":
  cli.run(main)
