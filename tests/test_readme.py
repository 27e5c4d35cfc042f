"""The README's quickstart runs and trains, and its test command matches CI."""

import pathlib
import re

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title):
  match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README,
                    re.M | re.S)
  assert match, f"README has no '## {title}' section"
  return match.group(1)


def test_quickstart_trains_and_reports_ratios(capsys):
  blocks = re.findall(r"```python\n(.*?)```", _section("Quickstart"), re.S)
  assert len(blocks) == 1
  namespace = {}
  exec(compile(blocks[0], "README-quickstart", "exec"), namespace)  # pylint: disable=exec-used
  losses = namespace["losses"]
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.3 * losses[0]
  ratios = namespace["ratios"]
  import jax
  leaves = jax.tree.leaves(ratios)
  assert leaves and all(np.asarray(r).dtype == np.float32 for r in leaves)
  # Masked leaves (biases, LayerNorm) keep r = 1; kernels are adapted.
  assert any(float(r) != 1.0 for r in leaves)
  assert "loss" in capsys.readouterr().out


def test_start_here_has_exactly_two_commands_and_ci_runs_the_second():
  block = re.search(r"```bash\n(.*?)```", _section("Start here"), re.S)
  commands = [l.split("#")[0].strip() for l in block.group(1).splitlines()
              if l.strip()]
  assert len(commands) == 2
  ci = (ROOT / ".ci" / "run").read_text()
  assert commands[1] in ci
  # The main job is the BERT example, with files that exist, installed by the
  # extras CI installs too.
  install, run = commands[0].split(" && ")
  assert install == 'pip install -e ".[test,examples]"'
  assert '-e ".[test,examples]"' in ci
  script, *flags = run.split()[1:]
  assert script == "examples/bert/main.py" and (ROOT / script).is_file()
  config = dict(f.lstrip("-").split("=", 1) for f in flags)["config"]
  assert config == "examples/bert/configs/default.py"
  assert (ROOT / config).is_file()


def test_the_quickstarts_are_the_size_the_readme_says():
  text = " ".join(_section("Start here").split())
  claimed_example = int(re.search(r"`configs/`: about (\d+) lines", text)[1])
  example = ROOT / "examples" / "quickstart"
  lines = sum(len(p.read_text().splitlines()) for p in example.rglob("*.py"))
  assert abs(lines - claimed_example) <= 0.1 * claimed_example, lines
  claimed_block = int(re.search(r"\(#quickstart\) below: (\d+) lines", text)[1])
  (block,) = re.findall(r"```python\n(.*?)```", _section("Quickstart"), re.S)
  assert len(block.splitlines()) == claimed_block
