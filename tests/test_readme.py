"""README.md is written from nbs/index.ipynb and must not drift from it."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / 'tools' / f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_is_written_from_the_index_notebook():
    expected = load_tool('readme').readme_text()
    assert (ROOT / 'README.md').read_text() == expected, 'README.md is stale: run `python tools/readme.py`'


def test_readme_gives_exactly_two_commands():
    text = (ROOT / 'README.md').read_text()
    blocks = text.split('```sh\n')[1:]
    commands = [b.split('```')[0].strip() for b in blocks]
    assert len(commands) == 2, commands
    assert commands[0].endswith('&& infer demo') and 'pip install' in commands[0]
    assert commands[1] == 'pytest'
