"""TPU topologies without a TPU, and what a compiled program costs on them.

* ``quiet_libtpu``: the environment under which libtpu (the TPU compiler,
  jax's ``tpu`` extra) loads on a machine with no TPU without its start-up
  warnings, and without querying a metadata server.
* ``CHIPS``, ``TOPOLOGIES``, ``topology_devices``: each TPU generation's
  public per-chip figures (with sources) and named slices, and their devices
  from ``jax.experimental.topologies`` (no TPU attached: compile only).
* ``memory``, ``collectives``, ``hbm_bytes``, ``cost``, ``program_figures``:
  per-device figures of a compiled executable: its HBM (arguments, outputs,
  temporaries), its collectives by kind with their operand bytes, the bytes
  it moves to and from HBM counted from the optimized HLO by memory space,
  XLA's own cost analysis, and the roofline.
* ``jaxpr_flops``: a program's matmul flops, from its jaxpr.
* ``markdown``: a ``train_compile.py`` report as a table.

What the optimized HLO can and cannot tell is in docs/tpu.md: XLA:TPU may
write a reduce-scatter or an all-gather as an all-reduce, so a collective's
kind is no evidence of the bytes it moves on the wires; its operand bytes
are what this module reports. And ``cost_analysis()["bytes accessed"]``
counts the compiler's prefetch copies into on-chip memory (the ``S(n)``
memory spaces of v4 and later) as accesses: ``hbm_bytes`` counts only
memory space 0.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import re
from typing import Any, Optional

GiB = 2**30


def quiet_libtpu() -> None:
  """Sets libtpu's environment for a compile-only process with no TPU.

  Without ``TPU_ACCELERATOR_TYPE`` and ``TPU_WORKER_HOSTNAMES`` libtpu prints
  five lines of warnings ("could not determine TPU accelerator type") when
  JAX loads it; ``TPU_SKIP_MDS_QUERY`` keeps it from asking a cloud metadata
  server. Call it before ``import jax``. Values already set are kept, so on a
  real TPU host nothing changes.
  """
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # Compile-only processes may run side by side (pytest -n 2): libtpu's
  # lockfile guards a real chip, of which there is none here.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation's public per-chip figures.

  A JAX device is a TensorCore on v3 (two per chip) and a whole chip on v4
  and v5p (megacore) and on v5e and v6e (one TensorCore per chip).
  """
  name: str
  devices_per_chip: int
  hbm_bytes: float  # Per chip.
  bf16_flops: float  # Peak per chip, per second.
  hbm_bandwidth: float  # Bytes per second per chip.
  chip_config_name: str
  three_d: bool  # A 3-D torus (v4, v5p) or a 2-D one.
  pod_side: int  # Chips along a side of a whole 2-D pod (3-D: 0).
  source: str

  @property
  def device_hbm_bytes(self) -> float:
    return self.hbm_bytes / self.devices_per_chip

  @property
  def device_flops(self) -> float:
    return self.bf16_flops / self.devices_per_chip

  @property
  def device_bandwidth(self) -> float:
    return self.hbm_bandwidth / self.devices_per_chip


# Google Cloud's TPU documentation, "System architecture" of each version.
CHIPS = {
    "v3": Chip("v3", 2, 32 * GiB, 123e12, 900e9, "default", False, 32,
               "https://cloud.google.com/tpu/docs/v3"),
    "v4": Chip("v4", 1, 32 * GiB, 275e12, 1200e9, "megacore", True, 0,
               "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", 1, 16e9, 197e12, 819e9, "default", False, 16,
                "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 1, 95e9, 459e12, 2765e9, "megacore", True, 0,
                "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", 1, 32e9, 918e12, 1640e9, "default", False, 16,
                "https://cloud.google.com/tpu/docs/v6e"),
}

# Named slices: "<generation>-<chips>" -> the chips' shape. The number counts
# chips, as the paper does ("1024 TPUv3 chips"); Cloud's accelerator types
# count TensorCores for v3, v4 and v5p (our v3-1024 is Cloud's v3-2048).
TOPOLOGIES = {
    "v3-16": ("v3", (4, 4)), "v3-128": ("v3", (8, 16)),
    "v3-512": ("v3", (16, 32)), "v3-1024": ("v3", (32, 32)),
    "v4-16": ("v4", (2, 2, 4)), "v4-64": ("v4", (4, 4, 4)),
    "v4-256": ("v4", (4, 8, 8)), "v4-512": ("v4", (8, 8, 8)),
    "v5e-4": ("v5e", (2, 2)), "v5e-16": ("v5e", (4, 4)),
    "v5e-64": ("v5e", (8, 8)), "v5e-256": ("v5e", (16, 16)),
    "v5p-16": ("v5p", (2, 2, 4)), "v5p-64": ("v5p", (4, 4, 4)),
    "v5p-512": ("v5p", (8, 8, 8)), "v5p-1024": ("v5p", (8, 8, 16)),
    "v6e-4": ("v6e", (2, 2)), "v6e-16": ("v6e", (4, 4)),
    "v6e-64": ("v6e", (8, 8)), "v6e-256": ("v6e", (16, 16)),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A slice: its chip, shape and (from ``topology_devices``) devices."""
  name: str
  chip: Chip
  shape: tuple[int, ...]

  @property
  def num_chips(self) -> int:
    return math.prod(self.shape)

  @property
  def num_devices(self) -> int:
    return self.num_chips * self.chip.devices_per_chip

  @property
  def jax_name(self) -> str:
    return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"


def topology(name: str) -> Topology:
  """A named slice (``TOPOLOGIES``) or a shape such as ``"v4:2x2x4"``.

  Raises:
    ValueError: naming the accepted forms, for an unknown name.
  """
  if name in TOPOLOGIES:
    generation, shape = TOPOLOGIES[name]
    return Topology(name, CHIPS[generation], shape)
  match = re.fullmatch(r"(v[0-9][a-z]?):([0-9]+(?:x[0-9]+)+)", name)
  if match and match.group(1) in CHIPS:
    chip = CHIPS[match.group(1)]
    shape = tuple(int(d) for d in match.group(2).split("x"))
    if len(shape) == (3 if chip.three_d else 2):
      return Topology(name, chip, shape)
  raise ValueError(
      f"`topology` must be one of {', '.join(TOPOLOGIES)} (the number counts "
      f"chips) or a generation and a chip shape such as 'v4:2x2x4' or "
      f"'v5e:4x4' (3 dimensions for v4 and v5p, 2 for v3, v5e, v6e), got "
      f"{name!r}.")


def topology_devices(slice_: Topology) -> list[Any]:
  """The slice's devices, for a ``Mesh`` to compile for (nothing runs)."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  shape = slice_.shape + (1,) * (3 - len(slice_.shape))
  # Which dimensions close into a ring (a torus): on v4 and v5p those of 4
  # chips or more; on the 2-D generations only a whole pod's.
  if slice_.chip.three_d:
    wrap = tuple(d >= 4 and d % 4 == 0 for d in shape)
  else:
    wrap = tuple(d == slice_.chip.pod_side for d in shape[:2]) + (False,)
  host = tuple(min(2, d) for d in shape[:2]) + (1,)
  desc = topologies.get_topology_desc(
      platform="tpu", topology_name=slice_.jax_name,
      chip_config_name=slice_.chip.chip_config_name,
      chips_per_host_bounds=host, wrap=wrap)
  devices = list(desc.devices)
  if len(devices) != slice_.num_devices:
    raise RuntimeError(
        f"{slice_.name}: libtpu gave {len(devices)} devices, expected "
        f"{slice_.num_devices} ({slice_.chip.devices_per_chip} per chip).")
  return devices


# ----------------------------------------------------------------------------
# A compiled executable, per device.


def memory(compiled: Any) -> dict[str, int]:
  """HBM per device: arguments, outputs, temporaries, and their total.

  ``total`` is what must fit at once: arguments + outputs - the outputs
  that reuse a donated argument's buffer (aliased) + temporaries + code.
  """
  m = compiled.memory_analysis()
  out = {"arguments": int(m.argument_size_in_bytes),
         "outputs": int(m.output_size_in_bytes),
         "aliased": int(m.alias_size_in_bytes),
         "temporaries": int(m.temp_size_in_bytes),
         "code": int(m.generated_code_size_in_bytes)}
  out["total"] = (out["arguments"] + out["outputs"] - out["aliased"]
                  + out["temporaries"] + out["code"])
  return out


def cost(compiled: Any) -> dict[str, float]:
  """XLA's own cost analysis: flops and bytes accessed, per device."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return {"flops": float(analysis.get("flops", 0.0)),
          "bytes_accessed": float(analysis.get("bytes accessed", 0.0))}


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5,
                "f8e4m3fn": 1, "f8e5m2": 1, "token": 0}
# One array type: dtype, dimensions, and an optional layout with tiling and
# memory space ("{1,0:T(8,128)S(1)}").
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len,
                                             reverse=True))
                    + r")\[([0-9,]*)\](\{[^}]*\})?")
_INSTRUCTION = re.compile(
    r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][a-z0-9\-]*)\((.*)$")
# A computation starts at the line's first column: "%name (params) -> ... {"
# or "ENTRY %name ... {"; its instructions are indented.
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute", "collective-broadcast", "ragged-all-to-all")


@dataclasses.dataclass
class _Instruction:
  name: str
  opcode: str
  result: str  # The result type's text.
  rest: str  # Operands and attributes.

  @property
  def operand_names(self) -> list[str]:
    return re.findall(r"%([\w.\-]+)", _operands(self.rest))


@dataclasses.dataclass
class Hlo:
  """An optimized HLO module's text, parsed: computations and result types."""
  entry: str
  computations: dict[str, list[_Instruction]]
  results: dict[str, str]  # Instruction name -> its result type's text.
  roots: dict[str, str]  # Computation name -> its root instruction's name.

  def operand_bytes(self, inst: _Instruction,
                    memory_space: Optional[int] = None) -> float:
    return sum(_array_bytes(self.results.get(name, ""), memory_space)
               for name in inst.operand_names)


def _array_bytes(text: str, memory_space: Optional[int] = None) -> float:
  """Bytes of the array types in ``text`` (of one memory space, or all)."""
  total = 0.0
  for dtype, dims, layout in _ARRAY.findall(text):
    if memory_space is not None:
      space = re.search(r"S\((\d+)\)", layout or "")
      if (int(space.group(1)) if space else 0) != memory_space:
        continue
    size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    total += size * _DTYPE_BYTES[dtype]
  return total


def _operands(rest: str) -> str:
  """The operand list of an instruction's text (up to its closing paren)."""
  depth = 1
  for i, ch in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      return rest[:i]
  return rest


@functools.lru_cache(maxsize=4)
def parse_hlo(text: str) -> Hlo:
  """Parses an optimized HLO module's text (``compiled.as_text()``).

  Cached: ``program_figures`` asks for the same module's HBM bytes,
  collectives and kernels, and a pod's step is megabytes of text.
  """
  computations: dict[str, list[_Instruction]] = {}
  results: dict[str, str] = {}
  roots: dict[str, str] = {}
  entry, current = "", None
  for line in text.splitlines():
    if not line.startswith(" "):
      match = _COMPUTATION.match(line)
      current = match.group(2) if match else None
      if match:
        computations[current] = []
        if match.group(1):
          entry = current
      continue
    if current is None:
      continue
    match = _INSTRUCTION.match(line)
    if match:
      inst = _Instruction(match.group(1), match.group(3), match.group(2),
                          match.group(4))
      computations[current].append(inst)
      results[inst.name] = inst.result
      if line.lstrip().startswith("ROOT"):
        roots[current] = inst.name
  return Hlo(entry, computations, results, roots)


def _trip_count(hlo: Hlo, condition: str) -> Optional[int]:
  """A counted loop's trip count: its condition's ``counter < N``."""
  instructions = hlo.computations.get(condition, [])
  constants = {i.name: int(m.group(1)) for i in instructions
               if i.opcode == "constant"
               and (m := re.match(r"\s*(-?\d+)\)", i.rest))}
  for inst in instructions:
    if inst.opcode == "compare" and "direction=LT" in inst.rest:
      bounds = [constants[n] for n in inst.operand_names if n in constants]
      if len(bounds) == 1:
        return bounds[0]
  return None


def executions(hlo: Hlo) -> dict[str, float]:
  """How often each scheduled computation runs per call of the program.

  The entry runs once; a while loop's body and condition run its trip count
  times (read from its condition, ``counter < N`` from 0; 1 if it has no
  such form); conditional branches and called computations as often as
  their caller. Fused computations are not listed: their cost is their
  fusion's.
  """
  counts: dict[str, float] = collections.defaultdict(float)

  def visit(name: str, times: float) -> None:
    counts[name] += times
    for inst in hlo.computations.get(name, []):
      if inst.opcode == "while":
        body = re.search(r"body=%?([\w.\-]+)", inst.rest)
        condition = re.search(r"condition=%?([\w.\-]+)", inst.rest)
        n = _trip_count(hlo, condition.group(1)) if condition else None
        for called in (body, condition):
          if called:
            visit(called.group(1), times * (n or 1))
      elif inst.opcode in ("conditional", "call"):
        for group in re.findall(
            r"(?:branch_computations=\{|to_apply=)([^}]*?)(?:\}|,\s*\w+=|$)",
            inst.rest):
          for called in re.findall(r"%?([\w.\-]+)", group):
            if called in hlo.computations:
              visit(called, times)

  if hlo.entry:
    visit(hlo.entry, 1.0)
  return dict(counts)


def _collectives_in(hlo: Hlo, instructions: list[_Instruction], times: float,
                    out: dict[str, dict[str, float]]) -> None:
  for inst in instructions:
    if inst.opcode == "fusion":  # XLA:TPU fuses some collectives.
      called = re.search(r"calls=%?([\w.\-]+)", inst.rest)
      if called:
        _collectives_in(hlo, hlo.computations.get(called.group(1), []),
                        times, out)
      continue
    kind = inst.opcode[:-len("-start")] if inst.opcode.endswith(
        "-start") else inst.opcode
    if kind not in COLLECTIVES:
      continue
    row = out.setdefault(kind, {"count": 0.0, "operand_bytes": 0.0,
                                "result_bytes": 0.0})
    row["count"] += times
    row["operand_bytes"] += times * hlo.operand_bytes(inst)
    result = inst.result
    if inst.opcode.endswith("-start"):  # (operands, results, ...) tuple.
      result = ""
    row["result_bytes"] += times * _array_bytes(result)


def collectives(text: str) -> dict[str, dict[str, float]]:
  """Collectives by kind: count, operand and result bytes per device.

  Per call of the program: an asynchronous pair (``all-gather-start`` /
  ``-done``) counts once, from its start (its result bytes are not read
  from the tuple it returns: 0); collectives inside a loop count once per
  iteration, and those XLA fused into a kernel count too.
  """
  hlo = parse_hlo(text)
  out: dict[str, dict[str, float]] = {}
  for name, n in executions(hlo).items():
    _collectives_in(hlo, hlo.computations.get(name, []), n, out)
  return out


# Instructions that name or reshape buffers without moving bytes.
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast",
               "constant", "after-all", "partition-id", "replica-id",
               "while", "conditional", "call", "opt-barrier",
               "copy-done", "all-gather-done", "all-reduce-done",
               "collective-permute-done", "async-done", "send-done",
               "recv-done", "add-dependency", "iota"}


def _users(instructions: list[_Instruction]) -> dict[str, list[_Instruction]]:
  users: dict[str, list[_Instruction]] = collections.defaultdict(list)
  for inst in instructions:
    for name in inst.operand_names:
      users[name].append(inst)
  return users


_SLICES = ("dynamic-slice", "slice", "gather")


def _read_bytes(hlo: Hlo, name: str, users: dict[str, list[_Instruction]],
                space_bytes: float) -> float:
  """Bytes a fused computation reads of its parameter ``name``: the slices
  it takes, when slicing is all it does with it (through bitcasts)."""
  taken = 0.0
  for user in users.get(name, []):
    if user.opcode == "bitcast":
      taken += _read_bytes(hlo, user.name, users, space_bytes)
    elif user.opcode in _SLICES and user.operand_names[0] == name:
      taken += _array_bytes(user.result)
    elif user.opcode == "dynamic-update-slice" and (
        user.operand_names[0] == name):
      continue  # Updated in place: its write is counted from the result.
    else:
      return space_bytes
  return min(taken, space_bytes)


def _fusion_bytes(hlo: Hlo, inst: _Instruction) -> float:
  """HBM bytes of one fusion: its operands as read, its result as written.

  An operand of which the kernel only takes slices (a layer of a stacked
  weight inside a scanned loop) counts the slices; a result that is a
  dynamic-update-slice of an operand (in place) counts the update.
  """
  called = re.search(r"calls=%?([\w.\-]+)", inst.rest)
  body = hlo.computations.get(called.group(1), []) if called else []
  params = {int(m.group(1)): i.name for i in body if i.opcode == "parameter"
            and (m := re.match(r"\s*(\d+)\)", i.rest))}
  users = _users(body)
  read = 0.0
  for index, name in enumerate(inst.operand_names):
    space_bytes = _array_bytes(hlo.results.get(name, ""), 0)
    if not space_bytes:
      continue
    read += (_read_bytes(hlo, params[index], users, space_bytes)
             if index in params else space_bytes)
  written = _array_bytes(inst.result, 0)
  root = next((i for i in body if i.name == _root_name(hlo, called)), None)
  roots = ([body_inst for body_inst in body
            if body_inst.name in root.operand_names]
           if root is not None and root.opcode == "tuple" else
           [root] if root is not None else [])
  for part in roots:
    if part.opcode == "dynamic-update-slice":
      full = _array_bytes(part.result)
      update = _array_bytes(hlo.results.get(part.operand_names[1], ""))
      written -= (full - update) * (written > 0)
  return read + max(written, 0.0)


def _root_name(hlo: Hlo, called: Optional[re.Match]) -> Optional[str]:
  if not called:
    return None
  return hlo.roots.get(called.group(1))


def hbm_bytes(text: str) -> float:
  """Bytes read from and written to HBM per call, from the optimized HLO.

  Sums, over the instructions of every scheduled computation (times how
  often it runs: a loop's body its trip count), the bytes of each operand
  and result that lives in memory space 0 (HBM). A prefetch into on-chip
  memory (``copy-start`` to ``S(1)``) counts its HBM read once; the fusions
  that then read the on-chip copy add nothing. A kernel that only slices an
  operand (a layer of a stacked weight) reads the slice, and one that
  updates a slice in place writes the slice. On v3, which has no on-chip
  spaces in its layouts, this agrees with ``cost_analysis()["bytes
  accessed"]`` for programs without loops (tests check it).
  """
  hlo = parse_hlo(text)
  times = executions(hlo)
  total = 0.0
  for name, instructions in hlo.computations.items():
    n = times.get(name, 0.0)
    if not n:
      continue
    for inst in instructions:
      if inst.opcode in _NO_TRAFFIC:
        continue
      if inst.opcode == "fusion":
        total += n * _fusion_bytes(hlo, inst)
        continue
      if inst.opcode in ("dynamic-slice", "slice"):
        total += n * 2 * _array_bytes(inst.result, 0)
        continue
      if inst.opcode == "dynamic-update-slice":
        total += n * 2 * _array_bytes(
            hlo.results.get(inst.operand_names[1], ""), 0)
        continue
      written = _array_bytes(inst.result, 0)
      if inst.opcode.endswith("-start"):
        # (source alias, destination, context...): only the destination
        # is written.
        arrays = _ARRAY.findall(inst.result)
        written = (_array_bytes("{}[{}]{}".format(*arrays[1]), 0)
                   if len(arrays) > 1 else 0.0)
      total += n * (written + hlo.operand_bytes(inst, 0))
  return total


def jaxpr_flops(jaxpr: Any) -> float:
  """Matrix-multiply flops of a whole (global) program, from its jaxpr.

  2 x output size x contracted size of every ``dot_general``, a ``scan``'s
  body its length times (a scanned encoder's layers, accumulation's
  micro-batches), a ``cond`` its costliest branch, every other nested jaxpr
  (``jit``, ``remat``'s recomputation, custom derivatives) once, a
  ``while`` loop's body once. Counted before partitioning: per device it is
  this over the device count, the least any device can do when no work is
  repeated (``train_compile.py`` checks separately that the batch is not).

  The compiled program is no good source: XLA's ``cost_analysis()`` counts a
  loop's body once whatever its trip count, and XLA:TPU rewrites batched
  and collective matmuls into convolutions with padded, dilated windows
  whose useful products the HLO does not spell out.

  Args:
    jaxpr: A ``jax.core.ClosedJaxpr`` or ``Jaxpr`` (``jax.make_jaxpr``).
  """
  from jax.extend import core  # pylint: disable=import-outside-toplevel
  inner = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in inner.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      total += 2.0 * math.prod(out) * math.prod(lhs[a] for a in lhs_contract)
      continue
    if name == "scan":
      total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"])
      continue
    if name == "cond":
      total += max(jaxpr_flops(b) for b in eqn.params["branches"])
      continue
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (tuple, list)) else (value,)):
        if isinstance(sub, (core.ClosedJaxpr, core.Jaxpr)):
          total += jaxpr_flops(sub)
  return total


def kernel_count(text: str) -> int:
  """Fusions (kernels) launched per call of the program."""
  hlo = parse_hlo(text)
  times = executions(hlo)
  return int(sum(times.get(name, 0.0) * sum(
      1 for inst in instructions if inst.opcode == "fusion")
                 for name, instructions in hlo.computations.items()))


def program_figures(text: str, chip: Chip, flop_count: float
                    ) -> dict[str, Any]:
  """One program's cost on one device, from its optimized HLO.

  ``flops`` (per device, from ``jaxpr_flops``: the caller's), ``hbm_bytes``
  counted from the HLO (loops their trip count times, memory space 0), the
  roofline lower bound of its time ``max(flops / peak, bytes / bandwidth)``
  with its two terms, the collectives by kind and the kernels launched.
  """
  flop_count, hbm = flop_count, hbm_bytes(text)
  compute_s = flop_count / chip.device_flops
  memory_s = hbm / chip.device_bandwidth
  return {"flops": flop_count, "hbm_bytes": hbm,
          "roofline_s": max(compute_s, memory_s), "compute_s": compute_s,
          "memory_s": memory_s, "collectives": collectives(text),
          "kernels": kernel_count(text)}


def shapes_with_dim(text: str, size: int) -> list[str]:
  """The distinct array types of the optimized HLO with a dimension ``size``."""
  found = set()
  for dtype, dims, _ in _ARRAY.findall(text):
    if dims and size in (int(d) for d in dims.split(",")):
      found.add(f"{dtype}[{dims}]")
  return sorted(found)


# ----------------------------------------------------------------------------
# Reports.


def _gib(x: float) -> str:
  return f"{x / GiB:.3g}"


def markdown(report: dict[str, Any]) -> str:
  """A ``train_compile.py`` report as a Markdown table (per device)."""
  lines = [
      f"{report['topology']} ({report['jax_topology']}, "
      f"{report['num_devices']} devices of {report['chip']}), "
      f"{report['num_params']:,} parameters, optimizer "
      f"{report['optimizer']}{', FSDP' if report['fsdp'] else ''}"
      f"{', remat' if report['remat'] else ''}; per device:", "",
      "| program | batch (per device) x length | arguments GiB | "
      "temporaries GiB | total GiB / HBM | fits | TFLOP | HBM GB | "
      "roofline ms | optimizer bytes / time | AdamW bytes / time | "
      "collectives (count, operand MB) | compile s |",
      "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|"]
  for r in report["programs"]:
    per_device = r.get("global_batch", 0) / report["num_devices"]
    batch = (f"{r.get('global_batch', '')} ({per_device:g}) x "
             f"{r.get('seq_length', '')}")
    if not r["fits"] and "memory" not in r:
      lines.append(f"| {r['program']} | {batch} | | | | **no**: "
                   f"{r['error']} | | | | | | | {r['compile_s']:.0f} |")
      continue
    mem = r["memory"]
    shares = []
    for name in ("optimizer", "adamw"):
      u = r.get("update", {}).get(name)
      shares.append(f"{u['bytes_share']:.2%} / {u['time_share']:.2%}"
                    if u else "")
    coll = ", ".join(f"{k} {v['count']:.0f}, {v['operand_bytes'] / 1e6:.1f}"
                     for k, v in sorted(r["collectives"].items()))
    lines.append(
        f"| {r['program']} | {batch} | {_gib(mem['arguments'])} | "
        f"{_gib(mem['temporaries'])} | {_gib(mem['total'])} / "
        f"{_gib(r['hbm_capacity'])} | {'yes' if r['fits'] else '**no**'} | "
        f"{r['flops'] / 1e12:.2f} | {r['hbm_bytes'] / 1e9:.2f} | "
        f"{r['roofline_s'] * 1e3:.1f} | {shares[0]} | {shares[1]} | {coll} | "
        f"{r['compile_s']:.0f} |")
  if report.get("roofline_total_s"):
    lines += ["", f"Roofline sum over the phases' steps: "
              f"{report['roofline_total_s'] / 60:.1f} minutes (a compiler "
              "estimate and a lower bound, not a measurement)."]
  return "\n".join(lines)
