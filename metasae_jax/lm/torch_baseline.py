"""The straightforward PyTorch joint + solo step, as the paper's public code does it (benchmark baseline).

Legend: B = batch, D = d_model, N = primary latents, M = meta latents.
Dense encoder and decoder, `torch.topk` over the flattened B·N pre-activations,
AuxK on the dead latents' columns, the meta SAE on all N decoder rows, Adam
with the decoder's radial gradient removed and rows renormalised. It lives in
`lm/` only because this is the layer allowed to import torch; nothing trains
with it, the benchmark times it against `core.train_step`. It runs on the CPU or, given
`device="cuda"`, on the GPU (same init: drawn on the CPU, then moved).
"""

import dataclasses
import time

import numpy as np
import torch

from metasae_jax.core.config import TrainConfig


@dataclasses.dataclass
class _SAE:
  """Parameters, Adam and the dead counter of one SAE (the reference's init)."""
  w_enc: torch.Tensor
  b_enc: torch.Tensor
  w_dec: torch.Tensor
  b_dec: torch.Tensor
  opt: torch.optim.Adam
  since_fired: torch.Tensor

  @classmethod
  def create(cls, d: int, n: int, config: TrainConfig, gen: torch.Generator, device: str = "cpu") -> "_SAE":
    bound = (6.0 / n) ** 0.5
    w_enc = (torch.rand(d, n, generator=gen) * 2 - 1) * bound
    w_dec = w_enc.T.clone()
    w_dec /= w_dec.norm(dim=-1, keepdim=True)
    return cls.from_params(w_enc, torch.zeros(n), w_dec, torch.zeros(d), config, device)

  @classmethod
  def from_params(cls, w_enc, b_enc, w_dec, b_dec, config: TrainConfig, device: str = "cpu") -> "_SAE":
    """A fresh SAE (own copies on `device`, new Adam, counter 0) starting from the given parameters."""
    params = [t.detach().clone().to(device).requires_grad_() for t in (w_enc, b_enc, w_dec, b_dec)]
    opt = torch.optim.Adam(params, lr=config.lr, betas=(config.b1, config.b2))
    return cls(*params, opt, torch.zeros(w_enc.shape[1], dtype=torch.long, device=device))


def _standardize(x_BxD):
  mean = x_BxD.mean(-1, keepdim=True)
  return (x_BxD - mean) / (x_BxD.std(-1, keepdim=True) + 1e-5)


def _batchtopk(acts_BxN, k):
  flat = acts_BxN.flatten()
  vals, idx = torch.topk(flat, k * acts_BxN.shape[0], sorted=False)
  return torch.zeros_like(flat).scatter(-1, idx, vals).view_as(acts_BxN)


def _sae_loss(s: _SAE, xs_BxD, k, config: TrainConfig):
  """MSE + AuxK of one SAE on standardised inputs; updates its dead counter."""
  acts = torch.relu((xs_BxD - s.b_dec) @ s.w_enc + s.b_enc)
  acts_topk = _batchtopk(acts, k)
  recon = acts_topk @ s.w_dec + s.b_dec
  mse = (recon - xs_BxD).pow(2).mean()
  with torch.no_grad():
    fired = (acts_topk > 0).any(0)
    s.since_fired = torch.where(fired, 0, s.since_fired + 1)
  dead = s.since_fired >= config.dead_after_batches
  aux = torch.zeros((), device=xs_BxD.device)
  if dead.any():
    residual = xs_BxD - recon
    dead_acts = acts[:, dead]
    vals, idx = torch.topk(dead_acts, min(config.aux_k, int(dead.sum())), dim=-1)
    aux_acts = torch.zeros_like(dead_acts).scatter(-1, idx, vals)
    aux = (aux_acts @ s.w_dec[dead] - residual).pow(2).mean()
  return mse + config.aux_coeff * aux, mse


def _update(s: _SAE, loss):
  s.opt.zero_grad(set_to_none=True)
  loss.backward()
  with torch.no_grad():
    w_unit = s.w_dec / s.w_dec.norm(dim=-1, keepdim=True)
    s.w_dec.grad -= (s.w_dec.grad * w_unit).sum(-1, keepdim=True) * w_unit
    s.b_enc.grad.zero_()
  s.opt.step()
  with torch.no_grad():
    s.w_dec /= s.w_dec.norm(dim=-1, keepdim=True)


def cuda_available() -> bool:
  return torch.cuda.is_available()


def device_name(device: str) -> str:
  """What a line says this baseline ran on: "cpu", or "cuda:0 <GPU name>"."""
  if device == "cuda":
    return f"cuda:{torch.cuda.current_device()} {torch.cuda.get_device_name()}"
  return device


def synchronize(device: str) -> None:
  """Waits for the device's queued work (CUDA runs asynchronously; a clock read needs the work done)."""
  if device == "cuda":
    torch.cuda.synchronize()


class Baseline:
  """Joint primary (+ penalty), solo SAE and meta SAE, stepped the straightforward way on `device`."""

  def __init__(self, config: TrainConfig, threads: int = 0, device: str = "cpu"):
    if threads:
      torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(config.seed)
    self.config, self.device = config, device
    self.joint = _SAE.create(config.d_model, config.width, config, gen, device)
    # The solo baseline starts from the joint primary's exact init (the reference's and core.train_step's rule).
    j = self.joint
    self.solo = _SAE.from_params(j.w_enc, j.b_enc, j.w_dec, j.b_dec, config, device) if config.baseline else None
    self.meta = _SAE.create(config.d_model, config.meta_width, config, gen, device)
    self.step_count = 0

  def step(self, batch_BxD) -> None:
    """One joint (+ solo) step, and the meta phase every n_primary_steps (batch: host array or device tensor)."""
    c = self.config
    if isinstance(batch_BxD, torch.Tensor):
      x = batch_BxD.to(self.device, torch.float32)
    else:
      x = torch.from_numpy(np.asarray(batch_BxD, np.float32)).to(self.device)
    xs = _standardize(x)
    loss, _ = _sae_loss(self.joint, xs, c.k, c)
    if c.lambda2 > 0:
      with torch.no_grad():  # the meta SAE is frozen and ŵ a constant ("stop")
        w = self.joint.w_dec / self.joint.w_dec.norm(dim=-1, keepdim=True)
        ws = _standardize(w)
        m = self.meta
        acts = _batchtopk(torch.relu((ws - m.b_dec) @ m.w_enc + m.b_enc), c.meta_k)
        rec = (acts @ m.w_dec + m.b_dec) * w.std(-1, keepdim=True) + w.mean(-1, keepdim=True)
        # The penalty's forward counts as a batch for the meta SAE's dead counter (the reference's rule).
        m.since_fired = torch.where((acts > 0).any(0), 0, m.since_fired + 1)
      pen = torch.exp(-(self.joint.w_dec - rec).pow(2).sum(-1) / c.sigma_sq).mean()
      loss = loss + c.lambda2 * pen
    _update(self.joint, loss)
    if self.solo is not None:
      _update(self.solo, _sae_loss(self.solo, xs, c.k, c)[0])
    self.step_count += 1
    if c.lambda2 > 0 and c.n_meta_steps > 0 and self.step_count % c.n_primary_steps == 0:
      with torch.no_grad():
        w = self.joint.w_dec / self.joint.w_dec.norm(dim=-1, keepdim=True)
        ws = _standardize(w)
      for _ in range(c.n_meta_steps):
        _update(self.meta, _sae_loss(self.meta, ws, c.meta_k, c)[0])


def time_steps(config: TrainConfig, batches, warmup: int, steps: int, threads: int = 0, device: str = "cpu") -> list:
  """Seconds of each of `steps` baseline steps after `warmup` steps (batches cycled).

  On CUDA the batches are copied to the GPU before timing (as the JAX side's are) and every step ends
  with a synchronize, so a step's time is its GPU work, not its launch.
  """
  base = Baseline(config, threads, device)
  if device != "cpu":
    batches = [torch.from_numpy(np.asarray(b)).to(device) for b in batches]
  for i in range(warmup):
    base.step(batches[i % len(batches)])
  synchronize(device)
  times = []
  for i in range(warmup, warmup + steps):
    t0 = time.perf_counter()
    base.step(batches[i % len(batches)])
    synchronize(device)
    times.append(time.perf_counter() - t0)
  return times
