"""A CPU test preset: the built-in model at an early layer, a few thousand tokens, a 2-point grid. Minutes."""

from experiments.configs import base


def get_config(variant: str = ""):
  base.check_variant(variant, ())
  return base.config(
      name="tiny",
      description="SmolLM2-135M-Instruct (built-in), resid_pre of layer 3, 20k builtin tokens; width 1152, k 16.",
      export=dict(layer=3, site="resid_pre", corpus="builtin", context_len=64, num_tokens=20480,
                  shard_tokens=4096, batch_size=8, dtype="float16"),
      heldout_shards=1,
      # Every other TrainConfig field at its default (core/config.py: the paper's).
      train=dict(width=1152, k=16, meta_k=4, batch_size=512),
      num_tokens=60 * 512,
      checkpoint_every_steps=30,
      log_every_steps=5,
      grid={"lambda2": (0.0, 0.3), "sigma_sq": (1.0,)},
      eval=dict(ce_contexts=8, meta_fve_steps=100),
      autointerp=dict(num_latents=2),
      d_model=576,
      model_params=1.35e+08,
      matryoshka_fractions=(0.125, 0.25, 0.5),  # the third arm: solo Matryoshka at width 1152, k 16
  )
