"""What `make demo` runs: SmolLM2-135M (offline GGUF), layer 15, the builtin corpus; ~7 minutes on 2 idle cores (README)."""

from experiments.configs import base


def get_config(variant: str = ""):
  base.check_variant(variant, ())
  return base.config(
      name="smollm2_demo",
      description=("SmolLM2-135M-Instruct (built-in GGUF), resid_pre of layer 15, CPython docs corpus; "
                   "a small MetaSAE (width 2304 = 4 x d_model, k 32) next to its solo baseline."),
      export=dict(layer=15, site="resid_pre", corpus="builtin", context_len=128, num_tokens=147456,
                  shard_tokens=16384, batch_size=8, dtype="float16"),
      heldout_shards=1,
      # Every other TrainConfig field at its default (core/config.py: the paper's).
      train=dict(width=2304, k=32, batch_size=1024),
      num_tokens=300 * 1024,
      checkpoint_every_steps=100,
      log_every_steps=10,
      eval=dict(ce_contexts=32, meta_fve_steps=300),
      autointerp=dict(num_latents=4),
      d_model=576,
      model_params=1.35e+08,
  )
