"""The TPU-pod plan, checked on a CPU: compile the real train step ahead of time for a TPU topology.

    python -m musicgen_jax.aot --config configs/musicgen.py:large --topology v5p:4x4x8 \
        [--dcn 2] [--config.mesh.shape=1,-1,1] [--config.train.batch_size=192] \
        [--config.model.dtype=bfloat16] [--config.model.remat=full]

libtpu describes the topology's chips without owning them (`jax.experimental.topologies`); the train
step that `train.py` runs (training/steps.py: the task's step, its shardings, donation and on-device
metric sums) is lowered and compiled for them here. XLA's own figures come back: the per-chip memory
(`compiled.memory_analysis()`) and FLOPs (`compiled.cost_analysis()`), printed beside the chip's HBM,
the analytical FLOPs of the task and the step time and days the paper's budget would take at 50% MFU.
A step that cannot fit is refused by the TPU compiler itself (as on the pod); that is reported, not
raised. docs/SCALING.md holds the table for the paper's three sizes.

Topologies: `<chip>:<shape>` as libtpu names them (v5e:16x16, v6e:16x16, v5p:4x4x8, v4:2x2x1), or a
Cloud TPU name (v5e-256, v6e-256, v5p-128, v4-8; v4 and v5p count TensorCores, two per chip).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import re
import sys
import time
from typing import Sequence

import jax
import ml_collections
import numpy as np

# The paper's training budget (audiocraft config/solver/musicgen/musicgen_base_32khz.yaml: batch 192,
# 30 s segments, 500 epochs x 2000 updates = 1M updates; see docs/SCALING.md).
PAPER_STEPS = 1_000_000
PAPER_BATCH = 192
PAPER_SEGMENT_SECONDS = 30.0
MFU = 0.5


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str             # the generation as libtpu and the topology string name it
  hbm_gib: float        # HBM per chip
  peak_tflops: float    # dense bf16 peak per chip
  dims: int             # 2 (v5e, v6e: 2D torus) or 3 (v4, v5p: 3D torus)
  megacore: bool        # two TensorCores presented as one device


# Cloud TPU documentation, "System architecture" of each generation (docs/SCALING.md cites them).
CHIPS = {
    "v4": Chip("v4", 32.0, 275.0, 3, True),
    "v5p": Chip("v5p", 95.0, 459.0, 3, True),
    "v5e": Chip("v5e", 16.0, 197.0, 2, False),
    "v6e": Chip("v6e", 32.0, 918.0, 2, False),
}

# Cloud TPU names (<chip>-<n>) of common slices -> their shape. n counts TensorCores on the megacore
# chips (v4, v5p: two per chip) and chips on v5e / v6e.
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
              256: (16, 16)}
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16)}

_FORMS = ("use <chip>:<shape> with chip v5e or v6e and shape AxB (e.g. v5e:16x16), or chip v4 or v5p "
          "and shape AxBxC (e.g. v5p:4x4x8), or a Cloud TPU name (v5e-256, v6e-256, v5p-128, v4-8)")


@dataclasses.dataclass(frozen=True)
class Topology:
  chip: Chip
  shape: tuple[int, ...]    # chips along each torus axis, one slice
  num_slices: int = 1

  @property
  def name(self) -> str:
    return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

  @property
  def chips_per_slice(self) -> int:
    return int(np.prod(self.shape))

  @property
  def chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def wrap(self) -> tuple[bool, bool, bool]:
    """Torus wrap-around links per axis: v4 / v5p slices of whole 4x4x4 cubes are tori; v5e / v6e
    axes of the full 16-chip pod width wrap."""
    s = tuple(self.shape) + (1,) * (3 - len(self.shape))
    if self.chip.dims == 3:
      return (all(d % 4 == 0 for d in s),) * 3
    return tuple(d == 16 for d in s[:2]) + (False,)


def parse_topology(name: str, num_slices: int = 1) -> Topology:
  """'v5p:4x4x8' or 'v5p-256' (and the like) -> Topology; ValueError listing the valid forms."""
  if not isinstance(num_slices, int) or num_slices < 1:
    raise ValueError(f"--dcn (the number of slices) must be an integer >= 1, got {num_slices!r}")
  text = name.strip().lower()
  m = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+)*)", text)
  if m:
    chip = CHIPS[m.group(1)]
    shape = tuple(int(d) for d in m.group(2).split("x"))
    if len(shape) != chip.dims or min(shape) < 1:
      raise ValueError(f"unknown TPU topology {name!r}: {chip.name} slices have {chip.dims} axes; "
                       f"{_FORMS}")
    return Topology(chip, shape, num_slices)
  m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", text)
  if m:
    chip = CHIPS[m.group(1)]
    n = int(m.group(2))
    chips = n // 2 if chip.megacore else n
    table = _SHAPES_3D if chip.dims == 3 else _SHAPES_2D
    if (not chip.megacore or n % 2 == 0) and chips in table:
      return Topology(chip, table[chips], num_slices)
  raise ValueError(f"unknown TPU topology {name!r}: {_FORMS}")


def libtpu_missing() -> str | None:
  """One line naming the install command when libtpu is absent, else None."""
  if importlib.util.find_spec("libtpu") is None:
    return f"needs libtpu: pip install 'jax[tpu]=={jax.__version__}'"
  return None


def topology_devices(topo: Topology) -> list:
  """Compile-only devices of the topology (no TPU needed, libtpu is)."""
  missing = libtpu_missing()
  if missing:
    raise RuntimeError(missing)
  # Compile-only: no chip is opened, so several compiles (or a test beside one) may share a host;
  # libtpu's one-process lock guards real chips.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  return list(topologies.get_topology_desc(
      platform="tpu", topology_name=topo.name,
      chip_config_name="megacore" if topo.chip.megacore else "default",
      chips_per_host_bounds=(2, 2, 1) if topo.chips_per_slice >= 4 else (1, 1, 1),
      num_slices=topo.num_slices, wrap=topo.wrap).devices)


# ---- the mesh ----------------------------------------------------------------------------------------
def lm_param_count(config: ml_collections.ConfigDict) -> int:
  """Parameters of the LM (the text encoder aside), from shapes only."""
  from flax import linen as nn
  from musicgen_jax import lm as lm_lib
  cfg = lm_lib.LMConfig.from_dict(config.model)
  shapes = jax.eval_shape(functools.partial(lm_lib.init_params, cfg), jax.random.key(0))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes))))


def default_mesh_shape(config: ml_collections.ConfigDict, topo: Topology) -> tuple[int, int, int]:
  """(data, fsdp, tensor) for one slice: the batch split as many ways as it and the chip count allow,
  the remaining factor on `tensor`; weights fully sharded (fsdp) unless the replicated train state
  (fp32 params, gradients and two Adam moments: 16 bytes a parameter) takes under a quarter of HBM."""
  batch = config.train.batch_size
  if batch % topo.num_slices:
    raise ValueError(f"train.batch_size {batch} must be divisible by the {topo.num_slices} slices")
  chips = topo.chips_per_slice
  ways = math.gcd(batch // topo.num_slices, chips)
  tensor = chips // ways
  m = config.model
  for what, size in (("model.num_heads", m.num_heads), ("model.ffn_dim", m.ffn_dim),
                     ("model.card", m.card), ("text.num_heads", config.text.num_heads)):
    if size % tensor:
      raise ValueError(
          f"no default mesh for batch {batch} on {chips} chips: {chips // ways} tensor-parallel ways "
          f"do not divide {what} {size}; use a batch size with more factors in common with {chips}, "
          "or pass --config.mesh.shape=DATA,FSDP,TENSOR")
  replicated_gib = 16 * lm_param_count(config) / 2**30
  if replicated_gib < topo.chip.hbm_gib / 4:
    return (ways, 1, tensor)
  return (1, ways, tensor)


def topology_mesh(config: ml_collections.ConfigDict, topo: Topology,
                  mesh_shape: Sequence[int] | None = None, dcn_shape: Sequence[int] | None = None):
  """The (data, fsdp, tensor) mesh over the topology's chips, laid out as `train.py` lays it out
  (sharding.make_mesh). mesh_shape is per slice (None: `default_mesh_shape`); across slices the
  data axis is split unless `dcn_shape` says otherwise."""
  from musicgen_jax import sharding as shd
  if mesh_shape is None:
    mesh_shape = default_mesh_shape(config, topo)
  if topo.num_slices > 1 and dcn_shape is None:
    dcn_shape = (topo.num_slices, 1, 1)
  return shd.make_mesh(mesh_shape, config.mesh.axes, devices=topology_devices(topo),
                       dcn_shape=dcn_shape if topo.num_slices > 1 else None)


# ---- FLOPs of the traced program --------------------------------------------------------------------
def matmul_flops(jaxpr, loop_bodies_once: bool = False) -> float:
  """FLOPs of every dot_general in a (closed) jaxpr, 2 per multiply-add, whole arrays (all chips).

  Scan bodies count `length` times (once with `loop_bodies_once`, as XLA's cost analysis counts
  while loops); a cond counts its costliest branch; a while loop of unknown trip count counts once.
  Rematerialised forward passes appear in the backward pass and are counted where they run.
  """
  from jax.extend import core as jex_core
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (contract_l, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      k = float(np.prod([lhs[d] for d in contract_l])) if contract_l else 1.0
      total += 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * k
    elif name == "scan":
      body = matmul_flops(eqn.params["jaxpr"], loop_bodies_once)
      total += body * (1 if loop_bodies_once else eqn.params["length"])
    elif name == "cond":
      total += max(matmul_flops(b, loop_bodies_once) for b in eqn.params["branches"])
    else:
      for sub in jex_core.jaxprs_in_params(eqn.params):   # pjit, remat, custom_jvp, shard_map, ...
        total += matmul_flops(sub, loop_bodies_once)
  return total


# ---- the compile -------------------------------------------------------------------------------------
@dataclasses.dataclass
class AotReport:
  topology: str
  chip: Chip
  chips: int
  hosts: int
  slices: int
  mesh: dict                  # axis -> size (the full mesh, slices included)
  batch: int                  # global batch of one step
  data_ways: int              # ways the batch is split
  params: int                 # parameters in the train state (LM + text encoder)
  segment_seconds: float
  analytical_flops: float     # model FLOPs of one step, all chips (task.flops_per_step)
  budget_steps: int           # steps of this batch that see the paper's examples
  compile_seconds: float
  fits: bool
  memory: dict | None = None  # bytes per chip: arguments, outputs, aliased, temporaries, code, total
  program_flops: float = 0.0  # matmul FLOPs of the traced step, all chips (scans x length, remat
                              # recompute included)
  compiled_flops: float | None = None   # per chip, XLA's cost analysis of the compiled step (a
                                        # scanned layer loop's body counted once)
  program_flops_loops_once: float = 0.0   # program_flops with loop bodies once (XLA's convention)
  error: str | None = None    # the compiler's out-of-memory line when it does not fit

  @property
  def step_seconds(self) -> float:
    """Step time at MFU of the chips' bf16 peak, from the analytical FLOPs."""
    return self.analytical_flops / (self.chips * self.chip.peak_tflops * 1e12 * MFU)

  @property
  def budget_days(self) -> float:
    return self.budget_steps * self.step_seconds / 86400.0


def compile_for_topology(config: ml_collections.ConfigDict, topology: str, *, num_slices: int = 1,
                         mesh_shape: Sequence[int] | None = None,
                         dcn_shape: Sequence[int] | None = None, task_factory=None) -> AotReport:
  """Compiles `config`'s train step for `topology` (`num_slices` slices over DCN) on this host.

  mesh_shape: (data, fsdp, tensor) per slice, one -1 allowed (None: `default_mesh_shape`);
  dcn_shape: the mesh across slices (None: the slices split the data axis).
  """
  from musicgen_jax import sharding as shd
  from musicgen_jax.training import loop, steps

  topo = parse_topology(topology, num_slices)
  loop.check_config(config)
  missing = libtpu_missing()
  if missing:
    raise RuntimeError(missing)
  mesh = topology_mesh(config, topo, mesh_shape, dcn_shape)
  rules = shd.rules_from_config(config.logical_axis_rules)
  ways = shd.data_parallel_size(mesh, rules)
  hosts = len({d.process_index for d in mesh.devices.flat})
  batch = config.train.batch_size
  if batch % ways or batch % hosts:
    raise ValueError(f"train.batch_size {batch} must be divisible by the {ways} data-parallel ways of "
                     f"the mesh {dict(mesh.shape)} and by the {hosts} hosts of {topo.name}")
  if task_factory is None:
    from musicgen_jax.training.lm_task import LMTask as task_factory
  task = task_factory(config, mesh, None)
  train_step = steps.build_train_step(task, mesh, rules, batch)
  n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(train_step.abstract_state.params)))
  examples = PAPER_STEPS * PAPER_BATCH
  report = AotReport(
      topology=topo.name, chip=topo.chip, chips=topo.chips, hosts=hosts, slices=num_slices,
      mesh=dict(mesh.shape), batch=batch, data_ways=ways, params=n_params,
      segment_seconds=float(config.train.segment_seconds),
      analytical_flops=float(task.flops_per_step(batch)), budget_steps=-(-examples // batch),
      compile_seconds=0.0, fits=True)
  t0 = time.perf_counter()
  try:
    traced = train_step.trace()
    report.program_flops = matmul_flops(traced.jaxpr)
    report.program_flops_loops_once = matmul_flops(traced.jaxpr, loop_bodies_once=True)
    compiled = train_step.lower(traced).compile()
  except Exception as e:   # noqa: BLE001 -- only the compiler's out-of-memory verdict is a result
    report.compile_seconds = time.perf_counter() - t0
    line = _oom_line(str(e))
    if line is None:
      raise
    report.fits, report.error = False, line
    return report
  report.compile_seconds = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  mem = {"arguments": ma.argument_size_in_bytes, "outputs": ma.output_size_in_bytes,
         "aliased": ma.alias_size_in_bytes, "temporaries": ma.temp_size_in_bytes,
         "code": ma.generated_code_size_in_bytes}
  # Donated state is aliased to the outputs: it is counted once.
  mem["total"] = (mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"]
                  + mem["code"])
  report.memory = mem
  report.fits = mem["total"] <= topo.chip.hbm_gib * 2**30
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  report.compiled_flops = float(cost.get("flops", float("nan"))) if cost else None
  return report


def _oom_line(message: str) -> str | None:
  """The line of a compiler error that says HBM ran out, or None for any other error."""
  if "RESOURCE_EXHAUSTED" not in message and "hbm" not in message.lower():
    return None
  lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
  for ln in lines:
    if re.search(r"(?i)ran out of memory|exceeded hbm|resource_exhausted", ln):
      return ln[:300]
  return lines[0][:300] if lines else "RESOURCE_EXHAUSTED"


# ---- printing ----------------------------------------------------------------------------------------
def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.1f} MiB"


def _count(n: float) -> str:
  return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n:,.0f}"


def format_report(r: AotReport) -> str:
  mesh = " x ".join(f"{a}={n}" for a, n in r.mesh.items())
  slices = f", {r.slices} slices over DCN" if r.slices > 1 else ""
  tensor = r.chips // r.data_ways
  per_chip = r.batch / r.data_ways
  where = f"per data shard of {tensor} tensor-parallel chips" if tensor > 1 else "per chip"
  hbm = r.chip.hbm_gib * 2**30
  lines = [
      f"topology      {r.topology}: {r.chips} chips ({r.chip.name}), {r.hosts} hosts{slices}",
      f"mesh          {mesh}",
      f"batch         {r.batch} global, {per_chip:g} {where}, {r.batch // r.hosts} per host",
      f"parameters    {_count(r.params)} (LM + text encoder; fp32, with two AdamW moments each)",
  ]
  if r.memory is not None:
    m = r.memory
    lines.append(
        f"memory/chip   arguments {_gib(m['arguments'])}, outputs {_gib(m['outputs'])} "
        f"({_gib(m['aliased'])} aliased to donated arguments), temporaries {_gib(m['temporaries'])}, "
        f"code {_gib(m['code'])}")
    lines.append(f"              total {_gib(m['total'])} of {r.chip.hbm_gib:g} GiB HBM "
                 f"({100 * m['total'] / hbm:.0f}%): {'fits' if r.fits else 'DOES NOT FIT'}")
  else:
    lines.append(f"memory/chip   DOES NOT FIT in {r.chip.hbm_gib:g} GiB HBM: {r.error}")
  per_chip_flops = r.analytical_flops / r.chips
  lines.append(f"FLOPs/step    analytical {per_chip_flops:.3e} per chip ({r.analytical_flops:.3e} all "
               "chips; model FLOPs = 3 x forward, causal attention halved)")
  if r.program_flops:
    lines.append(f"              traced step {r.program_flops / r.chips:.3e} per chip (every matmul, "
                 f"remat recompute included): {r.program_flops / r.analytical_flops:.2f} x analytical")
  if r.compiled_flops is not None:
    once = r.program_flops_loops_once / r.chips
    lines.append(f"              XLA cost_analysis {r.compiled_flops:.3e} per chip: it counts each "
                 f"scanned layer loop once (the traced step counted so: {once:.3e}, "
                 f"{r.compiled_flops / once:.2f} x)")
  lines.append(
      f"step time     {r.step_seconds:.3g} s at {MFU:.0%} MFU of {r.chip.peak_tflops:g} TFLOP/s "
      f"per chip (bf16 peak)")
  lines.append(
      f"paper budget  {PAPER_STEPS:,} steps x batch {PAPER_BATCH} ({PAPER_SEGMENT_SECONDS:g} s "
      f"segments) = {r.budget_steps:,} steps at batch {r.batch}: {r.budget_days:.3g} days"
      + ("" if r.segment_seconds == PAPER_SEGMENT_SECONDS
         else f" (of {r.segment_seconds:g} s segments, not the paper's {PAPER_SEGMENT_SECONDS:g})"))
  lines.append(f"compile       {r.compile_seconds:.0f} s on this host")
  return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------------
def main(argv: list[str]) -> None:
  from absl import flags
  from musicgen_jax import cli
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}")
  config = FLAGS.config
  overridden = [a.split("=")[0] for a in sys.argv[1:]]
  mesh_shape = tuple(config.mesh.shape) if "--config.mesh.shape" in overridden else None
  dcn_shape = config.mesh.get("dcn_shape")
  with cli.friendly_errors("aot"):
    parse_topology(FLAGS.topology, FLAGS.dcn)   # a bad name is reported before a missing libtpu
    missing = libtpu_missing()
    if missing:
      raise ValueError(missing)
    report = compile_for_topology(config, FLAGS.topology, num_slices=FLAGS.dcn,
                                  mesh_shape=mesh_shape, dcn_shape=dcn_shape)
  print(format_report(report))
  if not report.fits:
    sys.exit(1)


def _define_flags() -> None:
  from absl import flags
  from musicgen_jax import cli
  cli.define_config_flag("config", cli.DEFAULT_CONFIG, "Training config to compile.")
  flags.DEFINE_string("topology", None, "TPU topology: v5p:4x4x8, v5e:16x16, v6e-256, v4-8, ...",
                      required=True)
  flags.DEFINE_integer("dcn", 1, "Number of slices joined over the data-center network.")


if __name__ == "__main__":
  from absl import app, logging
  from musicgen_jax import cli
  # This host only compiles: never open its own accelerators (a TPU VM's chips may be training).
  jax.config.update("jax_platforms", "cpu")
  _define_flags()
  logging.set_verbosity(logging.WARNING)
  app.run(main, flags_parser=cli.parse_flags)
