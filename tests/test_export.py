"""Tests for the activation exporter, model helpers and corpus packing, on a tiny offline Llama.

Legend: N = contexts, C = context length, D = d_model.
"""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers import models as tok_models
from tokenizers import pre_tokenizers
from tokenizers import trainers
from transformers import GPT2Config
from transformers import GPT2LMHeadModel
from transformers import LlamaConfig
from transformers import LlamaForCausalLM
from transformers import PreTrainedTokenizerFast

from metasae_jax.lm import corpus
from metasae_jax.lm import export
from metasae_jax.lm import models
from metasae_jax.storage import store, zarr_store
from metasae_jax.core.errors import UserError
from metasae_jax.workflows import benchmarking

WORDS = ("the cat sat on a mat while one dog ran far away and two birds sang "
         "over green hills near old towns . !").split()
C = 8  # context length
NUM_LAYERS = 3


def _sentences(n: int, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tiny_llama"))
  tok = Tokenizer(tok_models.WordLevel(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator([" ".join(WORDS)],
                          trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
  PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>",
                          unk_token="<unk>").save_pretrained(path)
  torch.manual_seed(0)
  cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                    num_hidden_layers=NUM_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=64)
  LlamaForCausalLM(cfg).save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def loaded(model_dir):
  return models.load_model(model_dir)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": s, "id": i}) + "\n"
                          for i, s in enumerate(_sentences(60))))
  return str(path)


def _config(out_dir, text_file, **kw) -> export.ExportConfig:
  args = dict(out_dir=str(out_dir), model="unused", layer=1, corpus=text_file, context_len=C,
              batch_size=3, chunk_tokens=4 * C, num_tokens=14 * C, progress=False)
  args.update(kw)
  return export.ExportConfig(**args)


def _snapshot(path) -> dict:
  """Every file under path (the store and its train / held-out views): mtime and bytes."""
  files = sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names)
  return {os.path.relpath(n, path): (os.stat(n).st_mtime_ns, open(n, "rb").read()) for n in files}


def _full_hidden_states(loaded, tokens_NxC: np.ndarray) -> list:
  with torch.no_grad():
    out = loaded.model(input_ids=torch.from_numpy(tokens_NxC.astype(np.int64)),
                       output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states]


@pytest.mark.parametrize("site,dtype", [("resid_pre", "float16"), ("resid_post", "float32")])
def test_activations_equal_full_model_hidden_states(tmp_path, loaded, text_file, site, dtype):
  s = export.export_activations(_config(tmp_path / "s", text_file, site=site, dtype=dtype), loaded)
  acts_TxD = s.read_acts(0, s.num_tokens, None)
  tokens_T = s.read_tokens(0, s.num_tokens)
  hs = _full_hidden_states(loaded, tokens_T.reshape(-1, C))
  # hidden_states[L] is the input of block L; [L + 1] its output (L is not the last block here).
  want_TxD = hs[1 if site == "resid_pre" else 2].reshape(-1, loaded.d_model)
  assert acts_TxD.dtype == np.dtype(dtype)
  if dtype == "float16":
    np.testing.assert_allclose(acts_TxD.astype(np.float32), want_TxD, rtol=2e-3, atol=2e-3)
  else:
    np.testing.assert_allclose(acts_TxD, want_TxD, rtol=1e-5, atol=1e-5)


def test_blocks_after_layer_never_run(loaded):
  calls = [0] * NUM_LAYERS
  blocks = models.decoder_layers(loaded.model)
  handles = [b.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, b in enumerate(blocks)]
  try:
    ids = torch.zeros((2, C), dtype=torch.long)
    models.capture_residual(loaded.model, ids, 1, "resid_pre")
    assert calls == [1, 0, 0]
    models.capture_residual(loaded.model, ids, 1, "resid_post")
    assert calls == [2, 1, 0]
  finally:
    for h in handles:
      h.remove()


def test_store_validates_with_tokens_and_source(tmp_path, loaded, text_file, model_dir):
  cfg = _config(tmp_path / "s", text_file, model=model_dir, num_tokens=14 * C + 5)
  s = export.export_activations(cfg, loaded)
  reopened = store.open_store(s.path, require_tokens=True)
  assert reopened.num_tokens == 14 * C and reopened.d_model == 32
  assert np.diff(reopened.chunk_offsets).tolist() == [4 * C, 4 * C, 4 * C, 2 * C]
  assert reopened.source == {"model": os.path.abspath(model_dir), "layer": 1, "site": "resid_pre",
                             "corpus": text_file, "text_field": "text", "context_len": C}
  assert not [n for n in os.listdir(s.path) if n.endswith(".tmp")]


def test_rerun_is_noop(tmp_path, loaded, text_file):
  cfg = _config(tmp_path / "s", text_file)
  export.export_activations(cfg, loaded)
  before = _snapshot(cfg.out_dir)
  export.export_activations(cfg, loaded=None)  # would fail to load model "unused" if it tried
  assert _snapshot(cfg.out_dir) == before


def test_corpus_exhaustion_exports_everything_then_reruns_are_noops(tmp_path, loaded, text_file):
  cfg = _config(tmp_path / "s", text_file, num_tokens=10_000 * C)
  s = export.export_activations(cfg, loaded)
  n_ctx = len(list(corpus.contexts(text_file, loaded.tokenizer, C)))
  assert s.num_tokens == n_ctx * C and s.manifest[export.EXHAUSTED]
  before = _snapshot(cfg.out_dir)
  export.export_activations(dataclasses.replace(cfg, num_tokens=20_000 * C), loaded=None)
  assert _snapshot(cfg.out_dir) == before


def test_resume_equals_uninterrupted(tmp_path, loaded, text_file):
  full = _config(tmp_path / "full", text_file)
  export.export_activations(full, loaded)
  want = _snapshot(full.out_dir)
  want_bytes = {n: b for n, (_, b) in want.items()}

  # Stopped after two shards, then the same command again.
  part = _config(tmp_path / "part", text_file)
  export.export_activations(dataclasses.replace(part, num_tokens=8 * C), loaded)
  assert store.open_store(part.out_dir).num_tokens == 8 * C
  export.export_activations(part, loaded)
  assert {n: b for n, (_, b) in _snapshot(part.out_dir).items()} == want_bytes

  # Killed after writing a chunk but before the manifest counted it (the manifest is the zarr group's attributes).
  m = zarr_store.read_group(part.out_dir)
  zarr_store.write_group(part.out_dir, dict(m, num_tokens=m["num_tokens"] - 2 * C))
  # The chunk stays on disk, as after a kill; the rerun writes it again.
  export.export_activations(part, loaded)
  assert {n: b for n, (_, b) in _snapshot(part.out_dir).items()} == want_bytes


@pytest.mark.parametrize("change", [{"layer": 2}, {"dtype": "float32"}, {"context_len": 4},
                                    {"site": "resid_post"}, {"model": "other"}])
def test_other_settings_refused_and_store_untouched(tmp_path, loaded, text_file, change):
  cfg = _config(tmp_path / "s", text_file, num_tokens=8 * C)
  export.export_activations(cfg, loaded)
  before = _snapshot(cfg.out_dir)
  with pytest.raises(UserError, match="other settings"):
    export.export_activations(dataclasses.replace(cfg, num_tokens=12 * C, **change), loaded)
  assert _snapshot(cfg.out_dir) == before


def test_non_store_directory_refused(tmp_path, loaded, text_file):
  (tmp_path / "s").mkdir()
  (tmp_path / "s" / "notes.txt").write_text("mine")
  with pytest.raises(UserError, match="not empty"):
    export.export_activations(_config(tmp_path / "s", text_file), loaded)
  assert os.listdir(tmp_path / "s") == ["notes.txt"]


def test_bad_configs_are_user_errors(tmp_path, loaded, text_file):
  with pytest.raises(UserError, match="--site"):
    _config(tmp_path, text_file, site="mlp_out")
  with pytest.raises(UserError, match="--num_tokens"):
    _config(tmp_path, text_file, num_tokens=C - 1)
  with pytest.raises(UserError, match="--layer 3 is out of range"):
    export.export_activations(_config(tmp_path / "s", text_file, layer=3), loaded)


def test_load_tokenizer_matches_load_model(loaded, model_dir):
  tok = models.load_tokenizer(model_dir)
  assert tok("the cat sat")["input_ids"] == loaded.tokenizer("the cat sat")["input_ids"]
  assert loaded.name == os.path.abspath(model_dir)
  assert (loaded.d_model, loaded.num_layers) == (32, NUM_LAYERS)


def test_unknown_model_is_user_error():
  with pytest.raises(UserError, match="unknown --model"):
    models.load_model("no-such-org/no-such-model-for-metasae")
  with pytest.raises(UserError, match="no such model directory"):
    models.load_model("./no/such/dir")
  with pytest.raises(UserError, match="unknown --model"):
    models.load_tokenizer("no-such-org/no-such-model-for-metasae")


def test_gpt2_blocks_and_resid_post():
  torch.manual_seed(0)
  model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2,
                                     n_positions=32)).eval()
  assert models.decoder_layers(model) == list(model.transformer.h)
  ids = torch.arange(10).reshape(2, 5)
  with torch.no_grad():
    hs = model(input_ids=ids, output_hidden_states=True).hidden_states
  got = models.capture_residual(model, ids, 0, "resid_post")
  np.testing.assert_allclose(got.numpy(), hs[1].numpy(), rtol=1e-5, atol=1e-5)


def test_pack_jsonl_is_tokenised_concatenation(loaded, text_file):
  sents = [json.loads(l)["text"] for l in open(text_file)]
  eos = corpus.separator_id(loaded.tokenizer)
  stream = []
  for s in sents:
    stream += loaded.tokenizer(s, add_special_tokens=False)["input_ids"] + [eos]
  got = list(corpus.contexts(text_file, loaded.tokenizer, C))
  assert len(got) == len(stream) // C
  assert all(c.dtype == np.int32 and c.shape == (C,) for c in got)
  np.testing.assert_array_equal(np.concatenate(got), stream[:len(got) * C])
  again = list(corpus.contexts(text_file, loaded.tokenizer, C))
  np.testing.assert_array_equal(np.stack(again), np.stack(got))


def test_pack_txt_and_directory(tmp_path, loaded):
  d = tmp_path / "dir"
  d.mkdir()
  (d / "b.txt").write_text("\n".join(_sentences(20, seed=2)))
  (d / "a.txt").write_text("\n".join(_sentences(20, seed=1)))
  (d / "skip.md").write_text("ignored")
  tok = loaded.tokenizer
  eos = corpus.separator_id(tok)
  stream = []
  for name in ("a.txt", "b.txt"):  # sorted file order, one document per file
    stream += tok((d / name).read_text(), add_special_tokens=False)["input_ids"] + [eos]
  got = np.concatenate(list(corpus.contexts(str(d), tok, 5)))
  np.testing.assert_array_equal(got, stream[:len(stream) // 5 * 5])
  single = np.concatenate(list(corpus.contexts(str(d / "a.txt"), tok, 5)))
  n_a = len(tok((d / "a.txt").read_text(), add_special_tokens=False)["input_ids"]) + 1
  np.testing.assert_array_equal(single, stream[:n_a // 5 * 5])


def test_corpus_errors(tmp_path, loaded):
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"body": "x"}) + "\n")
  with pytest.raises(UserError, match="--text_field"):
    list(corpus.contexts(str(bad), loaded.tokenizer, C))
  with pytest.raises(UserError, match="no such file"):
    corpus.pieces(str(tmp_path / "missing.txt"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="no .txt/.jsonl/.parquet"):
    corpus.pieces(str(tmp_path / "empty"))
  if importlib.util.find_spec("datasets") is None:
    with pytest.raises(UserError, match="datasets"):
      corpus.pieces("some-org/some-dataset")
  if importlib.util.find_spec("pyarrow") is None:
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(UserError, match="pyarrow"):
      corpus.pieces(str(tmp_path / "x.parquet"))


def test_builtin_corpus_is_deterministic(loaded):
  first = [next(iter(corpus.pieces(corpus.BUILTIN)))[0] for _ in range(2)]
  assert first[0] == first[1] and len(first[0]) > 100


def test_benchmark_reports_both_rates(loaded, text_file):
  r = benchmarking.benchmark_export(_config("unused", text_file), loaded, num_batches=2, rounds=1)
  assert r["num_tokens"] == 2 * 3 * C
  assert r["forward_tokens_per_s"] > 0 and r["export_tokens_per_s"] > 0 and r["ratio"] > 0


def _run_binary(*flags):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run([sys.executable, "-m", "experiments.export_activations", *flags],
                        cwd=root, capture_output=True, text=True, timeout=300, check=False)


def test_binary_exports_and_reports_user_errors(tmp_path, model_dir, text_file):
  out = str(tmp_path / "s")
  ok = _run_binary(f"--model={model_dir}", "--layer=1", f"--corpus={text_file}",
                   f"--context_len={C}", f"--num_tokens={6 * C}", f"--chunk_tokens={4 * C}",
                   f"--out_dir={out}")
  assert ok.returncode == 0, ok.stderr
  assert store.open_store(out, require_tokens=True).num_tokens == 6 * C
  bad = _run_binary(f"--model={model_dir}", "--layer=2", f"--corpus={text_file}",
                    f"--context_len={C}", f"--out_dir={out}")
  assert bad.returncode == 1
  assert bad.stderr.startswith("error: activation store") and "Traceback" not in bad.stderr
