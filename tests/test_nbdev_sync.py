"""What nbdev's own CI checks: the exported package matches the notebooks, and the notebooks are clean.

Runs `nbdev-export` and `nbdev-clean` on a copy of the project and compares the result with the files as they are."""
import shutil, subprocess, sys
from pathlib import Path
from conftest import ROOT

BIN = Path(sys.executable).parent


def _copy_project(dst):
    for name in ('pyproject.toml', 'README.md'):
        if (ROOT/name).exists(): shutil.copy(ROOT/name, dst/name)
    shutil.copytree(ROOT/'nbs', dst/'nbs', ignore=shutil.ignore_patterns('.ipynb_checkpoints'))
    shutil.copytree(ROOT/'mhist_nb', dst/'mhist_nb', ignore=shutil.ignore_patterns('__pycache__'))


def _files(root):
    return {p.relative_to(root): p.read_bytes() for d in ('nbs', 'mhist_nb') for p in sorted((root/d).rglob('*'))
            if p.is_file() and '__pycache__' not in p.parts and '.ipynb_checkpoints' not in p.parts}


def test_package_in_sync_and_notebooks_clean(tmp_path):
    _copy_project(tmp_path)
    before = _files(tmp_path)
    for cmd in ('nbdev-export', 'nbdev-clean'):
        r = subprocess.run([str(BIN/cmd)], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    after = _files(tmp_path)
    changed = sorted(str(k) for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f'run nbdev-export and nbdev-clean, then commit: these files change: {changed}'


def test_parameters_tag_survives_cleaning():
    import nbformat
    nb = nbformat.read(ROOT/'nbs'/'02_explore.ipynb', as_version=4)
    assert any('parameters' in c.metadata.get('tags', []) for c in nb.cells)
