"""Every entry point answers a mistaken command line with one line naming what is wrong and exit status 2.

One case per class of mistake (experiments/cli.py): a mistyped config field (with ml_collections'
suggestion), also nested and in another entry point; a missing config file; a config file that raises; a
value of the wrong type; a workdir that is a file; an invalid config value found by the library; a missing
checkpoint; flags that contradict each other; a value outside a flag's choices; an unparsable list flag.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lines that absl logging may write before the error (e.g. ml_collections' warnings): not part of the answer.
_ABSL_NOISE = re.compile(r"^([DIWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\] |WARNING: Logging before flag "
                         r"parsing goes to stderr\.$)")


def _run(module, *args, cwd=ROOT):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=300)


def _case(tmp_path, name):
  """(module, args, text the error line must contain) of one mistake; files it needs are made in tmp_path."""
  workdir = str(tmp_path / "run")
  tiny = os.path.join(ROOT, "experiments", "configs", "tiny.py")
  if name == "typo_field":
    return "experiments.train", [f"--workdir={workdir}", "--config.modle.preset=tiny"], \
        "--config.modle.preset: the config has no field 'modle'; did you mean 'model'?"
  if name == "typo_nested_field":   # generate, with an explicit config file
    return "experiments.generate", [f"--workdir={workdir}", f"--config={tiny}", "--config.mesh.dta=2",
                                    "--prompt=a"], \
        "--config.mesh.dta: the config has no field 'dta'; did you mean 'data'?"
  if name == "missing_config_file":
    return "experiments.train", [f"--workdir={workdir}", f"--config={tmp_path}/nope.py"], f"{tmp_path}/nope.py"
  if name == "config_file_raises":
    bad = tmp_path / "bad_config.py"
    bad.write_text("def get_config():\n  return undefined_name\n")
    return "experiments.train", [f"--workdir={workdir}", f"--config={bad}"], f"{bad}:2: NameError"
  if name == "wrong_type":
    return "experiments.train", [f"--workdir={workdir}", "--config.steps=abc"], \
        "flag --config.steps=abc: invalid literal for int()"
  if name == "workdir_is_a_file":
    (tmp_path / "file").write_text("")
    return "experiments.train", [f"--workdir={tmp_path}/file"], f"--workdir={tmp_path}/file"
  if name == "invalid_config_value":
    return "experiments.train", [f"--workdir={workdir}", "--config.max_to_keep=-1", "--config.steps=1",
                                 "--config.sample.num=0"], "max_to_keep"
  if name == "missing_checkpoint":
    return "experiments.convert", [f"--hf_dir={tmp_path}/none", f"--out={tmp_path}/out"], f"{tmp_path}/none"
  if name == "contradicting_flags":
    return "experiments.convert", ["--to_hf", f"--out={tmp_path}/out"], \
        "--to_hf reads one of --orbax_dir or --workdir"
  if name == "bad_choice":
    return "experiments.bench", ["--suite=nope"], "--suite=nope"
  if name == "bad_list":
    return "experiments.generate", ["--random_init", "--prompt_ids=1,x"], "--prompt_ids=1,x"
  raise ValueError(name)


@pytest.mark.parametrize("name", [
    "typo_field", "typo_nested_field", "missing_config_file", "config_file_raises", "wrong_type",
    "workdir_is_a_file", "invalid_config_value", "missing_checkpoint", "contradicting_flags", "bad_choice",
    "bad_list"])
def test_mistake_gets_one_line_and_exit_2(tmp_path, name):
  module, args, expected = _case(tmp_path, name)
  r = _run(module, *args)
  assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  # Exactly one line of its own, the last: everything before it is absl log lines.
  assert lines and lines[-1].startswith("error: "), r.stderr[-3000:]
  assert all(_ABSL_NOISE.match(l) for l in lines[:-1]), r.stderr[-3000:]
  assert expected in lines[-1], lines[-1]
