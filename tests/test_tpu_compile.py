"""The BERT example compiled for TPU slices on this CPU (libtpu, no TPU).

``examples/bert/train_compile.py`` compiles the training script's own steps
for a topology; these tests run it, as a user would, on two v5e slices (4
and 64 devices) at the same per-device batch, and check what a pod needs:
it fits, no buffer holds the global batch, per-device memory does not grow
with the device count and collective bytes stay within FSDP's bound, and
LAMB's update adds at most one collective over AdamW's. A model without the
activation constraints is compiled too, to show that these checks catch
what they are for.

The TPU compiler comes from jax's ``tpu`` extra (.ci/run installs it). Where
it is installed it must load: a broken compiler fails these tests. Only a
machine without it (a developer's) skips them; CI never does.

The HLO parsing of ``xla_report.py`` is checked on small hand-written
modules, against byte counts worked out by hand.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_EXAMPLE = _ROOT / "examples" / "bert"
_HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
_IN_CI = os.environ.get("CI", "").lower() == "true"

_SKIP_WITHOUT_COMPILER = pytest.mark.skipif(
    not _HAS_LIBTPU and not _IN_CI,
    reason="the TPU compiler (pip install \"jax[tpu]==<jax version>\") is "
    "not installed here; CI installs it and never skips")


needs_compiler = _SKIP_WITHOUT_COMPILER

# The test model on a pod: scanned, rematerialised, bfloat16, FSDP; per
# device 6 sequences of 32 (then 48) and 5 held-out ones. The global batches
# (24/384 and 20/320) are no dimension of the model or of one device's
# tokens, so a dimension of that size is the global batch.
PER_DEVICE_BATCH, PER_DEVICE_EVAL = 6, 5
SLICES = ("v5e-4", "v5e-64")


def _overrides(num_devices: int) -> list[str]:
  return [f"--config.global_batch_size={PER_DEVICE_BATCH * num_devices}",
          f"--config.eval_batch_size={PER_DEVICE_EVAL * num_devices}",
          "--config.num_micro_batches=1", "--config.scan_layers=True",
          "--config.remat=True", "--config.fsdp=True",
          "--config.dtype=bfloat16", "--config.fsdp_min_size=1024",
          "--config.hidden_size=64", "--config.intermediate_size=256",
          "--config.seq_lengths=(32, 48)"]


def _compile(slice_name: str, out: pathlib.Path, *extra: str,
             patch: str = "", returncode: int = 0) -> dict:
  """Runs train_compile.py as a user would and returns its JSON.

  ``patch``: Python run after train_compile.py's imports, before its main
  (to compile a deliberately broken model). ``returncode``: the exit status
  expected (its stderr is then in the result's ``"stderr"``).
  """
  num_devices = int(slice_name.split("-")[1])
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  flags = ["--config", str(_EXAMPLE / "configs" / "test.py"),
           f"--topology={slice_name}", f"--json={out}",
           *_overrides(num_devices), *extra]
  if patch:
    command = ["-c", (
        f"import sys; sys.path.insert(0, {str(_EXAMPLE)!r}); "
        f"sys.argv = ['train_compile.py'] + {flags!r}\n"
        f"import train_compile, utils, models\n{patch}\n"
        "from absl import app; app.run(train_compile.main)")]
  else:
    command = [str(_EXAMPLE / "train_compile.py"), *flags]
  result = subprocess.run(
      [sys.executable, *command], cwd=_ROOT, env=env, capture_output=True,
      text=True, timeout=900, check=False)
  assert result.returncode == returncode, (
      result.stdout[-3000:] + result.stderr[-3000:])
  # libtpu stays quiet: no start-up warnings on a machine with no TPU.
  assert "TPU accelerator type" not in result.stderr, result.stderr[-2000:]
  with open(out) as f:
    return dict(json.load(f), stderr=result.stderr)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
  """The two slices' reports, compiled once per test run.

  Under pytest-xdist every worker that runs a test of this module asks for
  them: the first compiles, under a lock in the run's shared temporary
  directory, and the others read its JSON.
  """
  run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
  shared = (tmp_path_factory.getbasetemp().parent / f"tpu_compile_{run}"
            if run else tmp_path_factory.mktemp("tpu"))
  shared.mkdir(exist_ok=True)
  with open(shared / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    out = {}
    for name in SLICES:
      path = shared / f"{name}.json"
      out[name] = (json.loads(path.read_text()) if path.exists() else
                   _compile(name, path, *(() if name == SLICES[0] else
                                          ("--optimizer_share=false",))))
  return out


def _programs(report):
  return {row["program"]: row for row in report["programs"]}


@needs_compiler
def test_fits_and_no_buffer_holds_the_global_batch(reports):
  for name, report in reports.items():
    assert report["num_devices"] == int(name.split("-")[1])
    assert report["fits"], name
    for row in report["programs"]:
      assert row["fits"] and row["memory"]["total"] <= row["hbm_capacity"]
      assert row["global_batch_shapes"] == [], (name, row["program"])
      assert row["flops"] > 0 and row["hbm_bytes"] > 0


def _collective_bytes(row) -> float:
  return sum(c["operand_bytes"] for c in row["collectives"].values())


def _fsdp_bound(report) -> float:
  # FSDP moves each parameter a bounded number of times whatever the device
  # count: the weights gathered (bfloat16 or float32) and the gradients
  # reduced (float32). At 64 devices XLA:TPU writes both as all-reduces of
  # whole tensors (docs/tpu.md), so per device at most about twice the
  # parameters' float32 bytes, and never a multiple of the global batch.
  return 1.1 * 2 * 4 * report["num_params"]


def _memory_grows(small, large) -> list[str]:
  """Programs whose per-device memory at more devices grew (10% and 1 MiB
  of slack: the compiler's choices differ a little with the slice)."""
  grown = []
  for program, row in large.items():
    a, b = small[program]["memory"], row["memory"]
    if (b["arguments"] > a["arguments"]
        or b["temporaries"] > 1.1 * a["temporaries"] + 2**20
        or b["total"] - b["code"] > 1.1 * (a["total"] - a["code"]) + 2**20):
      grown.append(program)
  return grown


@needs_compiler
def test_memory_per_device_is_flat_in_the_device_count(reports):
  small, large = (_programs(reports[name]) for name in SLICES)
  assert set(small) == set(large) == {"phase_1", "phase_2", "eval"}
  # Sharded parameters shrink with more devices; nothing may grow.
  assert not _memory_grows(small, large)


@needs_compiler
def test_collective_bytes_per_device_are_bounded_in_the_device_count(reports):
  for report in reports.values():
    for row in report["programs"]:
      assert 0 < _collective_bytes(row) <= _fsdp_bound(report), (
          report["topology"], row["program"], row["collectives"])


@needs_compiler
def test_lamb_update_adds_at_most_one_collective_over_adamw(reports):
  updates = reports[SLICES[0]]["updates"]
  lamb = sum(c["count"] for c in updates["optimizer"]["collectives"].values())
  adamw = sum(c["count"] for c in updates["adamw"]["collectives"].values())
  assert lamb - adamw <= 1, updates


@needs_compiler
def test_the_checks_catch_an_unconstrained_model(tmp_path):
  """Without the activation constraints and the gathered word table, the
  global batch is on every device, and the collective check above fails.

  (The memory check cannot fail at this size: on v5e the test model's
  activations stay in on-chip memory, and the train steps report no HBM
  temporaries either way. BERT-base at 16 and 512 devices, in the committed
  reports, is where memory is checked at scale.)"""
  report = _compile(
      SLICES[1], tmp_path / "out.json", "--optimizer_share=false",
      patch=("utils.ACTIVATION_RULES = ()\n"
             "models.Embeddings.word_table = lambda self: "
             "self.word.embedding"))
  shapes = [s for row in report["programs"]
            for s in row["global_batch_shapes"]]
  assert shapes, report
  assert any(_collective_bytes(row) > _fsdp_bound(report)
             for row in report["programs"])


@needs_compiler
def test_a_config_that_does_not_fit_exits_naming_the_knobs(tmp_path):
  """On a chip of 1 MB, nothing fits: exit status 1, the programs that do
  not fit, and the knobs to turn, on stderr; the JSON says so too."""
  report = _compile(
      SLICES[0], tmp_path / "out.json", "--optimizer_share=false",
      patch=("import dataclasses, xla_report\n"
             "xla_report.CHIPS['v5e'] = dataclasses.replace("
             "xla_report.CHIPS['v5e'], hbm_bytes=1e6)"), returncode=1)
  assert not report["fits"]
  assert [row["fits"] for row in report["programs"]] == [False] * 3
  assert "Does not fit v5e-4: phase_1, phase_2, eval" in report["stderr"]
  for knob in ("micro_batch_size", "remat", "fsdp"):
    assert f"--config.{knob}" in report["stderr"]


# A scheduled module as XLA:TPU prints it: a prefetch into on-chip memory
# (S(1)), a fusion, an all-gather, and a loop of 5 iterations with an
# all-reduce. Operands are printed by name, without their types.
_HLO = """\
HloModule m, is_scheduled=true

%fused_add (p0: f32[4], p1: f32[4]) -> f32[4] {
  %p0 = f32[4]{0:S(1)} parameter(0)
  %p1 = f32[4]{0:S(1)} parameter(1)
  %inner = f32[4]{0} all-reduce(%p0), replica_groups={}, to_apply=%sum
  ROOT %add = f32[4]{0} add(%inner, %p1)
}

%sum (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%cond (arg: (s32[], f32[8])) -> pred[] {
  %arg = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (arg.1: (s32[], f32[8])) -> (s32[], f32[8]) {
  %arg.1 = (s32[], f32[8]{0}) parameter(0)
  %j = s32[] get-tuple-element(%arg.1), index=0
  %v = f32[8]{0} get-tuple-element(%arg.1), index=1
  %ar = bf16[8]{0} all-reduce(%v), replica_groups={}, to_apply=%sum
  ROOT %t = (s32[], f32[8]{0}) tuple(%j, %ar)
}

ENTRY %main (a: f32[4], b: f32[4], c: (s32[], f32[8])) -> f32[16] {
  %a = f32[4]{0} parameter(0)
  %b = f32[4]{0:T(128)S(1)} parameter(1)
  %c = (s32[], f32[8]{0}) parameter(2)
  %cs = (f32[4]{0}, f32[4]{0:S(1)}, u32[]) copy-start(%a)
  %cd = f32[4]{0:S(1)} copy-done(%cs)
  %f = f32[4]{0} fusion(%cd, %b), kind=kLoop, calls=%fused_add
  %w = (s32[], f32[8]{0}) while(%c), condition=%cond, body=%body
  ROOT %ag = f32[16]{0} all-gather(%f), dimensions={0}
}
"""


def _xla_report():
  sys.path.insert(0, str(_EXAMPLE))
  try:
    import xla_report  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.remove(str(_EXAMPLE))
  return xla_report


def test_loops_run_their_trip_count():
  xla_report = _xla_report()
  counts = xla_report.executions(xla_report.parse_hlo(_HLO))
  assert counts == {"main": 1.0, "body": 5.0, "cond": 5.0}


def test_collectives_by_kind_with_operand_bytes():
  xla_report = _xla_report()
  got = xla_report.collectives(_HLO)
  assert got == {
      # Once, 16 B in (the fusion's f32[4]), 64 B out.
      "all-gather": {"count": 1.0, "operand_bytes": 16.0,
                     "result_bytes": 64.0},
      # 5 times in the loop (f32[8] in, bf16[8] out), once fused (f32[4]).
      "all-reduce": {"count": 6.0, "operand_bytes": 5 * 32.0 + 16.0,
                     "result_bytes": 5 * 16.0 + 16.0}}


def test_hbm_bytes_count_memory_space_zero_only():
  xla_report = _xla_report()
  # copy-start: reads a (16 B) into S(1), writes nothing to HBM; the fusion
  # reads two S(1) operands and writes 16 B; the all-gather reads 16 B and
  # writes 64 B; each of 5 iterations: the all-reduce reads 32 B and writes
  # 16 B, and the condition's compare reads two s32 and writes a pred.
  expected = 16 + 16 + (16 + 64) + 5 * (32 + 16) + 5 * (4 + 4 + 1)
  assert xla_report.hbm_bytes(_HLO) == expected
  assert xla_report.kernel_count(_HLO) == 1


def test_jaxpr_flops_counts_scans_their_length():
  """2 x out x contracted per matmul; a scan's body its length times; a
  cond its costlier branch; the backward pass's matmuls too."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  xla_report = _xla_report()
  x = jnp.ones((4, 8))
  w = jnp.ones((3, 8, 8))

  def forward(x, w):
    def layer(h, wi):
      return jnp.tanh(h @ wi), None
    h, _ = jax.lax.scan(layer, x, w)
    return jax.lax.cond(h.sum() > 0, lambda h: h @ jnp.ones((8, 5)),
                        lambda h: h[:, :5], h).sum()

  one = 2 * 4 * 8 * 8  # one layer's (4, 8) @ (8, 8)
  head = 2 * 4 * 5 * 8
  assert xla_report.jaxpr_flops(jax.make_jaxpr(forward)(x, w)) == (
      3 * one + head)
  # The gradient in w: each layer's forward, and two matmuls backward
  # (the input's and the weight's gradients), the head's backward once.
  grad = jax.make_jaxpr(jax.grad(forward, argnums=1))(x, w)
  assert xla_report.jaxpr_flops(grad) == 3 * 3 * one + 2 * head


# A loop over 3 layers of a stacked f32[3,4] weight: each iteration's kernel
# slices one layer (16 B) out of the whole stack (48 B) and writes its row
# of the stacked f32[3,4] output in place.
_SLICING_HLO = """\
HloModule s, is_scheduled=true

%slice_layer (p0: f32[3,4], p1: s32[]) -> f32[1,4] {
  %p0 = f32[3,4]{1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %ds = f32[1,4]{1,0} dynamic-slice(%p0, %p1, %z), dynamic_slice_sizes={1,4}
}

%write_row (q0: f32[3,4], q1: f32[1,4], q2: s32[]) -> f32[3,4] {
  %q0 = f32[3,4]{1,0} parameter(0)
  %q1 = f32[1,4]{1,0} parameter(1)
  %q2 = s32[] parameter(2)
  %z2 = s32[] constant(0)
  ROOT %dus = f32[3,4]{1,0} dynamic-update-slice(%q0, %q1, %q2, %z2)
}

%cond (c: (s32[], f32[3,4], f32[3,4])) -> pred[] {
  %c = (s32[], f32[3,4]{1,0}, f32[3,4]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%c), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (b: (s32[], f32[3,4], f32[3,4])) -> (s32[], f32[3,4], f32[3,4]) {
  %b = (s32[], f32[3,4]{1,0}, f32[3,4]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%b), index=0
  %w = f32[3,4]{1,0} get-tuple-element(%b), index=1
  %o = f32[3,4]{1,0} get-tuple-element(%b), index=2
  %layer = f32[1,4]{1,0} fusion(%w, %j), kind=kLoop, calls=%slice_layer
  %out = f32[3,4]{1,0} fusion(%o, %layer, %j), kind=kLoop, calls=%write_row
  ROOT %t = (s32[], f32[3,4]{1,0}, f32[3,4]{1,0}) tuple(%j, %w, %out)
}

ENTRY %main (a: (s32[], f32[3,4], f32[3,4])) -> (s32[], f32[3,4], f32[3,4]) {
  %a = (s32[], f32[3,4]{1,0}, f32[3,4]{1,0}) parameter(0)
  ROOT %loop = (s32[], f32[3,4]{1,0}, f32[3,4]{1,0}) while(%a), condition=%cond, body=%body
}
"""


def test_hbm_bytes_of_a_loop_over_a_stacked_weight_count_slices():
  xla_report = _xla_report()
  # Per iteration: the slicing kernel reads one layer (16 B) and the
  # counter (4 B), writes 16 B; the in-place kernel reads the layer (16 B)
  # and the counter, writes one row (16 B); the condition reads two s32 and
  # writes a pred. Not the whole stacks (48 B) each time.
  per_iteration = (16 + 4 + 16) + (16 + 4 + 16) + (4 + 4 + 1)
  assert xla_report.hbm_bytes(_SLICING_HLO) == 3 * per_iteration


def test_shapes_with_the_global_batch():
  xla_report = _xla_report()
  assert xla_report.shapes_with_dim(_HLO, 16) == ["f32[16]"]
  assert xla_report.shapes_with_dim(_HLO, 3) == []


def test_topology_names():
  xla_report = _xla_report()
  pod = xla_report.topology("v3-1024")
  assert (pod.num_chips, pod.num_devices, pod.jax_name) == (
      1024, 2048, "v3:32x32")
  assert pod.chip.device_hbm_bytes == 16 * 2**30
  assert xla_report.topology("v4:2x2x4").num_devices == 16
  for bad in ("v3-1000", "v4:2x2", "v9:2x2", "tpu"):
    with pytest.raises(ValueError, match="`topology` must be one of"):
      xla_report.topology(bad)


@needs_compiler
def test_update_benchmark_tpu_mode(tmp_path):
  """benchmarks/update_step_tpu.py keeps LAMB's update at its floor on v3.

  v3's layouts have no on-chip memory spaces, so there the HLO's HBM count
  must agree with XLA's own bytes accessed; LAMB reads and writes at most
  1.5x AdamW's bytes (floor: 40/28 = 1.43x) and adds at most one
  collective over AdamW's under FSDP (all its norms in one all-reduce).
  """
  out = tmp_path / "tpu.json"
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
      [sys.executable, str(_ROOT / "benchmarks" / "update_step_tpu.py"),
       "--quick", "--only", "lamb_optax.lamb", "--out", str(out)],
      cwd=_ROOT, env=env, capture_output=True, text=True, timeout=900,
      check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "| lamb_optax.lamb |" in result.stdout
  cells = json.loads(out.read_text())["cells"]
  assert {(c["topology"], c["sharding"]) for c in cells} == {
      (t, s) for t in ("v5e-4", "v3-16") for s in ("replicated", "FSDP")}
  for cell in cells:
    adamw, lamb = cell["rows"]["optax.adamw"], cell["rows"]["lamb_optax.lamb"]
    assert lamb["x_adamw_bytes"] <= 1.5, cell
    assert lamb["added_collectives"] <= 1, cell
    if cell["topology"] == "v3-16" and cell["sharding"] == "replicated":
      for row in (adamw, lamb):
        assert row["hbm_bytes_per_param"] == pytest.approx(
            row["xla_bytes_per_param"], rel=0.03), cell
      assert adamw["hbm_bytes_per_param"] == pytest.approx(28.0, rel=0.02)
      assert lamb["hbm_bytes_per_param"] == pytest.approx(40.0, rel=0.02)


def test_docs_tables_are_the_committed_reports():
  """docs/tpu.md shows each committed train_compile.py report as it came out.

  The reports in examples/bert/results/pod/ are the JSON of the runs the
  docs quote (minutes each, so not rerun here); each one's table, as
  ``xla_report.markdown`` renders it, must be in the docs verbatim.
  """
  xla_report = _xla_report()
  docs = (_ROOT / "docs" / "tpu.md").read_text()
  reports = sorted((_EXAMPLE / "results" / "pod").glob("*.json"))
  assert len(reports) >= 4, reports
  for path in reports:
    report = json.loads(path.read_text())
    assert xla_report.markdown(report) in docs, path.name


def test_committed_pod_reports_are_flat_from_16_to_512_devices():
  """At 32 x 128 a device on 16 and 512 v4 chips (the committed reports
  that docs/tpu.md quotes): BERT-Large's per-device memory and collective
  bytes do not grow. BERT-base's activations and collectives do not either;
  its arguments do, as docs/tpu.md says: one-axis FSDP cannot split its
  768-wide leaves over 512 devices, so they stay whole on each."""
  pod = _EXAMPLE / "results" / "pod"

  def load(name):
    return _programs(json.loads((pod / f"{name}.json").read_text()))

  small, large = load("flatlarge_v4-16"), load("flatlarge_v4-512")
  assert set(small) == set(large) == {"phase_1", "eval"}
  assert not _memory_grows(small, large)
  for program in small:
    assert (_collective_bytes(large[program])
            <= 1.1 * _collective_bytes(small[program])), program
  small, large = load("flat_v4-16"), load("flat_v4-512")
  for program in small:
    a, b = small[program], large[program]
    assert (b["memory"]["temporaries"]
            <= 1.1 * a["memory"]["temporaries"] + 2**20), program
    assert _collective_bytes(b) <= 1.1 * _collective_bytes(a), program
  assert large["phase_1"]["memory"]["arguments"] > 2 * small["phase_1"][
      "memory"]["arguments"]
