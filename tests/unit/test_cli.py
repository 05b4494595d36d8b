from __future__ import annotations

import click
from click.testing import CliRunner

from halb.cli.main import cli

CTX = click.Context(cli)


def _get(group: click.Group, name: str) -> click.Command:
    # Through get_command: the top-level group loads its subcommands lazily.
    cmd = group.get_command(CTX, name)
    assert cmd is not None, name
    return cmd


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name in group.list_commands(CTX):
        cmd = _get(group, name)
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
        cmd: click.Command = cli
        for part in path:
            assert isinstance(cmd, click.Group)
            cmd = _get(cmd, part)
        assert cmd.help and len(cmd.help.strip()) > 15, path


def test_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and "halb" in result.output


def test_a_command_loads_only_its_own_module() -> None:
    """`halb failover` must not pay for importing the agent, the lab and the drill."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from halb.cli.main import cli\n"
        "r = CliRunner().invoke(cli, ['failover', '--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(' '.join(m for m in ('halb.agent.main', 'halb.lab.builder', 'halb.drill.run',"
        " 'halb.cli.cluster') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["halb.cli.cluster"]
