"""Answers a list of LLM requests with N worker threads, in input order, behind the cache, with one progress bar."""

import concurrent.futures
import dataclasses
from typing import Optional, Sequence

from absl import logging as log

from metasae_jax.autointerp.backends import BackendError, Completion
from metasae_jax.autointerp.cache import CachedBackend


@dataclasses.dataclass(frozen=True)
class Request:
  """One chat request; equal requests get one answer (and one cache entry)."""
  messages: list
  max_tokens: int
  choices: tuple = ()


def run_requests(llm: CachedBackend, requests: Sequence[Request], concurrency: int, bar=None) -> list:
  """Completion (or None where the request failed after the backend's retries) for each request, in order.

  Cached answers and duplicates of an earlier request in the list are not sent; the
  rest go to `concurrency` threads. Results do not depend on the order answers
  arrive in: each one lands in its request's slot. On an interrupt (Ctrl-C, a
  UserError) requests not yet started are dropped and the ones in flight finish
  first, so their answers reach the cache and a rerun resumes without repeating them.
  """
  keys = [llm.key(r.messages, r.max_tokens, r.choices) for r in requests]
  answers: dict = {}
  todo: dict = {}
  for key, req in zip(keys, requests):
    if key in answers or key in todo:
      llm.count_hit()  # asked once per run, like a cache hit
      _tick(bar)
      continue
    cached = llm.lookup(key)
    if cached is not None:
      answers[key] = cached
      _tick(bar)
    else:
      todo[key] = req
  if todo:
    with concurrent.futures.ThreadPoolExecutor(max(1, concurrency), "llm") as pool:
      futures = {pool.submit(llm.ask, key, req.messages, req.max_tokens, req.choices): key
                 for key, req in todo.items()}
      try:
        for fut in concurrent.futures.as_completed(futures):
          answers[futures[fut]] = _result(fut, llm)
          _tick(bar)
      except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
  return [answers[k] for k in keys]


def _result(fut, llm: CachedBackend) -> Optional[Completion]:
  try:
    return fut.result()
  except BackendError as e:
    log.debug("LLM request failed after retries: %s", e)
    llm.last_problem = str(e)
    return None


def _tick(bar) -> None:
  if bar is not None:
    bar.update(1)
