"""Every notebook in `nbs/` is a test: its cells run top to bottom, and any failing cell fails it.

Cells flagged with one of the project's `tst_flags` (`#| slow`, `#| gpu`) are skipped;
`NB_FLAGS="slow gpu" pytest` runs them too.
"""
import os
from pathlib import Path

import pytest
from nbdev import config as nbdev_config
from nbdev import test as nbdev_test  # a module, not `test_nb` by name: pytest would collect it

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / 'nbs').glob('*.ipynb'))


@pytest.mark.parametrize('notebook', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook(notebook):
    skip_flags = nbdev_config.get_config(ROOT).tst_flags.split()
    force_flags = os.environ.get('NB_FLAGS', '').split()
    passed, _ = nbdev_test.test_nb(notebook, skip_flags=skip_flags, force_flags=force_flags, basepath=ROOT)
    assert passed, f'{notebook.name} failed: the traceback is printed above'


def test_every_notebook_is_found():
    assert {'index', '00_platforms', '90_cli'} <= {p.stem for p in NOTEBOOKS}
