"""Write README.md from nbs/index.ipynb, so that the two never disagree.

The README is the prose of the index notebook (its title, summary and Markdown cells; code cells
are left out since their output depends on the machine), with links to documentation pages
pointed at the notebooks that make them. `tests/test_readme.py` fails when README.md is stale:
run `python tools/readme.py` after editing the index notebook.
"""
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / 'nbs'


def readme_text() -> str:
    nb = json.loads((NBS / 'index.ipynb').read_text())
    from nbdev.config import nbpath2html
    pages = {nbpath2html(p).stem: p for p in NBS.glob('*.ipynb')}
    cells = [''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'markdown']
    text = '\n\n'.join(cells)
    text = re.sub(r'\]\(([\w-]+)\.html(#[^)]*)?\)',
                  lambda m: f'](nbs/{pages[m[1]].name})' if m[1] in pages else m[0], text)
    header = '<!-- Written by tools/readme.py from nbs/index.ipynb: edit the notebook, not this file. -->\n\n'
    return header + text.strip() + '\n'


if __name__ == '__main__':
    (ROOT / 'README.md').write_text(readme_text())
    print('README.md written from nbs/index.ipynb')
