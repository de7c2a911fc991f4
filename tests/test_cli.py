"""The CLI itself: fast start without torch or MLX, --version, `info`, errors as one clear message."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from conftest import make_hf_model
from llmctl import __version__
from llmctl.cli import app


def test_help_imports_neither_torch_nor_mlx():
    code = "import sys; from llmctl.cli import app; print(sorted(m for m in ('torch', 'mlx', 'transformers', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
    done = subprocess.run([sys.executable, "-m", "llmctl", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "train" in done.stdout and "info" in done.stdout


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"llmctl {__version__}"


def test_info_reports_spec_size_and_compute(tmp_path):
    make_hf_model("mixtral", tmp_path)
    result = CliRunner().invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "mixtral" in text and "4 experts, top-2" in text
    from llmctl.io.hf import load_spec

    spec = load_spec(tmp_path)
    assert f"({spec.param_count():,})" in text and f"({spec.active_param_count():,})" in text
    for label in ("fp32", "bf16", "8-bit", "4-bit", "FLOPs / token", "compute-optimal tokens"):
        assert label in text


def test_info_missing_folder_is_one_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["info", str(tmp_path / "nothing-here")])
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "does not exist" in text and "Traceback" not in text


def test_unknown_command_is_a_usage_error():
    result = CliRunner().invoke(app, ["frobnicate"])
    assert result.exit_code == 2


def test_top_help_names_only_commands_that_exist():
    """The commands DESIGN.md plans appear in `llmctl --help` (summary or list) only once they are registered."""
    from typer.testing import CliRunner

    from llmctl.cli import app

    registered = {command.name for command in app.registered_commands}
    result = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = result.output.lower()
    for name in registered:
        assert name in text, name
    planned = {"finetune-lora": ("finetune", "fine-tune"), "align": ("align",), "distill": ("distill",),
               "prune": ("prune",), "serve": ("serve",), "merge": ("merge",)}  # fmt: skip
    for command, words in planned.items():
        if command not in registered:
            assert not any(word in text for word in words), f"--help mentions {command}, which does not exist yet"
