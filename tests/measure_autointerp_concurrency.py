"""One-off wall-time measurement: a 64-pair autointerp run against the test HTTP server, concurrency 16 vs 1.

  python -m tests.measure_autointerp_concurrency [--delay_s 0.05]

Not collected by pytest (it takes minutes); its numbers are quoted in docs/autointerp.md.
"""

import argparse
import json
import tempfile
import time

from metasae_jax.autointerp.config import AutointerpConfig
from metasae_jax.autointerp.pipeline import run_autointerp
from tests import autointerp_util as util


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--delay_s", type=float, default=0.05, help="server-side delay per request")
  parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 1])
  args = parser.parse_args()
  root = tempfile.mkdtemp(prefix="autointerp-timing-")
  model_dir = util.make_model_dir(f"{root}/model")
  util.make_store(f"{root}/store", model_dir, num_contexts=256)
  server = util.FakeLLM()
  server.mode = "hash"
  results = {}

  def config(run, c):
    util.make_run(run, width=128)
    return AutointerpConfig(run_dir=run, activations=f"{root}/store", num_tokens=0, num_latents=64,
                            batch_size=256, window=16, max_examples=8, num_score=5, num_negative=5,
                            llm_base_url=server.base_url, llm_model="tiny", concurrency=c, progress=False)

  try:
    # Warm-up without delay, so both timed runs find JAX's compiled encoder and the imports ready.
    server.delay_s = 0.0
    run_autointerp(config(f"{root}/warmup", 16))
    server.delay_s = args.delay_s
    for c in args.concurrency:
      cfg = config(f"{root}/run{c}", c)
      server.requests.clear()
      server.max_in_flight = 0
      t0 = time.time()
      scores = run_autointerp(cfg)
      results[c] = {"seconds": round(time.time() - t0, 1), "requests": len(server.requests),
                    "max_in_flight": server.max_in_flight, "pairs": scores["paired"]["num_pairs"],
                    "headline": {k: scores[k] for k in ("joint", "solo", "paired")}}
  finally:
    server.close()
  same = len({json.dumps(r["headline"], sort_keys=True) for r in results.values()}) == 1
  for c, r in results.items():
    print(f"concurrency {c}: {r['seconds']} s, {r['requests']} requests, {r['pairs']} pairs, "
          f"max in flight {r['max_in_flight']}")
  print(f"delay {args.delay_s} s per request; identical results: {same}")


if __name__ == "__main__":
  main()
