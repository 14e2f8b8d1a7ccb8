"""The `npcd` command line: the subcommand registry, `personas check`, and `say` against a real daemon."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from server_helpers import engine_config, running_daemon, write_persona

from npcd import cli


def test_every_registered_command_has_the_module_interface():
    for name, spec in cli.COMMANDS.items():
        module = importlib.import_module(spec.module)
        assert spec.help and callable(module.add_arguments) and callable(module.run), name
    assert {"serve", "say", "personas", "train", "eval", "demo", "loadtest"} <= set(cli.COMMANDS)


def test_a_command_imports_only_its_own_module(monkeypatch, tmp_path, capsys):
    broken = tmp_path / "npcd_broken_command.py"
    broken.write_text("raise ImportError('this command is broken')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "broken", cli.Command("npcd_broken_command", "a command that fails to import"))
    assert cli.main(["personas", "check", str(tmp_path)]) == 0  # unaffected by the broken one
    with pytest.raises(ImportError, match="this command is broken"):
        cli.main(["broken"])
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "a command that fails to import" in capsys.readouterr().out


def test_help_needs_no_model_or_torch():
    code = "import sys; from npcd import cli; [cli.build_parser(c) for c in cli.COMMANDS]; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_personas_check_reports_errors_and_exits_nonzero(tmp_path, capsys):
    write_persona(tmp_path, "elf")
    (tmp_path / "orc.yaml").write_text("id: orc\ndisplay_name: Orc\ndescription: x\nsystem_prompt: x\n"
                                       "sampling: {temperature: 3.5}\n")
    assert cli.main(["personas", "check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "ok     elf" in out
    assert "orc.yaml:5: sampling.temperature: must be between 0 and 2, got 3.5" in out
    assert "1 persona(s) valid, 1 error(s)" in out
    (tmp_path / "orc.yaml").unlink()
    assert cli.main(["personas", "check", str(tmp_path)]) == 0


def test_personas_check_of_a_missing_directory(tmp_path, capsys):
    assert cli.main(["personas", "check", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["say"])
    assert info.value.code == 2


def test_say_and_personas_against_a_running_daemon(tmp_path, tiny_model_dir, capsys):
    write_persona(tmp_path, "elf")
    with running_daemon(tmp_path, engine_config(tiny_model_dir)) as (daemon, _):
        assert cli.main(["say", "elf", "Hello!", "--address", daemon.address, "--max-tokens", "5",
                         "--context", "location=forest"]) == 0
        captured = capsys.readouterr()
        assert captured.out.strip() and "[length, 5 tokens" in captured.err
        assert cli.main(["say", "dragon", "Hello!", "--address", daemon.address]) == 1
        assert "NOT_FOUND: unknown persona 'dragon'" in capsys.readouterr().err
        assert cli.main(["personas", "--address", daemon.address]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split() == ["ID", "STATUS", "ADAPTER", "SOURCE", "/", "ERROR"]
        assert table[1].split()[:3] == ["elf", "READY", "-"]
        address = daemon.address
    assert cli.main(["say", "elf", "Hello!", "--address", address]) == 1
    assert "no daemon answers at" in capsys.readouterr().err


def test_say_with_actions_streams_the_line_then_the_choice(tmp_path, tiny_model_dir, capsys):
    write_persona(tmp_path, "trader", extra="emotions: [calm, greedy]\nactions:\n  - name: sell\n"
                                            "    args: {type: object, properties: {item: {enum: [sword]}}}\n")
    with running_daemon(tmp_path, engine_config(tiny_model_dir)) as (daemon, _):
        assert cli.main(["say", "trader", "I'd like a sword", "--actions", "--address", daemon.address]) == 0
    out = re.findall(r"\[(?:emotion|action): [^\]]*\]", capsys.readouterr().out)  # the daemon logs here too
    assert out[0] in ("[emotion: calm]", "[emotion: greedy]")
    assert out[1:] == ['[action: sell {"item": "sword"}]']  # the only action, and its only argument value


def test_say_local_starts_its_own_daemon(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("NPCD_CONVERSATIONS", str(tmp_path / "conversations.sqlite3"))  # not beside npcd.yaml
    (tmp_path / "p").mkdir()
    write_persona(tmp_path / "p", "elf")
    engine = tmp_path / "engine.yaml"
    engine.write_text(f"base: {tiny_model_dir}\nweights: fp32\ndevice: cpu\nmax_batch_size: 2\nthreads: 2\n")
    assert cli.main(["say", "elf", "Hi", "--local", "--personas", str(tmp_path / "p"), "--engine", str(engine),
                     "--max-tokens", "4"]) == 0
    assert "[length, 4 tokens" in capsys.readouterr().err


def test_the_example_client_streams_a_line(tmp_path, tiny_model_dir):
    write_persona(tmp_path, "blacksmith")
    example = Path(__file__).resolve().parents[2] / "examples" / "python_client.py"
    with running_daemon(tmp_path, engine_config(tiny_model_dir)) as (daemon, _):
        out = subprocess.run([sys.executable, str(example), "blacksmith", daemon.address],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().endswith("ms]") and "[8 tokens," in out.stdout


def test_output_piped_into_a_reader_that_leaves_early_is_no_error(tmp_path):
    for i in range(400):  # more lines than a pipe buffer holds, so the writer sees the reader go
        (tmp_path / f"p{i:03d}.yaml").write_text(f"id: p{i:03d}\n")
    proc = subprocess.Popen([sys.executable, "-m", "npcd.cli", "personas", "check", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"error")
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
