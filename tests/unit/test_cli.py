from __future__ import annotations

import click
from click.testing import CliRunner

from halb.cli.main import cli


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in group.commands.items():
        out.append((*prefix, name))
        if isinstance(cmd, click.Group):
            out.extend(_commands(cmd, (*prefix, name)))
    return out


def test_every_command_has_a_help_that_explains_it() -> None:
    runner = CliRunner()
    commands = _commands(cli)
    assert ("config", "validate") in commands and ("lab", "up") in commands
    for path in commands:
        result = runner.invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.output
        # The first help line is a real sentence, not empty.
        cmd = cli
        for part in path:
            assert isinstance(cmd, click.Group)
            cmd = cmd.commands[part]
        assert cmd.help and len(cmd.help.strip()) > 15, path


def test_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and "halb" in result.output
