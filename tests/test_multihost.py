"""Multi-host training: two CPU processes joined by jax.distributed train on manifest data (audio files
-> token cache -> grain) and log the same losses as one process with the same global batch."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import ml_collections
import numpy as np

from configs.musicgen import get_config
from musicgen_jax import checkpoint
from musicgen_jax.codec.encodec import EncodecConfig, EncodecModel
from tests.test_data import ENCODEC, SR, _manifest, _random_params, _write_audio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _losses(workdir: str) -> list[float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]


def test_two_processes_train_like_one(tmp_path):
  root = str(tmp_path)
  _write_audio(root)
  manifest = _manifest(root)
  codec = EncodecModel(EncodecConfig.from_hf_dict(ENCODEC))
  model_cfg = get_config("tiny")
  model_cfg.codec = ml_collections.ConfigDict(dict(sample_rate=SR, frame_rate=100, channels=1,
                                                   encodec=ENCODEC))
  codec_dir = os.path.join(root, "codec")
  checkpoint.save_model(codec_dir, model_cfg, {"lm": {"w": np.zeros(2, np.float32)},
                                               "codec": _random_params(codec)})
  flags = ["--config", "configs/musicgen.py:tiny", "--config.codec.sample_rate=3200",
           "--config.codec.frame_rate=100", "--config.data.kind=manifest",
           f"--config.data.manifest={manifest}", f"--config.data.codec={codec_dir}",
           f"--config.data.cache_dir={os.path.join(root, 'cache')}", "--config.data.min_seconds=0.5",
           "--config.data.valid_fraction=0.2", "--config.data.encode_seconds=1.2",
           "--config.train.segment_seconds=0.5", "--config.train.batch_size=4",
           "--config.train.num_steps=3", "--config.train.log_every=1", "--config.train.eval_every=3",
           "--config.train.checkpoint_every=3", "--config.train.progress=False"]
  base = dict(os.environ, JAX_PLATFORMS="cpu")
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "train.py", *flags, "--workdir", os.path.join(root, "two"),
       f"--config.distributed.coordinator_address=localhost:{port}",
       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
      cwd=ROOT, env=base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  one = subprocess.run([sys.executable, "train.py", *flags, "--workdir", os.path.join(root, "one")],
                       cwd=ROOT, env=dict(base, XLA_FLAGS="--xla_force_host_platform_device_count=2"),
                       capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  two, single = _losses(os.path.join(root, "two")), _losses(os.path.join(root, "one"))
  assert len(two) == len(single) == 3
  np.testing.assert_allclose(two, single, rtol=1e-5)
  assert len(set(np.round(single, 6))) > 1   # the steps saw different batches
  # Both processes saved their data position in the shared checkpoint.
  data_dir = os.path.join(root, "two", "checkpoints", "3", "data")
  assert sorted(n for n in os.listdir(data_dir) if n.endswith(".json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
  # The primary alone wrote best/ and codec/ (process-local Orbax saves, no cross-host barrier), and
  # the work directory is a whole model: LM from the checkpoint, codec from data.codec.
  for name in ("best", "codec"):
    assert os.path.isfile(os.path.join(root, "two", name, checkpoint.CONFIG_FILE))
  config, params = checkpoint.load_model(os.path.join(root, "two"))
  assert config.codec.encodec.codebook_size == ENCODEC["codebook_size"]
  assert sorted(params) == ["codec", "lm", "text"]


_GATHER_SCRIPT = """
import json, sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from musicgen_jax.eval import hook
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
mesh = Mesh(np.array(jax.devices()), ("fsdp",))
full = np.arange(24, dtype=np.float32).reshape(4, 6)
mine = full[2 * jax.process_index():2 * jax.process_index() + 2]
params = {"split": jax.make_array_from_process_local_data(NamedSharding(mesh, P("fsdp")), mine),
          "replicated": jax.make_array_from_process_local_data(NamedSharding(mesh, P()), full[0])}
got = hook.gather(params)
print(json.dumps({k: [list(np.shape(v)), np.asarray(v).tolist(), type(v).__module__]
                  for k, v in got.items()}))
"""


def test_generative_hook_gathers_sharded_weights_across_processes():
  """The generative evaluation samples on process 0 from the whole weights: `hook.gather` (every
  process calls it) turns weights split across processes into full host arrays on each of them."""
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-c", _GATHER_SCRIPT, f"localhost:{port}", str(i)],
                            cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  full = np.arange(24, dtype=np.float32).reshape(4, 6)
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    got = json.loads(out.strip().splitlines()[-1])
    assert got["split"][0] == [4, 6] and got["split"][1] == full.tolist()
    assert got["replicated"][0] == [6] and got["replicated"][1] == full[0].tolist()
    assert got["split"][2] == got["replicated"][2] == "numpy"
