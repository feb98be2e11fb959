"""Greedy chat answers from an in-process causal LM, with the log-probabilities of the first answer token.

Legend: V = vocabulary.
"""

from typing import Optional, Sequence

import numpy as np
import torch


def _logaddexp(a: Optional[float], b: float) -> float:
  return b if a is None else float(np.logaddexp(a, b))


def prompt_ids(tokenizer, messages: list) -> dict:
  """The tokenised prompt: the chat template when the model has one, else a plain transcript."""
  if getattr(tokenizer, "chat_template", None):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  else:  # base models without a template
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
  return tokenizer(text, return_tensors="pt", add_special_tokens=False)


def choice_logprobs(tokenizer, logp_V: torch.Tensor, choices: Sequence[str]) -> dict:
  """logprob of each choice that is a single token (with or without a leading space / capital)."""
  out = {}
  for c in choices:
    lp = None
    token_ids = set()
    for variant in (c, " " + c, c.capitalize(), " " + c.capitalize()):
      piece = tokenizer.encode(variant, add_special_tokens=False)
      if len(piece) == 1:
        token_ids.add(piece[0])
    for i in token_ids:
      lp = _logaddexp(lp, float(logp_V[i]))
    if lp is not None:
      out[c] = lp
  return out


def complete(lm, messages: list, max_tokens: int, choices: Sequence[str] = (),
             top_n: int = 20) -> tuple[str, dict, dict]:
  """(greedy text, first token's top_n alternatives {piece: logprob}, {choice: logprob}) of a `LoadedModel`."""
  tok = lm.tokenizer
  enc = prompt_ids(tok, messages)
  pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  with torch.inference_mode():
    first_V = lm.model(**enc, use_cache=False).logits[0, -1].float()
  logp_V = torch.log_softmax(first_V, dim=-1)
  choice_lp = choice_logprobs(tok, logp_V, choices)
  if choices and choice_lp:
    # The answer is read from the choice logprobs; the greedy first token is text enough.
    text = tok.decode([int(torch.argmax(first_V))], skip_special_tokens=True)
  else:
    with torch.inference_mode():
      out = lm.model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                              max_new_tokens=max_tokens, do_sample=False, pad_token_id=pad,
                              temperature=None, top_p=None, top_k=None)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
  values, ids = torch.topk(logp_V, min(top_n, logp_V.shape[0]))
  top: dict = {}
  for v, i in zip(values.tolist(), ids.tolist()):
    key = tok.decode([i])
    top[key] = _logaddexp(top.get(key), v)
  return text, top, choice_lp
