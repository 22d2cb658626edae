"""The docs site and README.md, built offline from the notebooks' committed outputs.

nbdev's own docs build is `nbdev-proc-nbs` (process the notebooks) followed by Quarto (render them); it runs in GitHub
Actions, where Quarto installs. Where Quarto is absent (this project's machines, a laptop without it) this script does
the same job with nbconvert:

    python tools/docs.py site [--out _docs] [--reports reports/demo]   # static site: chapters, experiments, reports
    python tools/docs.py readme                                         # README.md from nbs/index.ipynb
    python tools/docs.py readme --check                                 # exit 1 when README.md and index.ipynb differ

Nothing is re-executed but what nbdev itself runs to document the API: `nbdev-proc-nbs` executes a library chapter's
imports, exported cells and `show_doc` calls to render signatures and docstrings; every other output on a page is the one
committed with its notebook (`make outputs`). Experiment notebooks and the index are staged with `skip_showdoc`, so
nbdev runs none of their cells (their import cells would start a pipeline).
Quarto's cell options that nbdev writes (`#| echo: false`, `#| include: false`, `#| output: false`) are applied here by
a small nbconvert preprocessor written by hand: nbconvert does not read them.
"""
from __future__ import annotations
import argparse, html, re, shutil, subprocess, sys, tempfile
from pathlib import Path

import nbformat, yaml
from nbconvert import HTMLExporter, MarkdownExporter
from nbconvert.preprocessors import Preprocessor

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'
_OPT = re.compile(r'^#\|\s*([\w-]+)\s*:\s*(.*?)\s*$')
_DIRECTIVE = re.compile(r'^#\|')


def cell_options(src: str) -> dict:
    "Quarto/nbdev cell options (`#| key: value` lines at the top of a cell) as a dict."
    opts = {}
    for line in src.splitlines():
        if not _DIRECTIVE.match(line): break
        if m := _OPT.match(line): opts[m[1]] = m[2].strip().lower()
    return opts


class QuartoOptions(Preprocessor):
    "Apply the cell options Quarto would (include, echo, output) and drop the `#|` lines from what is shown."
    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type != 'code': return cell, resources
        o = cell_options(cell.source)
        if o.get('include') == 'false' or 'hide' in _flags(cell.source): cell.metadata['mhist_drop'] = True
        if o.get('echo') == 'false': cell.metadata.setdefault('transient', {})['remove_source'] = True
        if o.get('output') == 'false': cell.outputs = []
        cell.source = '\n'.join(l for l in cell.source.splitlines() if not _DIRECTIVE.match(l)).strip('\n')
        return cell, resources

    def preprocess(self, nb, resources):
        nb, resources = super().preprocess(nb, resources)
        nb.cells = [c for c in nb.cells if not c.metadata.get('mhist_drop')]
        return nb, resources


def _flags(src: str) -> set:
    "Bare nbdev directives such as `#| hide`."
    return {l[2:].strip() for l in src.splitlines() if _DIRECTIVE.match(l) and ':' not in l}


def is_library(nb) -> bool:
    "A library chapter exports a module (`#| default_exp`); experiment notebooks and the index do not."
    return any(c.cell_type == 'code' and re.search(r'^#\|\s*default_exp\b', c.source, re.M) for c in nb.cells)


def stage(root: Path, dest: Path) -> Path:
    "Copy what nbdev needs (pyproject, nbs/, the package) to `dest`; notebooks that export nothing marked `skip_showdoc`."
    for name in ('pyproject.toml', 'README.md'):
        if (root/name).exists(): shutil.copy2(root/name, dest/name)
    shutil.copytree(root/'mhist_nb', dest/'mhist_nb', ignore=shutil.ignore_patterns('__pycache__'))
    shutil.copytree(root/'nbs', dest/'nbs', ignore=shutil.ignore_patterns('.ipynb_checkpoints', '_proc', '_docs'))
    for p in (dest/'nbs').glob('*.ipynb'):
        nb = nbformat.read(p, as_version=4)
        if is_library(nb): continue
        nb.cells.insert(0, nbformat.v4.new_raw_cell('---\nskip_showdoc: true\n---'))
        nbformat.write(nb, p)
    return dest/'nbs'


def process(root: Path, work: Path) -> Path:
    "Run `nbdev-proc-nbs` on a copy of the notebooks staged in `work`; return its `_proc` folder."
    stage(root, work)
    exe = Path(sys.executable).parent/'nbdev-proc-nbs'
    r = subprocess.run([str(exe) if exe.exists() else 'nbdev-proc-nbs', '--n-workers', '0'], cwd=work,
                       capture_output=True, text=True)
    if r.returncode: raise RuntimeError(f'nbdev-proc-nbs failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}')
    return work/'_proc'


def frontmatter(nb) -> dict:
    "The YAML front matter nbdev puts in a processed notebook's first raw cell (title, description, output-file)."
    for c in nb.cells:
        if c.cell_type == 'raw' and c.source.lstrip().startswith('---'):
            return yaml.safe_load(c.source.strip().strip('-')) or {}
    return {}


def sidebar(nbs: Path = NBS) -> list[tuple[str, list[str]]]:
    "The sections of `nbs/sidebar.yml` as (section title, [notebook file names])."
    contents = yaml.safe_load((nbs/'sidebar.yml').read_text())['website']['sidebar']['contents']
    out = []
    for item in contents:
        if isinstance(item, dict): out.append((item['section'], list(item['contents'])))
        else: out.append(('', [item]))
    return out


_CSS = """
body{margin:0} .mhist-layout{display:flex;min-height:100vh}
nav.mhist-nav{width:15rem;flex:none;padding:1rem;background:#f6f8fa;border-right:1px solid #ddd;font:14px/1.5 system-ui,sans-serif}
nav.mhist-nav h2{font-size:13px;text-transform:uppercase;color:#555;margin:1rem 0 .3rem}
nav.mhist-nav a{display:block;color:#0b5cad;text-decoration:none;padding:1px 0} nav.mhist-nav a.current{font-weight:bold}
nav.mhist-nav .site{font-size:18px;font-weight:bold;color:#222} main.mhist-main{flex:1;min-width:0;padding:0 1rem}
header.mhist-title h1{margin-bottom:.2rem} header.mhist-title p{color:#555;margin-top:0}
"""


def _nav(pages: list[tuple[str, list[tuple[str, str]]]], current: str, prefix: str = '') -> str:
    out = [f'<nav class="mhist-nav" aria-label="chapters"><a class="site" href="{prefix}index.html">mhist_nb</a>']
    for section, items in pages:
        if section: out.append(f'<h2>{html.escape(section)}</h2>')
        for href, title in items:
            cls = ' class="current"' if href == current else ''
            out.append(f'<a{cls} href="{prefix}{href}">{html.escape(title)}</a>')
    return '\n'.join(out + ['</nav>'])


def _page(body: str, nav: str, title: str = '', description: str = '') -> str:
    "Wrap nbconvert's HTML in the site layout: the sidebar, the page title and relative links."
    head = f'<style>{_CSS}</style>'
    body = body.replace('</head>', head + '</head>', 1)
    top = f'<header class="mhist-title"><h1>{html.escape(title)}</h1><p>{html.escape(description)}</p></header>' if title else ''
    body = re.sub(r'(<body[^>]*>)', r'\1<div class="mhist-layout">' + nav.replace('\\', r'\\') + '<main class="mhist-main">'
                  + top.replace('\\', r'\\'), body, count=1)
    body = body.replace('</body>', '</main></div></body>', 1)
    body = _SOURCE_LINK.sub(_source_link, body)
    body = re.sub(r'href="/([^"/][^"]*)"', r'href="\1"', body)                   # nbdev's site-absolute links
    return re.sub(r'href="(\d\d_[\w]+|index)\.ipynb', lambda m: f'href="{_html_name(m[1])}', body)


_CELL_KEYS = {'code': {'cell_type', 'id', 'metadata', 'source', 'outputs', 'execution_count'},
              'markdown': {'cell_type', 'id', 'metadata', 'source', 'attachments'},
              'raw': {'cell_type', 'id', 'metadata', 'source', 'attachments'}}


def _plain_cell(cell):
    "`cell` without what nbdev's processing adds (`has_sd`, timing metadata), which nbformat's schema rejects."
    for k in set(cell) - _CELL_KEYS[cell.cell_type]: del cell[k]
    cell.metadata.pop('execution', None)
    return cell


_SOURCE_LINK = re.compile(r'<p><a href="([^"]*)">source</a>\{target="_blank" style="([^"]*)"\}</p>')


def _source_link(m) -> str:
    "show_doc's [source] link (Quarto attribute syntax) as HTML; dropped when no `git_url` makes it a full address."
    return f'<p><a href="{m[1]}" target="_blank" style="{m[2]}">source</a></p>' if m[1].startswith('http') else ''


def _html_name(stem: str) -> str:
    "nbdev's page name for a notebook: the number prefix dropped (`00_data` -> data.html)."
    return 'index.html' if stem == 'index' else re.sub(r'^\d+[a-z]?_', '', stem) + '.html'


def site(out: Path = ROOT/'_docs', reports: Path | None = ROOT/'reports'/'demo', root: Path = ROOT) -> Path:
    "Build the static docs site in `out`: every notebook of the sidebar, and the executed reports when present."
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix='mhist-docs-') as work:
        return _site(process(root, Path(work)), out, reports, root)


def _site(proc: Path, out: Path, reports: Path | None, root: Path) -> Path:
    if out.exists(): shutil.rmtree(out)
    out.mkdir(parents=True)
    sections, pages, nbs = sidebar(root/'nbs'), [], {}
    for section, files in sections:
        items = []
        for f in files:
            if not (proc/f).exists(): raise FileNotFoundError(f'nbs/sidebar.yml lists {f}, which is not in nbs/')
            nb = nbformat.read(proc/f, as_version=4)
            fm = frontmatter(nb)
            href = fm.get('output-file') or _html_name(Path(f).stem)
            if href in nbs: href = f'{Path(f).stem}.html'          # 09_explain and 15_explain are both `explain`
            nbs[href] = (nb, fm)
            if href != 'index.html': items.append((href, fm.get('title') or Path(f).stem))
        if items: pages.append((section, items))
    reps = sorted(Path(reports).glob('*.html')) if reports and Path(reports).is_dir() else []
    if reps:
        (out/'reports').mkdir()
        pages.append(('Reports (demo run)', [(f'reports/{p.name}', p.stem) for p in reps]))
    exporter = HTMLExporter(template_name='lab', exclude_input_prompt=True, exclude_output_prompt=True)
    exporter.register_preprocessor(QuartoOptions(), enabled=True)
    for href, (nb, fm) in nbs.items():
        nb.cells = [_plain_cell(c) for c in nb.cells if not (c.cell_type == 'raw' and c.source.lstrip().startswith('---'))]
        body, _ = exporter.from_notebook_node(nb, resources={'metadata': {'name': fm.get('title', href)}})
        (out/href).write_text(_page(body, _nav(pages, href), fm.get('title', ''), fm.get('description', '')))
    for p in reps:
        page = _page(p.read_text(), _nav(pages, f'reports/{p.name}', prefix='../'))
        (out/'reports'/p.name).write_text(page)
    return out


def readme(nb_path: Path = NBS/'index.ipynb') -> tuple[str, dict[str, bytes]]:
    "README.md's text from `index.ipynb` (markdown and outputs, chapter links into `nbs/`) and its figures by file name."
    nb = nbformat.read(nb_path, as_version=4)
    nb.cells = [c for c in nb.cells if c.cell_type != 'raw']
    exporter = MarkdownExporter(exclude_input_prompt=True, exclude_output_prompt=True)
    exporter.register_preprocessor(QuartoOptions(), enabled=True)
    body, res = exporter.from_notebook_node(nb, resources={'output_files_dir': FIGURES,
                                                           'unique_key': 'README'})
    body = re.sub(r'\]\((\d\d_\w+\.ipynb)', r'](nbs/\1', body)
    body = re.sub(r'!\[png\]\(', '![figure](', body)
    body = '\n'.join(l.rstrip() for l in body.splitlines())
    body = re.sub(r'\n{3,}', '\n\n', body).strip() + '\n'
    text = '<!-- Generated from nbs/index.ipynb by `make readme`: edit the notebook, not this file. -->\n\n' + body
    return text, {Path(k).name: v for k, v in (res.get('outputs') or {}).items()}


FIGURES = 'README_files'


def write_readme(root: Path = ROOT) -> Path:
    "Write README.md and its figures (README_files/) from nbs/index.ipynb."
    text, figures = readme(root/'nbs'/'index.ipynb')
    (root/'README.md').write_text(text)
    if (root/FIGURES).exists(): shutil.rmtree(root/FIGURES)
    if figures: (root/FIGURES).mkdir()
    for name, data in figures.items(): (root/FIGURES/name).write_bytes(data)
    return root/'README.md'


def readme_drift(root: Path = ROOT) -> list[str]:
    "What differs between README.md (+ its figures) and what nbs/index.ipynb generates; empty when they agree."
    text, figures = readme(root/'nbs'/'index.ipynb')
    out = [] if (root/'README.md').read_text() == text else ['README.md']
    have = {p.name: p.read_bytes() for p in (root/FIGURES).glob('*')} if (root/FIGURES).is_dir() else {}
    return out + sorted(n for n in set(have) | set(figures) if have.get(n) != figures.get(n))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = ap.add_subparsers(dest='cmd', required=True)
    s = sub.add_parser('site', help='build the static docs site')
    s.add_argument('--out', type=Path, default=ROOT/'_docs')
    s.add_argument('--reports', type=Path, default=ROOT/'reports'/'demo', help='executed reports to include, if present')
    r = sub.add_parser('readme', help='write README.md from nbs/index.ipynb')
    r.add_argument('--check', action='store_true', help='only compare; exit 1 when README.md differs')
    a = ap.parse_args(argv)
    if a.cmd == 'site':
        out = site(a.out, a.reports)
        print(f'docs site: {out/"index.html"} ({len(list(out.rglob("*.html")))} pages)')
    else:
        if a.check:
            if drift := readme_drift():
                sys.exit(f'{", ".join(drift)} differ(s) from nbs/index.ipynb: edit the notebook, then run `make readme`')
            print('README.md matches nbs/index.ipynb')
        else: print(f'wrote {write_readme()}')


if __name__ == '__main__':
    main()
