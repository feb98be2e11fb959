"""What `train` and `sweep` use without --config: every field at its default (the plain flags' defaults)."""

from experiments.configs import base


def get_config(variant: str = ""):
  base.check_variant(variant, ())
  return base.config(name="default", description="Every TrainConfig / RunConfig field at its default.",
                     export={})
