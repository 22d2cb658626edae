"The notebooks as a book: committed outputs, README generated from index.ipynb, the offline docs site in Chromium."
import ast, functools, http.server, re, sys, threading
from pathlib import Path

import nbformat, pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'tools'))
import docs  # noqa: E402

CHROMIUM = Path('/usr/bin/chromium')
CHROMIUM_ARGS = ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']
NOTEBOOKS = sorted((ROOT/'nbs').glob('*.ipynb'))
LIBRARY = [p for p in NOTEBOOKS if docs.is_library(nbformat.read(p, as_version=4))]
_TEMP_PATH = re.compile(r'/tmp/|/var/folders/|mhist-\w+-[a-z0-9_]{8}')


def test_cell_options_and_page_names():
    test_src = '#| echo: false\n#| output: asis\nshow_doc(f)'
    assert docs.cell_options(test_src) == {'echo': 'false', 'output': 'asis'}
    assert docs.cell_options('x = 1\n#| echo: false') == {}                  # options only at the top of a cell
    assert docs._flags('#| hide\n#| export\nx = 1') == {'hide', 'export'}
    assert (docs._html_name('03_metrics'), docs._html_name('index')) == ('metrics.html', 'index.html')


def test_readme_is_generated_from_index():
    assert docs.readme_drift() == [], 'README.md differs from nbs/index.ipynb: edit the notebook, then `make readme`'


def test_sidebar_lists_every_notebook_once():
    listed = [f for _, files in docs.sidebar() for f in files]
    assert sorted(listed) == sorted(p.name for p in NOTEBOOKS)


@pytest.mark.parametrize('path', LIBRARY, ids=lambda p: p.stem)
def test_library_chapter_committed_with_outputs(path):
    "The docs are built from stored outputs (`make outputs`): a chapter without any, or with run-specific paths, fails."
    nb = nbformat.read(path, as_version=4)
    outs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
    assert outs, f'{path.name} has no outputs: run `make outputs` and commit'
    text = '\n'.join(str(o.get('text', '')) + str(o.get('data', {}).get('text/plain', '')) for o in outs)
    assert not _TEMP_PATH.search(text), f'{path.name}: a temporary path in the outputs: {_TEMP_PATH.search(text)[0]!r}'


def _mixes_imports(src: str) -> bool:
    "nbdev's docs processor executes every cell holding an import (anywhere in it): such a cell must hold only imports."
    code = '\n'.join(l for l in src.splitlines() if not l.lstrip().startswith(('#|', '%', '!')))
    try: tree = ast.parse(code)
    except SyntaxError: return False
    has_import = any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree))
    return has_import and not all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body)


@pytest.mark.parametrize('path', LIBRARY, ids=lambda p: p.stem)
def test_library_imports_in_cells_of_their_own(path):
    nb = nbformat.read(path, as_version=4)
    bad = [i for i, c in enumerate(nb.cells) if c.cell_type == 'code' and _mixes_imports(c.source)
           and not re.search(r'^#\|\s*(export|exports|exporti)\b', c.source, re.M)]
    assert not bad, f'{path.name}: cells {bad} mix imports with other code (nbdev-proc-nbs would execute them)'


@functools.cache
def _serve(folder: str) -> str:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=folder)
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f'http://127.0.0.1:{srv.server_address[1]}'


@pytest.fixture(scope='module')
def site(tmp_path_factory, tiny_pipeline):
    reports, _, run = tiny_pipeline
    assert run.returncode == 0, run.stderr[-3000:]
    return docs.site(tmp_path_factory.mktemp('docs')/'_docs', reports)


def test_site_has_every_page(site):
    pages = {p.name for p in site.glob('*.html')}
    assert 'index.html' in pages and len(pages) == len(NOTEBOOKS)
    assert {'02_explore.html', '14_compare.html'} <= {p.name for p in (site/'reports').glob('*.html')}
    text = (site/'metrics.html').read_text()
    assert 'href="/' not in text and 'href="trainer.html"' in text          # relative links, so file:// works too
    assert 'def test_' not in (site/'index.html').read_text()


@pytest.mark.skipif(not CHROMIUM.is_file(), reason=f'{CHROMIUM} is absent: `make test-deps` installs Debian\'s chromium')
def test_site_renders_in_chromium(site):
    from playwright.sync_api import sync_playwright
    base = _serve(str(site))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page(viewport={'width': 1300, 'height': 900})
            pg.goto(f'{base}/index.html')
            nav = pg.locator('nav.mhist-nav a')
            assert nav.count() >= len(NOTEBOOKS)                           # every chapter, and the reports
            pg.get_by_role('link', name='Synthetic MHIST-format tiles').first.click()
            pg.wait_for_url(re.compile(r'synth\.html$'))
            assert pg.locator('header.mhist-title h1').inner_text().strip() != ''
            assert pg.locator('nav.mhist-nav a.current').inner_text().strip() != ''
            figures = pg.locator('main img')
            assert figures.count() > 0, 'no figure on the synth chapter'
            widths = pg.eval_on_selector_all('main img', 'els => els.map(e => e.complete ? e.naturalWidth : 0)')
            assert all(w > 0 for w in widths), f'figures that did not load: {widths}'
            pg.goto(f'{base}/reports/14_compare.html')
            assert pg.locator('nav.mhist-nav a').count() == nav.count()
            pg.locator('nav.mhist-nav a.site').click()
            pg.wait_for_url(re.compile(r'index\.html$'))
        finally:
            browser.close()
