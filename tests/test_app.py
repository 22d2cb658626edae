"""The Streamlit page (mhist_nb/app.py, from nbs/21_app.ipynb), as a user meets it.

Every flow runs through Streamlit's `AppTest` on the toy ONNX models of `25_toy_models` (linear, so each P(SSA) is
known by hand) and a small synthetic MHIST-layout set: tiles picked at random, by class, by votes and by name, and
uploaded; each model and both; in process and through the HTTP API; an API that is down, a file that is not an image,
an image the server refuses, an occlusion map over its budget. A fresh interpreter shows the page imports no PyTorch.
Last, a real browser: `mhist serve` and `mhist app` on free loopback ports, driven headless by Playwright with Debian's
Chromium (`make test-deps` installs it; Playwright's own browser download is never used), the P(SSA) on the page
compared with the API's JSON for the same tile, and a screenshot kept in the test's folder."""
import io, json, os, re, shutil, signal, socket, subprocess, sys, textwrap, threading, time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
from PIL import Image

from conftest import BIN, free_port, mhist
from mhist_nb.app import ANNOTATION_COLUMNS, Settings, pick_tile, read_annotations
from mhist_nb.toy_models import expected_logit, png_bytes as png, toy_model_dir

APP = Path(__file__).resolve().parents[1]/'mhist_nb'/'app.py'
CHROMIUM = Path('/usr/bin/chromium')
CHROMIUM_ARGS = ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']



def expected_p(tile) -> float:
    return float(1 / (1 + np.exp(-expected_logit(tile))))



# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope='module')
def models(tmp_path_factory):
    return toy_model_dir(tmp_path_factory.mktemp('app')/'models')


@pytest.fixture(scope='module')
def table(synth_dir):
    return read_annotations(synth_dir)


@pytest.fixture(scope='module')
def reports(tmp_path_factory, synth_dir):
    """A reports folder as the pipeline leaves it, in miniature: a run file naming the dataset, an exploration figure
    and conclusion, both families' test predictions, a threshold study and the comparison's summary.md."""
    r = tmp_path_factory.mktemp('app')/'reports'; r.mkdir()
    rng = np.random.default_rng(0)
    y = (rng.random(200) < 0.37).astype(int)
    for fam, sep in (('mlp', 0.3), ('vit', 1.5)):
        (r/f'run_{fam}.json').write_text(json.dumps(dict(family=fam, data_dir=str(synth_dir))))
        p = 1 / (1 + np.exp(-(sep * (2 * y - 1) + rng.normal(0, 1, y.size))))
        pd.DataFrame(dict(name=[f'MHIST_{i:03d}.png' for i in range(y.size)], y=y, votes=0, p=p)).to_csv(
            r/f'predictions_{fam}_test.csv', index=False)
    (r/'threshold_vit.json').write_text(json.dumps(dict(rule='spec_at_sens', threshold=0.3)))
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(r/'class_balance.png')
    (r/'conclusion.md').write_text('* **63 tiles**, a stand-in conclusion')
    (r/'summary.md').write_text('# MLP vs ViT: summary\n\nPaired difference AUC(vit) − AUC(mlp) = **+0.312** [+0.250, +0.371], '
                                'p < 0.002: the difference is clear.\n')
    return r


@pytest.fixture(scope='module')
def api_url(models):
    "The API on the toy models, served from a thread of this process (werkzeug), on a free port."
    from werkzeug.serving import make_server
    from mhist_nb.api import ServeConfig, create_app
    server = make_server('127.0.0.1', 0, create_app(ServeConfig(model_dir=str(models), explain_budget_s=5.)), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{server.server_port}'
    server.shutdown()


@pytest.fixture
def page(monkeypatch, reports, models):
    "A function: the page under AppTest with the given MHIST_* settings (default: the stand-in reports, toy models)."
    from streamlit.testing.v1 import AppTest
    def make(**env):
        for var in Settings.ENV.values(): monkeypatch.delenv(var, raising=False)
        for k, v in {'MHIST_REPORTS': reports, 'MHIST_MODEL_DIR': models, **env}.items():
            if v is not None: monkeypatch.setenv(k, str(v))
        return AppTest.from_file(str(APP), default_timeout=60).run()
    return make


# ---------------------------------------------------------------- reading the page

def clean(at):
    "No traceback on the page, and no error message either."
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def shown_p(at) -> dict:
    "Model name -> the P(SSA) the page shows."
    return {m.label.split(' · ')[1]: float(m.value) for m in at.metric if m.label.startswith('P(SSA) · ')}


def tile_caption(at) -> str:
    captions = [i.proto.imgs[0].caption for i in at.image if re.match(r'\S+ · truth', i.proto.imgs[0].caption)]
    assert len(captions) == 1, captions
    return captions[0]


def shown_name(at) -> str: return tile_caption(at).split(' · ')[0]


def check_numbers(at, tile, names=('mlp', 'vit')):
    "The page shows each model's P(SSA) of `tile` (known by hand), to its 4 decimals."
    p = shown_p(at)
    assert sorted(p) == sorted(names), p
    for n in names: assert p[n] == pytest.approx(expected_p(tile), abs=6e-5), (n, p[n])


def dataset_array(synth_dir, name):
    return np.asarray(Image.open(Path(synth_dir)/'images'/name).convert('RGB'))


# ---------------------------------------------------------------- tiles from the dataset

def test_random_tile_both_models_in_process(page, synth_dir, table):
    at = page()                                          # the dataset folder comes from the reports' run files
    clean(at)
    assert at.text_input(key='data_dir').value == str(synth_dir)
    row = pick_tile(table, 'random', seed=0)
    assert tile_caption(at) == f"{row['name']} · truth {row['label']} ({row['votes']} of 7 chose SSA) · {row['partition']}"
    check_numbers(at, dataset_array(synth_dir, row['name']))
    calls = [m.value for m in at.markdown if m.value.startswith('call **')]
    assert len(calls) == 2 and all(re.search(r'→ \*\*(TP|FP|TN|FN)\*\*$', c) for c in calls), calls
    assert [c for c in at.caption if c.value.startswith('in-process call ')], 'no timings shown'
    at.button(key='another').click().run()               # the next draw
    clean(at)
    row = pick_tile(table, 'random', seed=1)
    assert shown_name(at) == row['name']
    check_numbers(at, dataset_array(synth_dir, row['name']))


@pytest.mark.parametrize('how,key,value', [('by class', 'pick_class', 'SSA'), ('by class', 'pick_class', 'HP'),
                                          ('by votes', 'pick_votes', None), ('by name', 'pick_name', None)])
def test_pick_tile(page, synth_dir, table, how, key, value):
    at = page()
    at.radio(key='pick').set_value(how).run()
    value = value if value is not None else {'pick_votes': int(table.votes.iloc[3]), 'pick_name': table.name.iloc[7]}[key]
    widget = dict(pick_class=at.radio, pick_votes=at.select_slider, pick_name=at.selectbox)[key]
    widget(key=key).set_value(value).run()
    clean(at)
    row = pick_tile(table, how, value, seed=0)
    caption = tile_caption(at)
    assert caption.startswith(f"{row['name']} · truth {row['label']} ({row['votes']} of 7")
    if how == 'by class': assert f'truth {value} ' in caption
    if how == 'by votes': assert f'({value} of 7 chose SSA)' in caption
    if how == 'by name': assert row['name'] == value
    check_numbers(at, dataset_array(synth_dir, row['name']))


def test_pick_with_no_match_is_a_warning(page, synth_dir, table, tmp_path):
    "A dataset whose two tiles have 0 and 7 votes: asking for 4 says so, and shows no stale answer."
    (tmp_path/'images').mkdir()
    t = table.head(2).assign(votes=[0, 7])
    for n in t.name: shutil.copy(Path(synth_dir)/'images'/n, tmp_path/'images'/n)
    t.rename(columns={v: k for k, v in ANNOTATION_COLUMNS.items()}).to_csv(tmp_path/'annotations.csv', index=False)
    at = page(MHIST_DATA_DIR=tmp_path)
    at.radio(key='pick').set_value('by votes').run()
    at.select_slider(key='pick_votes').set_value(4).run()
    assert not at.exception and not shown_p(at)
    assert [w.value for w in at.warning] == ['no tile with votes 4 in this dataset']
    at.select_slider(key='pick_votes').set_value(7).run()
    clean(at)
    assert '(7 of 7 chose SSA)' in tile_caption(at)


@pytest.mark.parametrize('via_api', [False, True], ids=['in-process', 'api'])
@pytest.mark.parametrize('which', ['mlp', 'vit'])
def test_each_model_alone(page, api_url, synth_dir, which, via_api):
    at = page(MHIST_API_URL=api_url if via_api else None)
    at.radio(key='models').set_value(which).run()
    clean(at)
    check_numbers(at, dataset_array(synth_dir, shown_name(at)), names=(which,))
    threshold = {'mlp': 0.4, 'vit': 0.6}[which]          # toy_model_dir's thresholds
    assert any(f'threshold {threshold:.3f} (spec_at_sens)' in c.value for c in at.caption)


def test_missing_dataset_folder_is_a_message(page, tmp_path):
    at = page(MHIST_DATA_DIR=tmp_path)
    assert not at.exception and not shown_p(at)
    assert any('no annotations.csv' in e.value for e in at.sidebar.error)


# ---------------------------------------------------------------- uploads

@pytest.mark.parametrize('fmt,mime', [('PNG', 'image/png'), ('TIFF', 'image/tiff'), ('JPEG', 'image/jpeg')])
def test_upload_unknown_tile(page, fmt, mime):
    a = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    data = png(a, fmt)
    at = page()
    at.radio(key='source').set_value('upload').run()
    assert any('Upload a tile' in i.value for i in at.info)
    at.file_uploader(key='upload').set_value((f'mine.{fmt.lower()}', data, mime)).run()
    clean(at)
    assert tile_caption(at) == f'mine.{fmt.lower()} · truth unknown'
    check_numbers(at, np.asarray(Image.open(io.BytesIO(data)).convert('RGB')))    # JPEG: what the server decodes
    assert [m.value for m in at.markdown if m.value.startswith('call **')][0].endswith('truth unknown')


def test_upload_of_a_dataset_tile_keeps_its_truth(page, synth_dir, table):
    row = table.iloc[4]
    at = page()
    at.radio(key='source').set_value('upload').run()
    at.file_uploader(key='upload').set_value((row['name'], (Path(synth_dir)/'images'/row['name']).read_bytes(), 'image/png')).run()
    clean(at)
    assert tile_caption(at).startswith(f"{row['name']} · truth {row['label']} ({row['votes']} of 7")


@pytest.mark.parametrize('via_api', [False, True], ids=['in-process', 'api'])
def test_bad_upload_is_a_message(page, api_url, via_api):
    at = page(MHIST_API_URL=api_url if via_api else None)
    at.radio(key='source').set_value('upload').run()
    at.file_uploader(key='upload').set_value(('notes.png', b'these are not pixels', 'image/png')).run()
    assert not at.exception and not shown_p(at)
    assert [e.value for e in at.error] == ['notes.png is not an image that can be read (UnidentifiedImageError); '
                                           'upload a PNG, JPEG or TIFF tile']
    # an image, but not a tile: the server's own rule, in its words
    at.file_uploader(key='upload').set_value(('small.png', png(np.zeros((100, 100, 3), np.uint8)), 'image/png')).run()
    assert not at.exception and not shown_p(at)
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and 'image is 100x100 pixels, the model takes 224x224 tiles' in errors[0], errors
    assert ('answered 422 (bad image)' in errors[0]) == via_api


# ---------------------------------------------------------------- through the API

def test_both_models_through_the_api(page, api_url, synth_dir):
    at = page(MHIST_API_URL=api_url)
    clean(at)
    name = shown_name(at)
    data = (Path(synth_dir)/'images'/name).read_bytes()
    r = requests.post(f'{api_url}/predict?model=both', files=dict(file=(name, data, 'image/png')), timeout=10).json()
    preds = r['results'][0]['predictions']
    assert shown_p(at) == {n: round(q['p_ssa'], 4) for n, q in preds.items()}
    assert [c for c in at.caption if c.value.startswith('round trip ')], 'no round-trip time shown'
    overlays = [i for i in at.image if i.proto.imgs[0].caption.startswith('red: evidence for SSA')]
    assert len(overlays) == 2                             # one occlusion map per model, from POST /explain


def test_api_down_is_a_message(page):
    port = free_port()                                    # nothing listens there
    at = page(MHIST_API_URL=f'http://127.0.0.1:{port}', MHIST_API_TIMEOUT='3')
    assert not at.exception and not shown_p(at)
    errors = [e.value for e in at.error]
    assert errors and all(f'cannot reach the API at http://127.0.0.1:{port}' in e for e in errors), errors
    assert len(errors) == 2                               # the classification and the models tab each say so


def test_slow_api_is_a_message(page):
    "A server that accepts the connection but never answers: the page gives up after MHIST_API_TIMEOUT and says so."
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); s.listen(8)                # connections wait in the backlog, unanswered
        t0 = time.monotonic()
        at = page(MHIST_API_URL=f'http://127.0.0.1:{s.getsockname()[1]}', MHIST_API_TIMEOUT='0.5')
        assert time.monotonic() - t0 < 10
    assert not at.exception and not shown_p(at)
    errors = [e.value for e in at.error]
    assert any('did not answer /predict within 0.5 s (MHIST_API_TIMEOUT)' in e for e in errors), errors


def test_bad_setting_is_a_message(page):
    at = page(MHIST_API_TIMEOUT='soon')
    assert not at.exception and [e.value for e in at.error] == ["MHIST_API_TIMEOUT='soon' is not a number of seconds"]


def test_missing_models_are_a_message(page, tmp_path):
    at = page(MHIST_MODEL_DIR=tmp_path/'nowhere')
    assert not at.exception and not shown_p(at)
    assert any('model folder or manifest not found' in e.value and 'MHIST_MODEL_DIR' in e.value for e in at.error)


# ---------------------------------------------------------------- the occlusion map

def test_occlusion_map_is_computed_once_and_reblended(page):
    at = page()
    clean(at)
    assert len([i for i in at.image if i.proto.imgs[0].caption.startswith('red: evidence')]) == 2
    assert len(at.session_state['explanations']) == 2
    at.slider(key='opacity').set_value(0.2).run()        # re-blends only
    assert len(at.session_state['explanations']) == 2
    at.select_slider(key='patch').set_value(56).run()    # a new map per model
    assert len(at.session_state['explanations']) == 4
    assert any('16 patches of 56 px' in i.proto.imgs[0].caption for i in at.image)
    at.toggle(key='explain').set_value(False).run()
    assert not [i for i in at.image if i.proto.imgs[0].caption.startswith('red: evidence')]
    clean(at)


def test_occlusion_over_budget_is_a_warning(page):
    at = page(MHIST_EXPLAIN_BUDGET_S='1e-9')
    at.select_slider(key='patch').set_value(16).run()    # 196 patches: more than one batch, so the budget is checked
    assert not at.exception and shown_p(at)              # the predictions stand
    warnings = [w.value for w in at.warning]
    assert len(warnings) == 2 and all('no occlusion map for' in w and 'over the budget' in w for w in warnings), warnings


# ---------------------------------------------------------------- the data and models tabs

def test_data_and_models_tabs(page, reports):
    at = page()
    clean(at)
    data, models = at.tabs[1], at.tabs[2]
    assert [i.proto.imgs[0].caption for i in data.get('image')] == ['Class balance per partition: SSA is the minority']
    assert any('63 tiles' in m.value for m in data.markdown)
    assert len(models.get('vega_lite_chart')) == 2        # the ROC curves with operating points; the paired difference
    roc = json.loads(models.get('vega_lite_chart')[0].proto.spec)
    points = roc['layer'][2]['data']['values']
    assert [(p['family'], p['rule'], p['threshold']) for p in points] == [('mlp', 'fixed', 0.5), ('vit', 'spec_at_sens', 0.3)]
    assert any(c.value.startswith('AUC(vit) − AUC(mlp) = +0.312 [+0.250, +0.371], p < 0.002') for c in models.caption)
    assert any('"both" means mlp, vit' in c.value for c in models.caption)


def test_empty_reports_folder_says_where_figures_come_from(page, tmp_path, synth_dir):
    at = page(MHIST_REPORTS=tmp_path, MHIST_DATA_DIR=synth_dir)
    clean(at)
    infos = ' '.join(i.value for i in at.info)
    assert 'No exploration figures' in infos and 'No test predictions' in infos and 'No summary.md' in infos


# ---------------------------------------------------------------- no torch

def test_page_loads_no_torch(models, reports, synth_dir):
    "The whole page, in a fresh interpreter, on toy models: PyTorch is never imported (the app image has none)."
    code = textwrap.dedent(f'''
        import os, sys, json
        os.environ.update(MHIST_REPORTS={str(reports)!r}, MHIST_MODEL_DIR={str(models)!r}, MHIST_DATA_DIR={str(synth_dir)!r})
        from streamlit.testing.v1 import AppTest
        at = AppTest.from_file({str(APP)!r}, default_timeout=60).run()
        assert not at.exception and not at.error and len(at.metric) == 2, (at.exception, at.error)
        print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m in ('mhist_nb.data', 'mhist_nb.models'))))
    ''')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def test_cli_app_loads_no_torch():
    code = ('import sys, json\nfrom mhist_nb.cli import main\ntry: main(["app", "--help"])\nexcept SystemExit: pass\n'
            'print(json.dumps([m for m in sys.modules if m.split(".")[0] in ("torch", "streamlit")]))')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1]) == [], r.stderr[-2000:]


# ---------------------------------------------------------------- a real browser

class Proc:
    "A `mhist` sub-command in its own process group, its output in a log file."
    def __init__(self, args, log: Path, env=None):
        self.log = log
        exe = shutil.which('mhist', path=str(BIN)) or shutil.which('mhist')
        self.p = subprocess.Popen([exe, *map(str, args)], stdout=log.open('wb'), stderr=subprocess.STDOUT,
                                  start_new_session=True, env=env)

    def wait_http(self, url, timeout=30.):
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if self.p.poll() is not None: pytest.fail(f'{self.log.name}: exited {self.p.returncode}:\n{self.log.read_text()[-3000:]}')
            try:
                if requests.get(url, timeout=2).status_code == 200: return
            except requests.RequestException: pass
            time.sleep(0.1)
        pytest.fail(f'{url}: no 200 within {timeout:g} s:\n{self.log.read_text()[-3000:]}')

    def stop(self):
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try: self.p.wait(15)
            except subprocess.TimeoutExpired: os.killpg(self.p.pid, signal.SIGKILL); self.p.wait(5)


def api_p(port, synth_dir, name) -> dict:
    "Model -> the API's P(SSA) for dataset tile `name`, to the 4 decimals the page shows."
    data = (Path(synth_dir)/'images'/name).read_bytes()
    r = requests.post(f'http://127.0.0.1:{port}/predict?model=both', files=dict(file=(name, data, 'image/png')), timeout=10)
    return {n: f"{q['p_ssa']:.4f}" for n, q in r.json()['results'][0]['predictions'].items()}


def page_state(pg) -> tuple[str | None, dict]:
    "The tile name and the model -> P(SSA) the browser shows now."
    m = re.search(r'(MHIST_\w+\.png) · truth', pg.inner_text('body'))
    shown = {}
    for el in pg.query_selector_all('[data-testid="stMetric"]'):
        label = el.query_selector('[data-testid="stMetricLabel"]').inner_text().strip()
        if label.startswith('P(SSA) · '):
            shown[label.split(' · ')[1]] = el.query_selector('[data-testid="stMetricValue"]').inner_text().strip()
    return (m[1] if m else None), shown


@pytest.mark.skipif(not CHROMIUM.is_file(), reason=f'{CHROMIUM} is absent: `make test-deps` installs Debian\'s chromium '
                                                   '(Playwright must not download its own browser)')
def test_browser_shows_the_apis_numbers(models, reports, synth_dir, tmp_path):
    from playwright.sync_api import sync_playwright
    env = {k: v for k, v in os.environ.items() if not k.startswith('MHIST_')}
    api_port, app_port = free_port(), free_port()
    api = Proc(['serve', '--models', models, '--port', api_port, '--workers', '1', '--threads', '1'], tmp_path/'api.log',
               {**env, 'TMPDIR': str(tmp_path), 'HOME': str(tmp_path)})
    app = Proc(['app', '--api', f'http://127.0.0.1:{api_port}', '--reports', reports, '--data-dir', synth_dir, '--port', app_port],
               tmp_path/'app.log', {**env, 'HOME': str(tmp_path)})
    shot = tmp_path/'app.png'
    try:
        api.wait_http(f'http://127.0.0.1:{api_port}/ready')
        app.wait_http(f'http://127.0.0.1:{app_port}/_stcore/health')
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                pg = browser.new_page(viewport={'width': 1400, 'height': 1250})
                pg.goto(f'http://127.0.0.1:{app_port}/', wait_until='domcontentloaded')
                pg.get_by_text('P(SSA) · vit').wait_for(timeout=20_000)
                first, _ = page_state(pg)
                pg.get_by_role('button', name='Another tile').click()          # pick another tile
                name, shown, expected = None, {}, {}
                t_end = time.monotonic() + 20
                while time.monotonic() < t_end:                                # until the rerun has drawn it all
                    name, shown = page_state(pg)
                    if name and name != first and len(shown) == 2 and pg.get_by_text('patches of 32 px').count() == 2:
                        expected = api_p(api_port, synth_dir, name)
                        if shown == expected: break
                    pg.wait_for_timeout(100)
                pg.screenshot(path=str(shot))
            finally:
                browser.close()
        assert name != first, f'the tile did not change from {first}'
        assert shown == expected, f'{name}: the page shows {shown}, the API answers {expected}'
        print(f'\nscreenshot of the page: {shot}')
    finally:
        app.stop(); api.stop()
    assert shot.is_file() and shot.stat().st_size > 10_000
