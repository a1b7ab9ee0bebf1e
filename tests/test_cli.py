"""The installed `infer` command, run in a subprocess as a user would run it."""
import shutil
import subprocess

import pytest

INFER = shutil.which('infer')
pytestmark = pytest.mark.skipif(INFER is None, reason='the `infer` command is not installed (pip install -e .)')


def infer(*args):
    return subprocess.run([INFER, *args], capture_output=True, text=True, timeout=300)


def test_help_lists_every_command():
    from infer.cli import COMMANDS
    res = infer('--help')
    assert res.returncode == 0
    for name, cmd in COMMANDS.items():
        assert name in res.stdout and cmd.help in res.stdout


def test_env_reports_the_platform():
    res = infer('env')
    assert res.returncode == 0, res.stderr
    assert 'platform: cpu' in res.stdout or 'platform: cuda' in res.stdout
    assert 'attention backend:' in res.stdout


@pytest.mark.parametrize('args', [(), ('frobnicate',), ('env', '--bogus'), ('--bogus',)])
def test_bad_invocation_is_one_line_and_a_hint_with_status_2(args):
    res = infer(*args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2, res.stderr
    assert 'error:' in lines[0]
    assert lines[1].startswith('Try `infer') and '--help' in lines[1]
    assert res.stdout == ''


def test_version():
    from infer import __version__
    res = infer('--version')
    assert res.returncode == 0 and res.stdout.strip() == f'infer {__version__}'
