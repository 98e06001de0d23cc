"""T5 encoder: parity with transformers' T5EncoderModel, weight import, tokenization, errors."""
from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from flax import linen as nn

from musicgen_jax.conditioners.t5 import (T5Conditioner, T5Encoder, T5EncoderConfig,
                                          relative_position_buckets)
from musicgen_jax.interop.t5 import t5_params_from_hf

TINY = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=32, relative_attention_max_distance=128,
            layer_norm_epsilon=1e-6, dropout_rate=0.0)


def _hf_model(feed_forward_proj: str, seed: int = 0):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(seed)
  hf_config = transformers.T5Config(feed_forward_proj=feed_forward_proj, **TINY)
  model = transformers.T5EncoderModel(hf_config).eval()
  with torch.no_grad():  # random norm scales so a dropped scale shows
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.uniform_(0.5, 1.5)
  return model, hf_config


def _batch(seed: int = 0, batch: int = 3, length: int = 11):
  rng = np.random.default_rng(seed)
  input_ids = rng.integers(2, TINY["vocab_size"], size=(batch, length)).astype(np.int32)
  lengths = np.array([length, 7, 3])[:batch]
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  input_ids = np.where(mask > 0, input_ids, 0).astype(np.int32)
  return input_ids, mask


def _hf_hidden(model, input_ids, mask) -> np.ndarray:
  import torch
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(input_ids).long(), attention_mask=torch.from_numpy(mask).long())
  return out.last_hidden_state.numpy()


def _state_dict_numpy(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _max_err_valid(ours, theirs, mask) -> float:
  valid = mask.astype(bool)
  return float(np.max(np.abs(np.asarray(ours)[valid] - theirs[valid])))


@pytest.mark.parametrize("proj, act, gated", [("relu", "relu", False), ("gated-gelu", "gelu_new", True),
                                              ("gated-silu", "silu", True), ("gelu", "gelu", False)])
def test_feed_forward_proj_parsing_matches_transformers(proj, act, gated):
  config = T5EncoderConfig.from_hf_dict({**TINY, "feed_forward_proj": proj})
  assert (config.dense_act_fn, config.is_gated_act) == (act, gated)
  transformers = pytest.importorskip("transformers")
  hf = transformers.T5Config(feed_forward_proj=proj, **TINY)
  assert (hf.dense_act_fn, hf.is_gated_act) == (act, gated)


@pytest.mark.parametrize("proj", ["gated-nope", "foo", "relu-gated", "gated-gelu-x"])
def test_bad_feed_forward_proj(proj):
  with pytest.raises(ValueError, match="feed_forward_proj"):
    T5EncoderConfig.from_hf_dict({**TINY, "feed_forward_proj": proj})


def test_config_rejects_non_t5_dict():
  with pytest.raises(ValueError, match="d_model"):
    T5EncoderConfig.from_hf_dict({"vocab_size": 10})
  with pytest.raises(ValueError, match="model_type"):
    T5EncoderConfig.from_hf_dict({**TINY, "model_type": "musicgen"})


def test_relative_position_buckets_match_transformers():
  pytest.importorskip("torch")
  import torch
  from transformers.models.t5.modeling_t5 import T5Attention
  for num_buckets, max_distance in ((32, 128), (16, 20)):
    ours = relative_position_buckets(300, 300, num_buckets, max_distance)
    rel = torch.arange(300)[None, :] - torch.arange(300)[:, None]
    theirs = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=num_buckets,
                                                   max_distance=max_distance).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_converted_tree_matches_init_tree():
  model, _ = _hf_model("gated-gelu")
  config = T5EncoderConfig.from_hf_dict({**TINY, "feed_forward_proj": "gated-gelu"})
  params = t5_params_from_hf(_state_dict_numpy(model), config)
  init = nn.unbox(T5Encoder(config).init(jax.random.PRNGKey(0), jnp.ones((1, 2), jnp.int32),
                                         jnp.ones((1, 2), jnp.int32))["params"])
  shapes = lambda t: jax.tree_util.tree_map(lambda x: x.shape, t)
  assert shapes(params) == shapes(init)


@pytest.mark.parametrize("proj", ["relu", "gated-gelu"])
def test_encoder_matches_transformers(proj):
  model, _ = _hf_model(proj, seed=1)
  config = T5EncoderConfig.from_hf_dict({**TINY, "feed_forward_proj": proj})
  params = t5_params_from_hf(_state_dict_numpy(model), config)
  input_ids, mask = _batch()
  ours = jax.jit(T5Encoder(config).apply)({"params": params}, input_ids, mask)
  theirs = _hf_hidden(model, input_ids, mask)
  assert ours.dtype == jnp.float32 and ours.shape == theirs.shape
  err = _max_err_valid(ours, theirs, mask)
  print(f"T5 {proj}: max abs diff at valid positions {err:.2e} (|ref| max {np.abs(theirs).max():.2f})")
  assert err < 1e-4


def test_encoder_bf16_compute_close_to_fp32():
  model, _ = _hf_model("gated-gelu", seed=2)
  config = T5EncoderConfig.from_hf_dict({**TINY, "feed_forward_proj": "gated-gelu"})
  params = t5_params_from_hf(_state_dict_numpy(model), config)
  input_ids, mask = _batch(seed=2)
  ref = T5Encoder(config).apply({"params": params}, input_ids, mask)
  bf16 = T5Encoder(config, dtype=jnp.bfloat16).apply({"params": params}, input_ids, mask)
  assert bf16.dtype == jnp.float32
  err = _max_err_valid(bf16, np.asarray(ref), mask)
  assert 0 < err < 0.1


def test_safetensors_round_trip_with_prefix_and_conditioner(tmp_path):
  model, _ = _hf_model("gated-gelu", seed=3)
  model.save_pretrained(tmp_path / "t5")
  from safetensors.numpy import load_file
  plain = load_file(str(tmp_path / "t5" / "model.safetensors"))
  # Shaped like a MusicGen checkpoint: prefixed encoder keys, other models' keys alongside.
  state = {"text_encoder." + k: v for k, v in plain.items()}
  state["decoder.model.decoder.layers.0.self_attn.q_proj.weight"] = np.zeros((3, 3), np.float32)
  if "text_encoder.shared.weight" in state:  # keep only the tied name: the importer must fall back to it
    state["text_encoder.encoder.embed_tokens.weight"] = state.pop("text_encoder.shared.weight")
  config = T5EncoderConfig.from_hf_dict(json.loads((tmp_path / "t5" / "config.json").read_text()))
  params = t5_params_from_hf(state, config, prefix="text_encoder.")

  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(20)}}
  conditioner = T5Conditioner(config, _word_level_tokenizer(vocab))
  batch = conditioner.tokenize(["w1 w2 w3 w4 w5", "w6", "w7 w8"])
  hidden, mask = jax.jit(conditioner.encode)(params, batch)
  theirs = _hf_hidden(model, batch["input_ids"], batch["attention_mask"])
  err = _max_err_valid(hidden, theirs, batch["attention_mask"])
  print(f"T5 gated-gelu via safetensors + conditioner: max abs diff {err:.2e}")
  assert err < 1e-4
  assert mask.dtype == jnp.int32 and hidden.dtype == jnp.float32 and hidden.shape == (3, 6, 32)
  assert float(jnp.abs(hidden[1, 2:]).max()) == 0.0  # padded positions zeroed


def test_import_errors():
  model, _ = _hf_model("relu")
  config = T5EncoderConfig.from_hf_dict({**TINY, "feed_forward_proj": "relu"})
  state = _state_dict_numpy(model)
  key = "encoder.block.1.layer.1.DenseReluDense.wi.weight"
  missing = {k: v for k, v in state.items() if k != key}
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    t5_params_from_hf(missing, config)
  with pytest.raises(ValueError, match=r"text_encoder\.shared\.weight"):
    t5_params_from_hf(state, config, prefix="text_encoder.")
  wrong = dict(state, **{key: np.zeros((64, 31), np.float32)})
  with pytest.raises(ValueError, match=r"expected shape \(64, 32\).*got \(64, 31\)"):
    t5_params_from_hf(wrong, config)
  gated = T5EncoderConfig.from_hf_dict({**TINY, "feed_forward_proj": "gated-gelu"})
  with pytest.raises(ValueError, match="wi_0"):  # relu checkpoint, gated config
    t5_params_from_hf(state, gated)


def _word_level_tokenizer(vocab: dict[str, int]) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  return tok


def _checkpoint_dir(path, musicgen_layout: bool):
  path.mkdir()
  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "b": 4, "c": 5, "d": 6}
  _word_level_tokenizer(vocab).save(str(path / "tokenizer.json"))
  t5 = {**TINY, "feed_forward_proj": "gated-gelu", "model_type": "t5"}
  config = {"model_type": "musicgen", "text_encoder": t5, "decoder": {"hidden_size": 16}} if musicgen_layout else t5
  (path / "config.json").write_text(json.dumps(config))
  return path


@pytest.mark.parametrize("musicgen_layout", [True, False])
def test_tokenize_pads_to_longest(tmp_path, musicgen_layout):
  conditioner = T5Conditioner.from_pretrained(str(_checkpoint_dir(tmp_path / "ckpt", musicgen_layout)))
  assert conditioner.dim == 32 and conditioner.config.is_gated_act
  batch = conditioner.tokenize(["a b c", "d", "zzz a"])
  np.testing.assert_array_equal(batch["input_ids"], [[3, 4, 5, 1], [6, 1, 0, 0], [2, 3, 1, 0]])
  np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
  assert batch["input_ids"].dtype == np.int32 and batch["attention_mask"].dtype == np.int32


def test_tokenize_max_length_pads_and_truncates(tmp_path, caplog):
  conditioner = T5Conditioner.from_pretrained(str(_checkpoint_dir(tmp_path / "ckpt", True)), max_length=3)
  with caplog.at_level(logging.WARNING):
    batch = conditioner.tokenize(["a", "a b c d"])
  np.testing.assert_array_equal(batch["input_ids"], [[3, 1, 0], [3, 4, 1]])  # EOS kept when truncating
  np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 0], [1, 1, 1]])
  assert "truncated" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    batch = conditioner.tokenize(["a b"])
  np.testing.assert_array_equal(batch["input_ids"], [[3, 4, 1]])
  assert "truncated" not in caplog.text


def test_conditioner_init_encode_shapes(tmp_path):
  conditioner = T5Conditioner.from_pretrained(str(_checkpoint_dir(tmp_path / "ckpt", False)), max_length=5)
  params = conditioner.init(jax.random.PRNGKey(0))
  specs = nn.get_partition_spec(params)
  assert tuple(specs["token_embedding"]) == ("vocab", "cond_embed")
  assert tuple(specs["block_0"]["attention"]["query"]) == ("cond_embed", "heads", "kv")
  assert tuple(specs["block_0"]["ffn"]["wo"]) == ("mlp", "cond_embed")
  hidden, mask = conditioner.encode(params, conditioner.tokenize(["a b", "c"]))
  assert hidden.shape == (2, 5, 32) and mask.shape == (2, 5)
  assert bool(jnp.all(jnp.isfinite(hidden)))


def test_missing_tokenizer_json(tmp_path):
  path = _checkpoint_dir(tmp_path / "ckpt", True)
  (path / "tokenizer.json").unlink()
  with pytest.raises(ValueError, match="tokenizer.json"):
    T5Conditioner.from_pretrained(str(path))
