"""TopK (Gao et al. 2024): each token's k largest pre-activations fire.

Legend: B = rows, N = latents.
"""

import jax

from metasae_jax.core.architectures import batchtopk


class TopK(batchtopk.TopKFamily):
  name = "topk"

  def naive_fire(self, pre_BxN, k):
    vals_BxK, _ = jax.lax.top_k(pre_BxN, k)
    return jax.numpy.where((pre_BxN >= vals_BxK[:, -1:]) & (pre_BxN > 0), pre_BxN, 0.0)


ARCHITECTURE = TopK()
