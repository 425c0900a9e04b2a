"""Every command-line tool reports a usage error the same way: exit status 2, one `error:`
line, no traceback; and every flag of every tool has a help text."""

import argparse
import json
import os
import subprocess
import sys

import pytest
from tool_modules import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = ("convert_hf_to_megatron", "convert_megatron_to_hf", "preprocess_data", "generate", "evaluate")


def bad_invocations(tmp):
    """One mistake per tool, each caught by a different guard."""
    missing = os.path.join(tmp, "missing")
    return {
        "convert_hf_to_megatron": (["--hf-dir", tmp, "--megatron-dir", tmp + "/./", "--overwrite"],
                                   "is --hf-dir"),
        "convert_megatron_to_hf": (["--megatron-dir", missing, "--hf-dir", os.path.join(tmp, "hf")],
                                   "does not exist"),
        "preprocess_data": (["--input", f"a={missing}.jsonl", "--output-prefix", os.path.join(tmp, "c"),
                             "--tokenizer-model", missing], "does not exist"),
        "generate": (["--load", missing, "--prompt-ids", "1,2"], "does not exist"),
        "evaluate": (["--load", missing, "--tokenizer-model", missing, "--output-dir", tmp,
                      "--tasks", "passkey,bogus"], "unknown task 'bogus'"),
    }


# Runs each tool as its own `__main__` (its real exit path) in one interpreter, so that the
# Megatron import is paid once.
DRIVER = """
import json, runpy, sys
for name, argv in json.loads(sys.argv[1]):
    sys.argv = [name, *argv]
    print("=== " + name, file=sys.stderr, flush=True)
    try:
        runpy.run_path(name, run_name="__main__")
        status = 0
    except SystemExit as exit:
        status = exit.code
    print("=== exit %s" % status, file=sys.stderr, flush=True)
"""


def test_every_tool_exits_2_with_one_error_line(tmp_path):
    cases = bad_invocations(str(tmp_path))
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(PYTHONWARNINGS="ignore", PYTHONPATH=ROOT)
    argv = json.dumps([[os.path.join("tools", f"{name}.py"), a] for name, (a, _) in cases.items()])
    run = subprocess.run([sys.executable, "-c", DRIVER, argv], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    sections = run.stderr.split("=== tools/")[1:]
    assert len(sections) == len(cases), run.stderr[-3000:]
    for (name, (_, message)), section in zip(cases.items(), sections):
        errors = [line for line in section.splitlines() if line.startswith("error:")]
        assert section.rstrip().endswith("=== exit 2"), (name, section[-2000:])
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in section, (name, section)
    assert os.listdir(tmp_path) == []  # nothing written by any of them


@pytest.mark.parametrize("name", TOOLS)
def test_every_flag_has_help(name):
    parser = load_tool(name).build_parser()
    silent = [a.option_strings[0] for a in parser._actions
              if a.option_strings and not isinstance(a, argparse._HelpAction) and not a.help]
    assert silent == []
    assert "--help" in parser.format_help()  # every help string renders (no stray %)
