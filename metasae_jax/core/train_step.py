"""Train state and the pure joint step: primary (+ penalty), solo baseline, scheduled meta phase.

Legend: B = batch (tokens), D = d_model, N = primary latents, M = meta latents.
"""

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from metasae_jax.core import losses, meta, optimizer, sae
from metasae_jax.core.config import TrainConfig


@flax.struct.dataclass
class SAEState:
  """One SAE's trainable state: params, Adam state, batches since each latent last fired."""
  params: dict
  opt_state: tuple
  since_fired: jax.Array  # int32 [latents]


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; `config` is static (part of the tree structure)."""
  step: jax.Array
  rng: jax.Array
  joint: SAEState
  meta: SAEState
  solo: Optional[SAEState]
  config: TrainConfig = flax.struct.field(pytree_node=False)


def _tx(config: TrainConfig):
  return optimizer.adam(config.lr, config.b1, config.b2)


def _new_sae_state(rng, d_model, width, tx) -> SAEState:
  params = sae.init_params(rng, d_model, width)
  return SAEState(params, tx.init(params), jnp.zeros((width,), jnp.int32))


def init_train_state(config: TrainConfig, rng: Optional[jax.Array] = None) -> TrainState:
  """Fresh state. The solo SAE gets the joint primary's exact init (same seed), as the paper's baseline."""
  if rng is None:
    rng = jax.random.PRNGKey(config.seed)
  tx = _tx(config)
  rng, primary_rng, meta_rng = jax.random.split(rng, 3)
  joint = _new_sae_state(primary_rng, config.d_model, config.width, tx)
  solo = _new_sae_state(primary_rng, config.d_model, config.width, tx) if config.baseline else None
  meta_state = _new_sae_state(meta_rng, config.d_model, config.meta_width, tx)
  return TrainState(step=jnp.zeros((), jnp.int32), rng=rng, joint=joint, meta=meta_state, solo=solo,
                    config=config)


def _dead(s: SAEState, config: TrainConfig) -> jax.Array:
  return s.since_fired >= config.dead_after_batches


def _pmean(tree, axis_name):
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def _vary(tree, axis_name):
  """Marks replicated params as per-device before differentiating a per-device loss.

  Under `shard_map` (which tracks which values vary over the axis) the gradient
  of a per-device loss w.r.t. a replicated param is already summed over devices;
  made per-device first, it is the local gradient, which `_pmean` then averages
  exactly as under `pmap`.
  """
  if axis_name is None:
    return tree
  return jax.tree.map(lambda a: a if axis_name in getattr(jax.typeof(a), "vma", ())
                      else jax.lax.pcast(a, axis_name, to="varying"), tree)


def _sae_metrics(prefix: str, loss, stats: losses.SAELoss, since_fired, config) -> dict:
  return {f"{prefix}/loss": loss, f"{prefix}/mse": stats.mse, f"{prefix}/aux": stats.aux,
          f"{prefix}/fvu": stats.fvu, f"{prefix}/l0": stats.l0, f"{prefix}/spill_rows": stats.spill_rows,
          f"{prefix}/dense_fallback": stats.dense_fallback,
          f"{prefix}/dead_fraction": jnp.mean((since_fired >= config.dead_after_batches).astype(jnp.float32))}


def _primary_update(s: SAEState, x_BxD, config, meta_params, lambda2, axis_name):
  """One Adam step of a primary SAE; with lambda2 > 0 its loss includes the penalty.

  Also returns which meta latents fired in the penalty's forward (None without
  the penalty): the reference advances the meta SAE's dead counter there too.
  """

  def loss_fn(params):
    loss, stats = losses.sae_loss(params, x_BxD, s.since_fired, config.k, config.activation, config.aux_k,
                                  config.aux_coeff, dead_after_batches=config.dead_after_batches,
                                  auxk_detach=config.auxk_detach, compute_dtype=config.compute_dtype,
                                  axis_name=axis_name)
    if lambda2 is None:
      return loss, (loss, stats, jnp.zeros(()), jnp.zeros(()), None)
    pen, rec = meta.penalty(params["W_dec"], meta_params, config.meta_k, config.sigma_sq,
                            config.penalty_grad)
    return loss + lambda2 * pen, (loss, stats, pen, rec.mse, rec.fired_M)

  grads, (sae_part, stats, pen, meta_mse, meta_fired_M) = jax.grad(loss_fn, has_aux=True)(
      _vary(s.params, axis_name))
  grads = _pmean(grads, axis_name)
  params, opt_state = optimizer.apply(_tx(config), s.params, grads, s.opt_state)
  # The counter comes from the globally summed firing, so it is the same on every device.
  since = stats.since_fired_N
  if meta_fired_M is not None and axis_name is not None:
    # Every device ran the same penalty forward on the same W_dec; the psum only makes that
    # visible to shard_map, which otherwise treats the result as varying over the axis.
    meta_fired_M = jax.lax.psum(meta_fired_M.astype(jnp.int32), axis_name) > 0
  sae_part, stats, pen, meta_mse = _pmean(
      (sae_part, stats._replace(since_fired_N=jnp.zeros(())), pen, meta_mse), axis_name)
  return SAEState(params, opt_state, since), sae_part, stats, pen, meta_mse, meta_fired_M


def _meta_phase(m: SAEState, w_dec_NxD, config) -> SAEState:
  """n_meta_steps updates of the meta SAE on the current decoder rows (one batch of N rows)."""
  w_NxD = meta.meta_inputs(w_dec_NxD)
  tx = _tx(config)

  def body(_, m):
    grads, stats = jax.grad(meta.meta_loss, has_aux=True)(
        m.params, w_NxD, m.since_fired, config.meta_k, config.aux_k, config.aux_coeff,
        config.dead_after_batches, config.auxk_detach)
    params, opt_state = optimizer.apply(tx, m.params, grads, m.opt_state)
    return SAEState(params, opt_state, stats.since_fired_N)

  return jax.lax.fori_loop(0, config.n_meta_steps, body, m)


def train_step(state: TrainState, batch_BxD: jax.Array, axis_name: Optional[str] = None):
  """One joint step: primary with penalty, solo on the same batch, and the meta phase when due.

  Pure: returns (new_state, metrics). Under `jax.pmap`/`shard_map` pass the
  mapped axis as `axis_name`: each device holds its slice of the batch, the
  BatchTopK threshold comes from the global batch and gradients are averaged,
  so the result equals the single-device run on the whole batch.
  """
  config = state.config
  x_BxD = batch_BxD.astype(jnp.float32)
  use_meta = config.lambda2 > 0
  joint, joint_sae, joint_stats, pen, meta_mse, meta_fired_M = _primary_update(
      state.joint, x_BxD, config, state.meta.params, config.lambda2 if use_meta else None, axis_name)
  metrics = {"loss": joint_sae + config.lambda2 * pen, "penalty": pen, "meta_mse": meta_mse}
  metrics.update(_sae_metrics("joint", joint_sae, joint_stats, joint.since_fired, config))
  solo = state.solo
  if solo is not None:
    solo, solo_loss, solo_stats, _, _, _ = _primary_update(solo, x_BxD, config, None, None, axis_name)
    metrics.update(_sae_metrics("solo", solo_loss, solo_stats, solo.since_fired, config))
  meta_state = state.meta
  if use_meta:
    # The penalty's meta forward counts as a batch for the meta SAE's dead counter (the reference's rule).
    meta_state = meta_state.replace(since_fired=losses.update_since_fired(meta_state.since_fired, meta_fired_M))
  if use_meta and config.n_meta_steps > 0:
    # The meta SAE trains on W_dec after every n_primary_steps-th primary update.
    due = (state.step + 1) % config.n_primary_steps == 0
    meta_state = jax.lax.cond(due, lambda m: _meta_phase(m, joint.params["W_dec"], config),
                              lambda m: m, meta_state)
  metrics["meta_dead_fraction"] = jnp.mean(_dead(meta_state, config).astype(jnp.float32))
  rng, _ = jax.random.split(state.rng)
  new_state = state.replace(step=state.step + 1, rng=rng, joint=joint, solo=solo, meta=meta_state)
  return new_state, metrics
