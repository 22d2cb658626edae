"The exploration notebook run headless through `mhist explore` (papermill), as `make demo` does."
import json
import nbformat
from conftest import mhist

FIGURES = ['class_balance', 'agreement', 'samples', 'colour_histograms']


def test_explore_report(synth_dir, tmp_path):
    out = tmp_path/'report'
    r = mhist('explore', '--data-dir', synth_dir, '--out-dir', out, '--quiet')
    assert r.returncode == 0, r.stderr[-3000:]
    for f in FIGURES: assert (out/f'{f}.png').stat().st_size > 5000, f
    nb = nbformat.read(out/'02_explore.ipynb', as_version=4)
    assert any('injected-parameters' in c.metadata.get('tags', []) for c in nb.cells)
    assert (out/'02_explore.html').stat().st_size > 10000
    images = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs if 'image/png' in o.get('data', {})]
    assert len(images) >= len(FIGURES)          # shown inline as well as saved
    concl = (out/'conclusion.md').read_text()
    import pandas as pd
    n = len(pd.read_csv(synth_dir/'annotations.csv'))
    assert f'**{n} tiles**' in concl
    stats = pd.read_csv(out/'channel_stats.csv', index_col=0)
    assert ((stats['mean'] > 0) & (stats['mean'] < 1)).all()


def test_explore_reports_invalid_data(tmp_path):
    bad = tmp_path/'bad'; (bad/'images').mkdir(parents=True)
    (bad/'annotations.csv').write_text('Image Name,Partition\nMHIST_aaa.png,train\n')
    r = mhist('explore', '--data-dir', bad, '--out-dir', tmp_path/'out', '--quiet')
    assert r.returncode == 1
    assert 'MHISTError' in r.stderr and 'missing column' in r.stderr
    assert (tmp_path/'out'/'02_explore.ipynb').exists()      # the partial notebook is kept
