"""The documentation site builds offline, has a page per notebook with its API, and no dead link."""
import json
import shutil
from pathlib import Path

import pytest

from test_readme import load_tool

ROOT = Path(__file__).resolve().parent.parent
docs = load_tool('docs')


def test_site_builds_with_a_page_per_notebook_and_no_dead_links():
    problems = docs.build()
    assert problems == [], '\n'.join(problems)
    for nb in (ROOT / 'nbs').glob('*.ipynb'):
        assert (docs.SITE / f'{docs.page_name(nb)}.html').exists(), nb.name
    html = (docs.SITE / 'platforms.html').read_text()
    assert 'id="resolve_platform"' in html and '<img' in html  # API docs and the notebook's figure


def test_the_check_catches_a_dead_link_and_a_missing_api_entry(tmp_path, monkeypatch):
    site = tmp_path / 'site'
    site.mkdir()
    (site / 'index.html').write_text('<a href="platforms.html#x">ok</a> <a href="gone.html">dead</a>')
    (site / 'platforms.html').write_text('<h3 id="platform">Platform</h3>')
    monkeypatch.setattr(docs, 'SITE', site)
    problems = docs.check_site([('Home', 'index.md'), ('Platforms', 'platforms.md'), ('CLI', 'cli.md')],
                               {'platforms': ['Platform', 'Probes']})
    assert problems == ['no page for cli.md', 'platforms.html: no API entry for Probes', 'index.html: dead link gone.html']
