"""Which device each benchmarked implementation runs on (`experiments.benchmark --device`), said in every line.

JAX (the fast and naive steps) runs on its default backend unless told `cpu`; the PyTorch baseline runs
on CUDA when torch has it (`auto`), so on a GPU host both sides share the GPU and the ratio compares like
with like. `cpu` puts both on the CPU; `cuda` demands the GPU for both and refuses a host without one.
"""

from typing import Optional

from metasae_jax.core.errors import UserError

CHOICES = ("auto", "cpu", "cuda")
JAX_IMPLS = ("fast", "naive")


def resolve(choice: str, jax_backend: str, torch_cuda: bool) -> dict:
  """{"jax": backend, "torch": "cpu" | "cuda"} for `--device choice`, given JAX's default backend (as
  `jax.default_backend()` names it: cpu, gpu, tpu) and whether torch sees CUDA; UserError if it cannot be met."""
  if choice not in CHOICES:
    raise UserError(f"--device must be one of {', '.join(CHOICES)}, got {choice!r}.")
  if choice == "cpu":
    return {"jax": "cpu", "torch": "cpu"}
  if choice == "auto":
    return {"jax": jax_backend, "torch": "cuda" if torch_cuda else "cpu"}
  missing = []
  if jax_backend != "gpu":
    missing.append(f"JAX's backend is {jax_backend}, not gpu (install jax[cuda12], BUILD.md)")
  if not torch_cuda:
    missing.append("torch.cuda.is_available() is False (install a CUDA build of torch, BUILD.md)")
  if missing:
    raise UserError(f"--device cuda: {'; '.join(missing)}. Pass --device auto to run where each can.")
  return {"jax": "gpu", "torch": "cuda"}


def kind(device: str) -> str:
  """The hardware kind of a device name from either side: "cuda..." and "gpu..." are both gpu."""
  head = device.split(":")[0].split()[0]
  return "gpu" if head in ("cuda", "gpu") else head


def comparison(devices: dict) -> dict:
  """Fields for a ratio line: which device each implementation ran on and whether they were the same kind."""
  kinds = {kind(d) for d in devices.values()}
  out = {"devices": dict(devices), "same_device_kind": len(kinds) == 1}
  if len(kinds) > 1:
    out["note"] = ("the implementations ran on different kinds of device, so the ratio mixes hardware with "
                   "implementation; pass --device cpu or (on a GPU host with CUDA builds of both) --device cuda")
  return out


def jax_device_name() -> str:
  """What a line says JAX ran on: "cpu:0 cpu", "gpu:0 NVIDIA H100 80GB HBM3", ... (its first device)."""
  import jax  # pylint: disable=g-import-not-at-top
  d = jax.devices()[0]
  return f"{d.platform}:{d.id} {d.device_kind}"


def impl_device(impl: str, jax_device: str, torch_device: Optional[str]) -> str:
  """The device name a line reports for `impl`."""
  return jax_device if impl in JAX_IMPLS else str(torch_device)
