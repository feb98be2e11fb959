"""CE-loss overhead of splicing an SAE into its model: clean, spliced and zero-ablation CE, ΔCE %, CE recovered.

Legend: B = contexts in a batch, L = context_len, D = d_model, V = vocabulary, M = spliced tokens.
The SAE replaces the residual at its site (`resid_pre`: a forward pre-hook on the block; `resid_post`:
a forward hook) at every position except the skipped attention-sink ones (t < s). CE is the mean
next-token loss of the predictions made at positions max(s, 1)..L−2 (0..L−2 with
`include_first_position`, as the reference scores). Every context contributes the same number of
predictions, so the CE is also the mean of per-context CEs, and the standard error of ΔCE is taken
over contexts (docs/method.md §2.2: a 0.6 pp joint−solo gap needs thousands of contexts to resolve).
"""

from typing import Callable, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from metasae_jax.core.errors import UserError
from metasae_jax.storage import positions
from metasae_jax.storage.store_types import Store

SITES = ("resid_pre", "resid_post")

# Maps the residual at the spliced positions (numpy [M, D]) to its replacement.
ReplaceFn = Callable[[np.ndarray], np.ndarray]


def iter_contexts(store: Store, num_contexts: int, batch_contexts: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Whole contexts from the store start: (token ids [B, L] int64, stored activations [B, L, D] float32)."""
  if not store.has_tokens:
    raise UserError(f"activation store {store.path} has no tokens; ΔCE needs a store exported from text.")
  if store.context_len < 2:
    raise UserError(f"activation store {store.path} has context_len {store.context_len}; ΔCE needs contexts.")
  length, left = store.context_len, num_contexts
  for seg_start, seg_stop in zip(store.segment_offsets[:-1], store.segment_offsets[1:]):
    whole = int(seg_stop - seg_start) // length  # contexts restart in every segment (format-1 shard)
    for c in range(0, whole, batch_contexts):
      take = min(batch_contexts, whole - c, left)
      if take <= 0:
        return
      a, b = int(seg_start) + c * length, int(seg_start) + (c + take) * length
      ids = np.asarray(store.read_tokens(a, b), np.int64).reshape(take, length)
      acts = store.read_acts(a, b).reshape(take, length, -1)
      left -= take
      yield ids, acts


def register_residual_edit(block: torch.nn.Module, site: str, edit: Callable[[torch.Tensor], torch.Tensor]):
  """Hooks `block` so the residual at `site` goes through `edit`."""
  if site == "resid_pre":
    def pre_hook(_, args, kwargs):
      if args:
        return (edit(args[0]),) + tuple(args[1:]), kwargs
      return args, dict(kwargs, hidden_states=edit(kwargs["hidden_states"]))
    return block.register_forward_pre_hook(pre_hook, with_kwargs=True)
  if site == "resid_post":
    def post_hook(_, __, output):
      if isinstance(output, torch.Tensor):
        return edit(output)
      return (edit(output[0]),) + tuple(output[1:])
    return block.register_forward_hook(post_hook)
  raise UserError(f"site {site!r} is not one of {SITES}; the SAE's cfg.json source.site must name one.")


def score_start(context_len: int, skip_first_positions: int, include_first_position: bool) -> int:
  """First position whose next-token prediction is scored."""
  start = 0 if include_first_position else max(positions.effective_skip(context_len, skip_first_positions), 1)
  return min(start, context_len - 2)


def _nll(model: torch.nn.Module, ids_BxL: torch.Tensor, start: int) -> np.ndarray:
  """Summed next-token NLL per context [B] over predictions from position `start`."""
  logits = model(input_ids=ids_BxL, use_cache=False).logits
  logp = torch.log_softmax(logits[:, start:-1].float(), dim=-1)
  target = ids_BxL[:, start + 1:]
  nll = -torch.gather(logp, -1, target[..., None])[..., 0]
  return nll.sum(1).double().numpy()


def cross_entropies(model: torch.nn.Module, block: torch.nn.Module, site: str, store: Store,
                    replacements: dict, num_contexts: int, batch_contexts: int = 8,
                    skip_first_positions: int = 1, progress: bool = True,
                    include_first_position: bool = False) -> dict:
  """Mean CE clean, under zero-ablation and under each named replacement (name -> ReplaceFn).

  Also `per_context`: name -> mean NLL of each context [C], for standard errors.
  """
  skip = positions.effective_skip(store.context_len, skip_first_positions)
  start = score_start(store.context_len, skip_first_positions, include_first_position)
  names = ["clean", "zero_ablation"] + list(replacements)
  per_context = {name: [] for name in names}
  count = 0
  check_num, check_den = 0.0, 0.0
  for ids, stored_BxLxD in tqdm(list(iter_contexts(store, num_contexts, batch_contexts)), desc="delta-CE",
                                disable=not progress):
    ids_t = torch.from_numpy(ids)
    for name in names:
      captured: list = []

      def edit(resid, name=name, captured=captured):
        if name == "clean":
          captured.append(resid.detach()[:, skip:].float().cpu().numpy())
          return resid
        out = resid.clone()
        if name == "zero_ablation":
          out[:, skip:] = 0
          return out
        b, length, d = resid.shape
        x_MxD = resid[:, skip:].detach().float().cpu().numpy().reshape(-1, d)
        recon = np.array(replacements[name](x_MxD), np.float32).reshape(b, length - skip, d)
        out[:, skip:] = torch.from_numpy(recon).to(resid.dtype)
        return out

      handle = register_residual_edit(block, site, edit)
      try:
        with torch.inference_mode():
          nll_B = _nll(model, ids_t, start)
      finally:
        handle.remove()
      per_context[name].append(nll_B / (ids.shape[1] - 1 - start))
      if name == "clean":
        count += len(nll_B) * (ids.shape[1] - 1 - start)
        live = captured[0]
        check_num += float(np.square(live - stored_BxLxD[:, skip:]).sum())
        check_den += float(np.square(stored_BxLxD[:, skip:]).sum())
  if count == 0:
    raise UserError(f"activation store {store.path} has no whole context for ΔCE.")
  out = {name: float(np.mean(np.concatenate(per_context[name]))) for name in names}
  out["per_context"] = {name: np.concatenate(per_context[name]) for name in names}
  out["num_predictions"] = count
  out["num_contexts"] = len(out["per_context"]["clean"])
  # The live residual should equal the stored one; if not, the store is from another model or layer.
  out["resid_check_rel_err"] = float(np.sqrt(check_num / max(check_den, 1e-30)))
  return out


def _se_pct(diff_C: np.ndarray, clean: float) -> float:
  """Standard error over contexts of mean(diff) as a percentage of the clean CE (held fixed)."""
  if len(diff_C) < 2:
    return float("nan")
  return float(np.std(diff_C, ddof=1) / np.sqrt(len(diff_C)) / clean * 100.0)


def summarize(ces: dict, name: str) -> dict:
  """ΔCE % (with its standard error over contexts) and CE recovered of one replacement."""
  clean, zero, spliced = ces["clean"], ces["zero_ablation"], ces[name]
  per = ces["per_context"]
  return {"ce_clean": clean, "ce_spliced": spliced, "ce_zero_ablation": zero,
          "delta_ce_pct": (spliced - clean) / clean * 100.0,
          "delta_ce_pct_se": _se_pct(per[name] - per["clean"], clean),
          "ce_recovered": (zero - spliced) / (zero - clean) if zero != clean else float("nan")}


def paired_difference(ces: dict, a: str, b: str) -> dict:
  """ΔCE(a) − ΔCE(b) in percentage points and its paired standard error over contexts."""
  per = ces["per_context"]
  return {"delta_ce_pp": (ces[a] - ces[b]) / ces["clean"] * 100.0,
          "delta_ce_pp_se": _se_pct(per[a] - per[b], ces["clean"])}


def positions_rule(context_len: int, skip_first_positions: int, include_first_position: bool = False) -> str:
  s = positions.effective_skip(context_len, skip_first_positions)
  start = score_start(context_len, skip_first_positions, include_first_position)
  return (f"spliced at positions {s}..{context_len - 1}; CE over next-token predictions from positions "
          f"{start}..{context_len - 2}")


def block_for(layers: list, layer: Optional[int]) -> torch.nn.Module:
  if layer is None or not 0 <= int(layer) < len(layers):
    raise UserError(f"SAE source layer {layer!r} is not a block of the model ({len(layers)} blocks); "
                    "check cfg.json source.layer and --model.")
  return layers[int(layer)]
