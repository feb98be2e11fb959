"""Tiny synthetic fixtures for the autointerp tests: an offline tokenizer+Llama, a token store, joint/solo SAEs, an HTTP LLM."""

import hashlib
import http.server
import json
import math
import os
import threading
import time

import numpy as np

from metasae_jax.storage import artifact, store as store_lib

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "red", "blue", "big", "small", "ran", "and",
         "yes", "no"] + [str(i) for i in range(11)]
D, N, K, CTX = 16, 24, 3, 16


def make_model_dir(path: str, extra_words: tuple = ()) -> str:
  """A word-level tokenizer (with a chat template) and a random 2-layer Llama, saved offline.

  `extra_words` get the ids after WORDS (e.g. markup-like tokens for escaping tests).
  """
  from tokenizers import Tokenizer, models, pre_tokenizers, decoders
  from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
  vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "<<", ">>", ":", "?"] + WORDS + list(extra_words))}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>",
                                 pad_token="<eos>")
  fast.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                        "{% if add_generation_prompt %}assistant : {% endif %}")
  fast.save_pretrained(path)
  import torch
  torch.manual_seed(0)
  cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=D, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                    eos_token_id=1, pad_token_id=1, bos_token_id=1)
  LlamaForCausalLM(cfg).save_pretrained(path)
  return path


def make_store(path: str, model_name: str, num_contexts: int = 32, seed: int = 0, extra_words: int = 0):
  """Random activations with a huge position-0 row (an attention sink) and token ids of WORDS (+ extra words)."""
  rng = np.random.default_rng(seed)
  t = num_contexts * CTX
  acts = rng.normal(size=(t, D)).astype(np.float32)
  acts[::CTX] *= 100.0
  tokens = rng.integers(6, 6 + len(WORDS) + extra_words, size=t).astype(np.int32)
  return store_lib.write_store(path, acts, tokens, context_len=CTX,
                               source={"model": model_name, "layer": 1, "site": "resid_pre"},
                               shard_tokens=CTX * 10)


def make_run(run_dir: str, threshold_solo: bool = False, seed: int = 0, width: int = N) -> None:
  """joint/ and solo/ artifacts; solo is a small perturbation of joint so matching is near identity."""
  rng = np.random.default_rng(seed)
  w_enc = rng.normal(size=(D, width)).astype(np.float32)
  w_dec = (w_enc.T / np.linalg.norm(w_enc.T, axis=1, keepdims=True)).astype(np.float32)
  cfg = {"k": K, "activation": "batchtopk", "input_norm": "standardize_per_token",
         "source": {"model": "x", "layer": 1, "site": "resid_pre"}}
  zeros_n, zeros_d = np.zeros(width, np.float32), np.zeros(D, np.float32)
  artifact.save_sae(os.path.join(run_dir, "joint"),
                    {"W_enc": w_enc, "b_enc": zeros_n, "W_dec": w_dec, "b_dec": zeros_d}, cfg)
  perm = rng.permutation(width)
  w_enc2 = (w_enc + 0.05 * rng.normal(size=w_enc.shape)).astype(np.float32)[:, perm]
  w_dec2 = (w_enc2.T / np.linalg.norm(w_enc2.T, axis=1, keepdims=True)).astype(np.float32)
  thr = np.full(width, 1.0, np.float32) if threshold_solo else None
  artifact.save_sae(os.path.join(run_dir, "solo"),
                    {"W_enc": w_enc2, "b_enc": zeros_n, "W_dec": w_dec2, "b_dec": zeros_d}, cfg,
                    threshold_N=thr)
  return perm


class FakeLLM:
  """A deterministic OpenAI-compatible chat server on 127.0.0.1 (real HTTP, a thread per request).

  Modes: "ok" (fixed answers), "hash" (answers derived from a hash of the prompt, so
  scores vary but repeat exactly), "slow", "malformed", "text_only", "echo". `delay_s`
  sleeps in every request; `fail_every` answers HTTP 500 to the first attempt of every
  n-th call (first attempts are counted apart from the client's retries, which it marks
  with x-stainless-retry-count, so one retry always gets through); `fail_all` answers
  500 to everything; `fault(body)` may answer "fail" (HTTP 500) or "malformed" (a body that is not
  JSON) for chosen requests; `on_request(n)` is called with the running request count. The
  server counts requests and the most it ever had in flight at once.
  """

  def __init__(self):
    self.mode = "ok"
    self.delay_s = 0.0
    self.fail_every = 0
    self.fail_all = False
    self.fault = None
    self.first_attempts = 0
    self.on_request = None
    self.requests = []
    self.failed = 0
    self.in_flight = 0
    self.max_in_flight = 0
    self._lock = threading.Lock()
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"  # keep-alive, like vLLM: no TCP connect per request
      disable_nagle_algorithm = True  # headers and body go out at once (no delayed-ACK stall)

      def log_message(self, *args):
        pass

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with outer._lock:
          outer.requests.append({"path": self.path, "body": body,
                                 "auth": self.headers.get("Authorization")})
          n = len(outer.requests)
          outer.in_flight += 1
          outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
          first = int(self.headers.get("x-stainless-retry-count") or 0) == 0
          outer.first_attempts += int(first)
          fault = outer.fault(body) if outer.fault is not None else None
          fail = outer.fail_all or fault == "fail" or (first and outer.fail_every > 0
                                                       and outer.first_attempts % outer.fail_every == 0)
          outer.failed += int(fail)
        try:
          if outer.on_request is not None:
            outer.on_request(n)
          time.sleep(1.0 if outer.mode == "slow" else outer.delay_s)
          if fail:
            status, data = 500, b'{"error": {"message": "injected failure"}}'
          elif outer.mode == "malformed" or fault == "malformed":
            status, data = 200, b"{not json"
          else:
            status, data = 200, json.dumps(outer.reply(body)).encode()
        finally:
          with outer._lock:
            outer.in_flight -= 1
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status != 200:
          self.send_header("retry-after-ms", "10")  # keeps the client's backoff short in tests
        self.end_headers()
        try:
          self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
          pass

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.server.daemon_threads = True
    self.server.request_queue_size = 128
    self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
    self.thread.start()
    self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

  def reply(self, body: dict) -> dict:
    user = body["messages"][-1]["content"]
    h = int(hashlib.sha256(user.encode()).hexdigest(), 16)
    if "How strongly" in user:
      text, alts = "7", [("7", -0.5), ("3", -1.0), ("x", -3.0)]
      if self.mode == "hash":
        a, b = h % 11, (h // 11) % 11
        text, alts = str(a), [(str(a), -0.3), (str(b), -1.5 if b != a else -0.3)]
    elif "yes or no" in user:
      text, alts = "Yes", [("Yes", -0.2), (" no", -1.8)]
      if self.mode == "hash":
        p = 0.05 + 0.9 * ((h % 1000) / 999)
        text, alts = ("Yes" if p > 0.5 else "No"), [("Yes", math.log(p)), (" no", math.log(1 - p))]
    else:
      text, alts = "Explanation: animal words\nmore", [("Explanation", -0.1)]
      if self.mode == "hash":
        text = f"Explanation: words of kind {h % 97}"
    if self.mode == "echo":
      text = "Text: the cat sat"
    logprobs = {"content": [{"token": alts[0][0], "logprob": alts[0][1], "bytes": None,
                             "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in alts]}]}
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    choice["logprobs"] = logprobs if self.mode != "text_only" else None
    return {"id": "x", "object": "chat.completion", "created": 0, "model": body.get("model", ""),
            "choices": [choice]}

  def close(self):
    self.server.shutdown()
    self.server.server_close()
