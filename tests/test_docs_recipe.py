"""docs/recipe.md runs as written: its marked code blocks, in order, in one shell session.

The blocks run in a scratch copy of the checkout (every top-level entry linked, so outputs land
in the scratch ``runs/``), where ``.venv/bin/activate`` puts this test's Python first on PATH as
``python``: what ``source .venv/bin/activate`` does after ``make install``. Bash blocks run as
pasted into that shell; Python blocks as pasted into ``python`` started there. Each step is then
checked by what it printed and the files it wrote.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "recipe.md"
STEPS = ["setup", "tokenizer", "hf-model", "convert", "preprocess", "train", "export", "generate",
         "evaluate", "transformers"]
BLOCK = re.compile(r"<!-- recipe: ([\w-]+) -->\n```(bash|python)\n(.*?)\n```", re.S)
MARK = "@@ recipe step "
EOF_WORD = "RECIPE_PYTHON_BLOCK"


def recipe_blocks(text: str):
    """[(step name, language, code)] of the blocks marked ``<!-- recipe: NAME -->``."""
    return BLOCK.findall(text)


def session_script(blocks) -> str:
    lines = ["set -e"]
    for name, lang, code in blocks:
        lines.append(f"echo {shlex.quote(MARK + name)}")
        if lang == "bash":
            lines.append(code)
        else:  # pasted into `python` in the same shell
            assert EOF_WORD not in code
            lines += [f"python - <<'{EOF_WORD}'", code, EOF_WORD]
    return "\n".join(lines) + "\n"


def scratch_checkout(path: Path) -> Path:
    for entry in ROOT.iterdir():
        if entry.name not in (".git", ".venv", "runs"):
            (path / entry.name).symlink_to(entry)
    bin_dir = path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    # A wrapper, not a symlink: the interpreter must still find its own environment.
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    (bin_dir / "activate").write_text(f'export VIRTUAL_ENV={shlex.quote(str(path / ".venv"))}\n'
                                      f'export PATH="$VIRTUAL_ENV/bin:$PATH"\n')
    return path


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """Runs the page once; returns (its runs/recipe, {step: its output}, failed step, message)."""
    blocks = recipe_blocks(PAGE.read_text())
    work = scratch_checkout(tmp_path_factory.mktemp("checkout"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("VIRTUAL_ENV", None)
    run = subprocess.run(["bash", "-e", "-c", session_script(blocks)], cwd=work, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    outputs, current = {}, None
    for line in run.stdout.splitlines():
        if line.startswith(MARK):
            current = line[len(MARK):]
            outputs[current] = ""
        elif current is not None:
            outputs[current] += line + "\n"
    failed = current if run.returncode else None
    message = f"step {failed!r} exited {run.returncode}:\n{outputs.get(failed, run.stdout)[-4000:]}"
    return work / "runs" / "recipe", outputs, failed, message


def test_the_page_marks_every_step_once():
    blocks = recipe_blocks(PAGE.read_text())
    assert [name for name, _, _ in blocks] == STEPS
    assert blocks[0][2].splitlines()[0] == "source .venv/bin/activate"


def step_output(recipe, name):
    """The step's output, once it exited 0."""
    runs, outputs, failed, message = recipe
    if name == failed or name not in outputs:
        pytest.fail(message if name == failed else f"step {name!r} never ran; {message}")
    return runs, outputs[name]


def read_json(path):
    return json.loads(Path(path).read_text())


def test_setup(recipe):
    runs, _ = step_output(recipe, "setup")
    assert runs.is_dir()


def test_tokenizer(recipe):
    runs, _ = step_output(recipe, "tokenizer")
    assert (runs / "tiny-llama-hf" / "tokenizer.model").stat().st_size > 0


def test_hf_model(recipe):
    runs, _ = step_output(recipe, "hf-model")
    hf = runs / "tiny-llama-hf"
    assert read_json(hf / "config.json")["num_hidden_layers"] == 6
    assert (hf / "model.safetensors").is_file() and (hf / "tokenizer_config.json").is_file()


def test_convert(recipe):
    runs, out = step_output(recipe, "convert")
    record = read_json(runs / "tiny-mcore" / "longgen_config.json")
    assert record["longgen"]["sparse_attention"] == "attn_sink"
    assert record["longgen"]["full_attention_layers"] == [2, 3]
    assert float(record["longgen"]["rotary_base"]) == 20000
    assert "wrote runs/recipe/tiny-mcore" in out


def test_preprocess(recipe):
    runs, out = step_output(recipe, "preprocess")
    assert "blend file: runs/recipe/data/corpus_blend.json" in out
    for source in ("essays", "stories"):
        assert (runs / "data" / f"corpus_{source}_document.bin").stat().st_size > 0


def test_train(recipe):
    runs, out = step_output(recipe, "train")
    assert "loaded runs/recipe/tiny-mcore at iteration 0 (weights only)" in out
    assert re.search(r"^iter 4/4 \| lm loss \d", out, re.M)
    assert re.search(r"^validation at iter 4: lm loss \d", out, re.M)
    assert (runs / "longgen-tiny" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"


def test_export(recipe):
    runs, out = step_output(recipe, "export")
    assert re.search(r"^verify OK:", out, re.M)
    config = read_json(runs / "longgen-tiny-hf" / "config.json")
    assert config["model_type"] == "longgen" and config["full_attention_layers"] == [2, 3]
    assert (runs / "longgen-tiny-hf" / "modeling_longgen.py").is_file()
    assert (runs / "longgen-tiny-hf" / "tokenizer.model").is_file()


def test_generate(recipe):
    _, out = step_output(recipe, "generate")
    assert re.search(r"^\[0\] .+", out, re.M)


def test_evaluate(recipe):
    runs, out = step_output(recipe, "evaluate")
    report = read_json(runs / "eval" / "report.json")
    assert "passkey" in json.dumps(report)
    assert (runs / "eval" / "summary.md").is_file()
    assert "| 192-255 |" in out  # the last perplexity bucket of 256 tokens


def test_transformers(recipe):
    _, out = step_output(recipe, "transformers")
    assert re.search(r"^LongGenForCausalLM '", out, re.M)
