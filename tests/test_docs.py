"""Every fenced code block in README.md and docs/*.md runs, or says why not.

The convention: a block is either run by the tests or marked as not runnable
by an HTML comment on the line immediately before its opening fence,
``<!-- not-runnable: REASON -->``, with a reason. ```` ```text ```` blocks are
output and need no marker; MyST directives (```` ```{toctree} ````,
```` ```{eval-rst} ````) are Sphinx markup, not code, and are checked by
``sphinx-build -W`` instead. Any other unmarked block must be Python; the
Python blocks of each file run top to bottom in one namespace, in a
subprocess with 8 simulated CPU devices.

README's Quickstart block is the one exception: tests/test_readme.py runs it,
with checks on what it trains, so it is not run twice.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = sorted(ROOT.glob("docs/*.md")) + [ROOT / "README.md"]
TIMEOUT_S = 300
PYTHON = ("python", "py", "python3")
# Blocks run elsewhere, with stronger checks: (file, "## section title").
RUN_ELSEWHERE = {("README.md", "Quickstart"): "tests/test_readme.py"}

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*not-runnable:(?P<reason>.*?)-->\s*$")
# What a mistyped marker looks like ("not runnable", "not-runable", no colon).
_LIKE_MARKER = re.compile(r"^\s*<!--.*not[- _]?runn?able", re.I)


@dataclasses.dataclass
class Block:
  path: pathlib.Path
  line: int  # 1-based line of the opening fence
  info: str  # the info string ("python", "bash", "{toctree}", "")
  code: str
  section: str  # the enclosing "## " heading ("" before the first)
  marker: str | None  # the line before the fence, if it is a marker
  reason: str | None  # the marker's reason, stripped

  @property
  def language(self) -> str:
    return self.info.split()[0].lower() if self.info.split() else ""

  @property
  def where(self) -> str:
    return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse(path: pathlib.Path) -> list[Block]:
  """The fenced blocks of a Markdown file (CommonMark fences)."""
  lines = path.read_text().splitlines()
  blocks, section, i = [], "", 0
  while i < len(lines):
    line = lines[i]
    if line.startswith("## "):
      section = line[3:].strip()
    opening = _FENCE.match(line)
    if not opening:
      i += 1
      continue
    fence = opening["fence"]
    closing = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
    end = i + 1
    while end < len(lines) and not closing.match(lines[end]):
      end += 1
    if end == len(lines):
      raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: unclosed fence")
    before = lines[i - 1] if i else ""
    marker = _MARKER.match(before)
    blocks.append(Block(
        path=path, line=i + 1, info=opening["info"].strip(),
        code=textwrap.dedent("\n".join(lines[i + 1:end])) + "\n",
        section=section,
        marker=before if _LIKE_MARKER.match(before) else None,
        reason=marker["reason"].strip() if marker else None))
    i = end + 1
  return blocks


def _is_directive(block: Block) -> bool:
  return block.info.startswith("{")


def _runs_elsewhere(block: Block) -> bool:
  return (block.path.name, block.section) in RUN_ELSEWHERE


def runnable(path: pathlib.Path) -> list[Block]:
  return [b for b in parse(path)
          if b.language in PYTHON and b.reason is None
          and not _runs_elsewhere(b)]


def problems(path: pathlib.Path) -> list[str]:
  """What breaks the convention in one file."""
  found = []
  text = path.read_text().splitlines()
  fence_lines = {b.line - 1 for b in parse(path)}
  for n, line in enumerate(text, start=1):
    if _LIKE_MARKER.match(line):
      if not _MARKER.match(line):
        found.append(f"{path.relative_to(ROOT)}:{n}: malformed marker "
                     f"{line.strip()!r}; write <!-- not-runnable: REASON -->")
      elif n not in fence_lines:
        found.append(f"{path.relative_to(ROOT)}:{n}: marker not on the line "
                     "immediately before an opening fence")
  for block in parse(path):
    if block.marker is not None and block.reason is None:
      continue  # reported above as malformed
    if block.reason is not None:
      if not block.reason:
        found.append(f"{block.where}: not-runnable marker with no reason")
      continue
    if _is_directive(block) or block.language == "text":
      continue
    if block.language not in PYTHON:
      found.append(f"{block.where}: ```{block.info} block is neither run "
                   "nor marked <!-- not-runnable: REASON -->")
  return found


# --------------------------------------------------------------------------
# The convention itself.


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_block_is_run_or_marked_with_a_reason(path):
  assert not problems(path), "\n".join(problems(path))


def test_the_checker_catches_what_it_should(tmp_path, monkeypatch):
  monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
  md = tmp_path / "x.md"
  md.write_text("\n".join([
      "```bash", "pip install x", "```",                      # 1: unmarked
      "<!-- not-runnable:   -->", "```bash", "ls", "```",     # 5: no reason
      "<!-- not-runnable: needs a TPU pod -->", "```python", "x", "```",
      "```text", "output", "```",                              # exempt
      "```{toctree}", "api", "```",                            # directive
      "<!-- not-runable: typo -->", "```yaml", "a: 1", "```",  # 18: malformed
      "<!-- not-runnable: stray -->", "",                      # 22: stray
      "```", "no language", "```",                             # 24: unmarked
      "````python", "```", "print('inner fence')", "````",    # 4-tick python
  ]) + "\n")
  found = problems(md)
  assert [f.split(":")[1] for f in found] == ["18", "22", "1", "5", "24"]
  assert "no reason" in found[3] and "malformed" in found[0]
  assert "stray" not in found[1] and "immediately before" in found[1]
  blocks = parse(md)
  assert [b.language for b in runnable(md)] == ["python"]
  assert runnable(md)[0].code == "```\nprint('inner fence')\n"
  assert [b.reason for b in blocks][:3] == [None, "", "needs a TPU pod"]


def test_readme_quickstart_is_run_by_test_readme():
  # The block test_docs leaves out is run, with checks, by test_readme.
  for (name, section), test_file in RUN_ELSEWHERE.items():
    blocks = [b for b in parse(ROOT / name)
              if b.section == section and b.language in PYTHON]
    assert len(blocks) == 1 and blocks[0].reason is None, (name, section)
    assert f'_section("{section}")' in (ROOT / test_file).read_text()


# --------------------------------------------------------------------------
# Running the Python blocks.

_RUNNER = r"""
import json, sys
path, blocks = sys.argv[1], json.loads(sys.stdin.read())
namespace = {"__name__": "__main__"}
for line, code in blocks:
  # Pad so that tracebacks give the line numbers of the Markdown file.
  exec(compile("\n" * line + code, path, "exec"), namespace)
print(f"ran {len(blocks)} blocks of {path}")
"""

RUNNABLE = [p for p in FILES if runnable(p)]


@pytest.mark.parametrize("path", RUNNABLE,
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path, tmp_path):
  blocks = runnable(path)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=os.pathsep.join(
                 [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  proc = subprocess.run(
      [sys.executable, "-c", _RUNNER, str(path)], cwd=tmp_path, env=env,
      input=json.dumps([(b.line, b.code) for b in blocks]),
      capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
  assert proc.returncode == 0, (
      f"{path.relative_to(ROOT)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
  assert f"ran {len(blocks)} blocks" in proc.stdout
