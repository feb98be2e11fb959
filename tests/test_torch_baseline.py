"""The PyTorch baseline (metasae_jax/lm/torch_baseline.py) trains like core.train_step from the same parameters.

Legend: B = batch, D = d_model. The benchmark times it against our step and issue #29's study trains with it,
so it must follow the same rules: the solo SAE starts from the joint's init, and the penalty's meta forward
advances the meta SAE's dead counter (the reference's rules).
"""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from metasae_jax.core import train_step as ts
from metasae_jax.core.config import TrainConfig
from metasae_jax.lm.torch_baseline import Baseline
from metasae_jax.storage import synthetic

CFG = TrainConfig(d_model=16, width=96, k=3, meta_width=48, meta_k=1, batch_size=128, n_primary_steps=3,
                  n_meta_steps=2, lr=1e-3, seed=0)


def _params(s) -> dict:
  return {"W_enc": s.w_enc, "b_enc": s.b_enc, "W_dec": s.w_dec, "b_dec": s.b_dec}


def test_solo_starts_from_the_joint_init():
  base = Baseline(CFG, threads=1)
  for name, t in _params(base.joint).items():
    assert torch.equal(t, _params(base.solo)[name]), name
    assert t.data_ptr() != _params(base.solo)[name].data_ptr()


def test_steps_match_train_step_from_the_same_init():
  base = Baseline(CFG, threads=1)
  state = ts.init_train_state(CFG)
  as_jax = lambda s: {k: jnp.asarray(v.detach().numpy()) for k, v in _params(s).items()}
  state = state.replace(joint=state.joint.replace(params=as_jax(base.joint)),
                        solo=state.solo.replace(params=as_jax(base.solo)),
                        meta=state.meta.replace(params=as_jax(base.meta)))
  x = synthetic.sparse_activations(9 * CFG.batch_size, CFG.d_model, num_features=48, seed=3)
  step = jax.jit(ts.train_step)
  for i in range(9):  # three meta phases; latents go dead after 5 batches, so AuxK runs too
    batch = x[i * CFG.batch_size:(i + 1) * CFG.batch_size]
    base.step(batch)
    state, _ = step(state, jnp.asarray(batch))
  for name in ("joint", "solo", "meta"):
    ours, theirs = getattr(state, name), getattr(base, name)
    for key, t in _params(theirs).items():
      np.testing.assert_allclose(np.asarray(ours.params[key]), t.detach().numpy(), atol=2e-5, err_msg=f"{name} {key}")
    np.testing.assert_array_equal(np.asarray(ours.since_fired), theirs.since_fired.numpy(), err_msg=name)
  assert int((base.joint.since_fired >= CFG.dead_after_batches).sum()) > 0  # AuxK was exercised
  assert int(base.meta.since_fired.max()) > 0  # the penalty's forwards advanced the meta counter
