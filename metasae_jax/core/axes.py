"""Mesh axes a per-device computation runs under: which split the rows of a batch, which split the latents.

Legend: B = rows on this device, N = latents on this device.
A primary SAE splits its tokens over the data axis and its latents (W_enc's
columns, W_dec's rows) over the model axis; the meta SAE, whose batch is the
primary's decoder rows, splits those rows over both and keeps its own latents
whole. No axes: one device holds everything (plain jit). Every collective in
the step goes through here, so what crosses devices is explicit: scalar and
per-row counts, per-latent vectors, [B, D] partial sums over the latent axis,
and gradients.
"""

from typing import NamedTuple, Optional, Union

import jax


def varying_axes(x) -> frozenset:
  """The mesh axes shard_map tracks `x` as varying over (empty outside shard_map and under pmap)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)  # jax 0.10 keeps it here; earlier releases as `aval.vma`
  return frozenset(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())


def sum_like(grad: jax.Array, primal: jax.Array) -> jax.Array:
  """A custom rule's gradient summed over the mesh axes it varies over but its primal does not.

  That is what shard_map's own transpose of an implicit broadcast does (e.g.
  b_dec, replicated over the latent axis, meeting W_enc's latent shard: its
  gradient is the sum of every shard's part); custom VJP rules must do it
  themselves.
  """
  extra = tuple(sorted(varying_axes(grad) - varying_axes(primal)))
  return jax.lax.psum(grad, extra) if extra else grad


class Axes(NamedTuple):
  """`batch`: axes the rows are split over; `latent`: the axis the latents are split over (or None)."""
  batch: tuple = ()
  latent: Optional[str] = None

  @classmethod
  def of(cls, axes: Union[None, str, tuple, "Axes"]) -> "Axes":
    """None (one device), an axis name (rows split over it, as under pmap), a tuple of names, or Axes."""
    if axes is None:
      return cls()
    if isinstance(axes, Axes):
      return axes
    if isinstance(axes, str):
      return cls((axes,))
    return cls(tuple(axes))

  @property
  def all(self) -> tuple:
    return self.batch + ((self.latent,) if self.latent else ())

  def psum_batch(self, x):
    """Sum over the devices holding other rows (per-latent counts, statistics of the whole batch)."""
    return jax.lax.psum(x, self.batch) if self.batch else x

  def psum_latent(self, x):
    """Sum over the devices holding other latents (partial decodes, per-row counts)."""
    return jax.lax.psum(x, self.latent) if self.latent else x

  def psum_all(self, x):
    """Sum over every device (counts over the whole B x N matrix)."""
    return jax.lax.psum(x, self.all) if self.all else x

  def pmax_all(self, x):
    return jax.lax.pmax(x, self.all) if self.all else x

  def batch_shards(self) -> int:
    """How many devices split the rows (static)."""
    out = 1
    for name in self.batch:
      out *= jax.lax.axis_size(name)
    return out

  def latent_shards(self) -> int:
    return jax.lax.axis_size(self.latent) if self.latent else 1

  def batch_index(self):
    """This device's position among the row shards (row-major over `batch`), a traced int32."""
    index = 0
    for name in self.batch:
      index = index * jax.lax.axis_size(name) + jax.lax.axis_index(name)
    return index

  def vary(self, tree, over: Optional[tuple] = None):
    """Marks values as per-device over `over` (default: every axis) before differentiating a per-device loss.

    Under `shard_map` (which tracks what varies over which axis) the gradient of
    a per-device loss with respect to a value replicated over an axis comes back
    already summed over it; made per-device first, it is the local gradient,
    which the caller then sums explicitly, as under `pmap`.
    """
    over = self.all if over is None else over
    if not over:
      return tree

    def cast(a):
      missing = tuple(n for n in over if n not in varying_axes(a))
      return jax.lax.pcast(a, missing, to="varying") if missing else a

    return jax.tree.map(cast, tree)
