"""Train state and the pure joint step: primary (+ penalty), solo baseline, scheduled meta phase.

Legend: B = batch (tokens), D = d_model, N = primary latents, M = meta latents.
"""

import functools
from typing import NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp

from metasae_jax.core import architectures, losses, meta, optimizer
from metasae_jax.core.architectures import base
from metasae_jax.core.axes import Axes
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


def _new_sae_state(rng, d_model, width, tx, architecture: str = "batchtopk", options=None) -> SAEState:
  params = architectures.get(architecture).init_params(rng, d_model, width, options or base.Options())
  return SAEState(params, tx.init(params), jnp.zeros((width,), jnp.int32))


def init_train_state(config: TrainConfig, rng: Optional[jax.Array] = None) -> TrainState:
  """Fresh state. The solo SAE gets the joint primary's exact init (same seed), as the paper's baseline."""
  if rng is None:
    rng = jax.random.PRNGKey(config.seed)
  tx = _tx(config)
  rng, primary_rng, meta_rng = jax.random.split(rng, 3)
  primary = functools.partial(_new_sae_state, primary_rng, config.d_model, config.width, tx, config.architecture,
                              base.Options.of(config))
  joint = primary()
  solo = primary() if config.baseline else None
  meta_state = _new_sae_state(meta_rng, config.d_model, config.meta_width, tx)
  return TrainState(step=jnp.zeros((), jnp.int32), rng=rng, joint=joint, meta=meta_state, solo=solo,
                    config=config)


def _dead(s: SAEState, config: TrainConfig) -> jax.Array:
  return s.since_fired >= config.dead_after_batches


class Plan(NamedTuple):
  """How a step computes on the platform it is lowered for (`TrainConfig.resolved`)."""
  path: str  # "slots" | "dense"
  dtype: str  # "float32" | "bfloat16"


def _sae_metrics(prefix: str, loss, stats: losses.SAELoss, since_fired, config, axes: Axes) -> dict:
  dead = axes.psum_latent(jnp.sum(since_fired >= config.dead_after_batches, dtype=jnp.int32))
  return {**{f"{prefix}/{name}": v for name, v in stats.terms.items()},
          f"{prefix}/loss": loss, f"{prefix}/mse": stats.mse, f"{prefix}/aux": stats.aux,
          f"{prefix}/fvu": stats.fvu, f"{prefix}/l0": stats.l0, f"{prefix}/spill_rows": stats.spill_rows,
          f"{prefix}/dense_fallback": stats.dense_fallback,
          f"{prefix}/dead_fraction": dead.astype(jnp.float32) / (since_fired.shape[0] * axes.latent_shards())}


def _pmean_batch(tree, axes: Axes):
  return jax.lax.pmean(tree, axes.batch) if axes.batch else tree


def _primary_update(s: SAEState, x_BxD, config, meta_params, lambda2, axes: Axes, plan: Plan):
  """One Adam step of a primary SAE; with lambda2 > 0 its loss includes the penalty.

  Each device differentiates its share of the global objective: its rows' SAE
  loss over the number of row shards, plus λ₂/N times the penalty summed over
  its share of the decoder rows; the gradients summed over the batch axes are
  the global objective's (latent-sharded parameters need no sum over the
  latent axis; b_dec's encoder part is summed there by shard_map's own
  transpose rules). Also returns which meta latents fired in the penalty's
  forward (None without the penalty): the reference advances the meta SAE's
  dead counter there too.
  """
  width = s.params["W_dec"].shape[0] * axes.latent_shards()

  def loss_fn(params):
    loss, stats = losses.sae_loss(params, x_BxD, s.since_fired, config.k, config.architecture, config.aux_k,
                                  config.aux_coeff, options=base.Options.of(config),
                                  dead_after_batches=config.dead_after_batches,
                                  auxk_detach=config.auxk_detach, compute_dtype=plan.dtype, axis_name=axes,
                                  path=plan.path)
    share = loss / axes.batch_shards()
    if lambda2 is None:
      return share, (loss, stats, jnp.zeros_like(loss), jnp.zeros(()), None)
    pen_sum, rec = meta.penalty_sum(params["W_dec"], meta_params, config.meta_k, config.sigma_sq,
                                    config.penalty_grad, axes, plan.path, plan.dtype)
    return share + lambda2 * pen_sum / width, (loss, stats, pen_sum / width, rec.mse, rec.fired_M)

  grads, (sae_part, stats, pen, meta_mse, meta_fired_M) = jax.grad(loss_fn, has_aux=True)(
      axes.vary(s.params, axes.batch))
  if axes.batch:
    grads = jax.lax.psum(grads, axes.batch)
  params, opt_state = optimizer.apply(_tx(config), s.params, grads, s.opt_state,
                                      train_b_enc=architectures.get(config.architecture).trains_b_enc)
  # The counter comes from the globally summed firing, so it is the same on every device of a latent shard.
  since = stats.since_fired_N
  sae_part, stats = _pmean_batch((sae_part, stats._replace(since_fired_N=jnp.zeros(()))), axes)
  if axes.batch:
    pen = jax.lax.psum(pen, axes.batch)  # each device's share of the rows: the sum is the mean over all
  return SAEState(params, opt_state, since), sae_part, stats, pen, meta_mse, meta_fired_M


def _meta_phase(m: SAEState, w_dec_NxD, config, axes: Axes, plan: Plan) -> SAEState:
  """n_meta_steps updates of the meta SAE on the current decoder rows (one batch of N rows, split over
  every device)."""
  rows = meta.row_axes(axes)
  w_RxD = meta.local_rows(meta.meta_inputs(w_dec_NxD), axes)
  tx = _tx(config)

  def body(_, m):
    grads, stats = jax.grad(meta.meta_loss, has_aux=True)(
        rows.vary(m.params), w_RxD, m.since_fired, config.meta_k, config.aux_k, config.aux_coeff,
        config.dead_after_batches, config.auxk_detach, rows, plan.path, plan.dtype)
    if rows.batch:
      grads = jax.lax.pmean(grads, rows.batch)  # every device has an equal share of the rows
    params, opt_state = optimizer.apply(tx, m.params, grads, m.opt_state)
    return SAEState(params, opt_state, stats.since_fired_N)

  return jax.lax.fori_loop(0, config.n_meta_steps, body, m)


def train_step(state: TrainState, batch_BxD: jax.Array, axis_name=None, model_axis: Optional[str] = None):
  """One joint step: primary with penalty, solo on the same batch, and the meta phase when due.

  Pure: returns (new_state, metrics). Written per device: under `jax.shard_map`
  (or `jax.pmap`) pass the axis that splits the batch as `axis_name` (a name or
  a tuple of names) and, on a 2-D mesh, the axis that splits the primary's
  latents as `model_axis` (W_enc's columns, b_enc, W_dec's rows, their Adam
  moments and the dead counters are then this device's shard). Thresholds come
  from counts summed over devices, gradients are summed over the batch axes,
  and the meta SAE's work is split over every device, so the result equals the
  single-device run on the whole batch. The algorithm and compute dtype follow
  `config.resolved(platform)` for the platform the step is lowered for.
  """
  config = state.config
  batch = () if axis_name is None else ((axis_name,) if isinstance(axis_name, str) else tuple(axis_name))
  axes = Axes(batch, model_axis)
  cpu, other = Plan(*config.resolved("cpu")), Plan(*config.resolved("tpu"))
  if cpu == other:
    return _train_step(state, batch_BxD, axes, cpu)
  return jax.lax.platform_dependent(state, batch_BxD, cpu=functools.partial(_train_step, axes=axes, plan=cpu),
                                    default=functools.partial(_train_step, axes=axes, plan=other))


def _train_step(state: TrainState, batch_BxD: jax.Array, axes: Axes, plan: Plan):
  config = state.config
  x_BxD = batch_BxD.astype(jnp.float32)
  use_meta = config.lambda2 > 0
  joint, joint_sae, joint_stats, pen, meta_mse, meta_fired_M = _primary_update(
      state.joint, x_BxD, config, state.meta.params, config.lambda2 if use_meta else None, axes, plan)
  metrics = {"loss": joint_sae + config.lambda2 * pen, "penalty": pen, "meta_mse": meta_mse}
  metrics.update(_sae_metrics("joint", joint_sae, joint_stats, joint.since_fired, config, axes))
  solo = state.solo
  if solo is not None:
    solo, solo_loss, solo_stats, _, _, _ = _primary_update(solo, x_BxD, config, None, None, axes, plan)
    metrics.update(_sae_metrics("solo", solo_loss, solo_stats, solo.since_fired, config, axes))
  meta_state = state.meta
  if use_meta:
    # The penalty's meta forward counts as a batch for the meta SAE's dead counter (the reference's rule).
    meta_state = meta_state.replace(since_fired=losses.update_since_fired(meta_state.since_fired, meta_fired_M))
  if use_meta and config.n_meta_steps > 0:
    # The meta SAE trains on W_dec after every n_primary_steps-th primary update.
    due = (state.step + 1) % config.n_primary_steps == 0
    meta_state = jax.lax.cond(due, lambda m: _meta_phase(m, joint.params["W_dec"], config, axes, plan),
                              lambda m: m, meta_state)
  metrics["meta_dead_fraction"] = jnp.mean(_dead(meta_state, config).astype(jnp.float32))
  rng, _ = jax.random.split(state.rng)
  new_state = state.replace(step=state.step + 1, rng=rng, joint=joint, solo=solo, meta=meta_state)
  return new_state, metrics
