"""Serving, end to end: the torch-free modules in a fresh interpreter, parity of the Predictor with training (transform
and saved predictions of the shared tiny pipeline), real gunicorn servers (metrics across workers, a worker killed under
load, a bad model refused at start), AWS Lambda events of the documented shapes, and the serving image's environment
(`pip install --no-deps` + the serve requirements, no torch) built for real."""
import base64, json, os, re, shutil, signal, subprocess, sys, textwrap, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import BIN, ROOT, free_port, mhist
from mhist_nb.toy_models import png_bytes as png

HEAVY = ('torch', 'mhist_nb.models', 'mhist_nb.trainer', 'mhist_nb.data', 'mhist_nb.export', 'pandas', 'mlflow')



def tiles(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(n)]



@pytest.fixture(scope='module')
def toy_models(tmp_path_factory):
    from mhist_nb.toy_models import toy_model_dir
    return toy_model_dir(tmp_path_factory.mktemp('toy')/'models')


# ---- torch-free ----

def test_serving_modules_load_no_torch(toy_models):
    code = textwrap.dedent(f'''
        import json, sys, io
        import numpy as np
        from PIL import Image
        import mhist_nb.serve, mhist_nb.api, mhist_nb.aws_lambda, mhist_nb.gunicorn_conf
        from mhist_nb.api import create_app, ServeConfig
        app = create_app(ServeConfig(model_dir={str(toy_models)!r}))
        b = io.BytesIO(); Image.fromarray(np.zeros((224, 224, 3), np.uint8)).save(b, 'PNG')
        r = app.test_client().post('/predict', data=b.getvalue(), content_type='image/png')
        assert r.status_code == 200, r.get_data()
        print(json.dumps([m for m in sys.modules if m.split('.')[0] == 'torch' or m in {HEAVY!r}]))
    ''')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize('args', [['predict', '--help'], ['serve', '--help']])
def test_cli_serving_commands_load_no_torch(args):
    code = ('import sys, json\nfrom mhist_nb.cli import main\ntry: main(%r)\nexcept SystemExit: pass\n'
            'print(json.dumps([m for m in sys.modules if m.split(".")[0] == "torch" or m in %r]))' % (args, HEAVY))
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [], f'mhist {" ".join(args)} imports heavy modules'


# ---- parity with training, on the shared tiny pipeline ----

def test_predictor_matches_training(tiny_pipeline):
    "The Predictor's input equals the training transform's (eval) on the same PNGs, its P(SSA) the saved fp32 predictions."
    import pandas as pd, torch
    from mhist_nb.data import make_transform
    from mhist_nb.serve import Predictor, decode_image, preprocess
    out, _, r = tiny_pipeline
    assert r.returncode == 0, r.stderr[-3000:]
    pred = Predictor(out)
    assert {'mlp', 'vit', 'mlp.int8', 'vit.int8'} <= set(pred.models) and pred.default == ['mlp', 'vit']
    for fam in ('mlp', 'vit'):
        run = json.loads((out/f'run_{fam}.json').read_text())
        val = pd.read_csv(out/f'predictions_{fam}_val.csv')
        files = [Path(run['data_dir'])/'images'/n for n in val.name]
        data = [f.read_bytes() for f in files]
        m = pred.models[fam][0]
        np.testing.assert_allclose(m['mean'], run['mean'], atol=1e-9)
        x = preprocess(np.stack([decode_image(b) for b in data[:16]]), m)
        raw = torch.stack([torch.from_numpy(np.array(Image.open(f).convert('RGB'))).permute(2, 0, 1) for f in files[:16]])
        ref = make_transform(run['mean'], run['std'])(raw).numpy()
        assert np.abs(x - ref).max() <= 2e-6
        res = pred.predict(data, fam)
        p = np.array([q[fam]['p_ssa'] for q in res])
        assert np.abs(p - val.p.to_numpy()).max() <= 1e-4
        thr = m['threshold']
        assert [q[fam]['label'] for q in res] == ['SSA' if v >= thr else 'HP' for v in p]
        assert {q[fam]['version'] for q in res} == {m['sha256'][:12]}


# ---- a real gunicorn ----

GUNICORN = [str(BIN/'gunicorn'), '-c', 'python:mhist_nb.gunicorn_conf', 'mhist_nb.api:create_app()']


def start(models, tmp_path, workers=2, **env):
    port = free_port()
    e = dict(os.environ, MHIST_MODEL_DIR=str(models), MHIST_BIND=f'127.0.0.1:{port}', MHIST_WORKERS=str(workers),
             MHIST_THREADS='1', PROMETHEUS_MULTIPROC_DIR=str(tmp_path/'prom'), **env)
    (tmp_path/'prom').mkdir(exist_ok=True)
    p = subprocess.Popen(GUNICORN, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    return p, f'http://127.0.0.1:{port}'


def wait_ready(p, url, timeout=30):
    t = time.time()
    while time.time() - t < timeout:
        if p.poll() is not None: raise AssertionError(f'gunicorn exited ({p.returncode}): {p.stderr.read()[-3000:]}')
        try:
            if requests.get(url + '/ready', timeout=1).status_code == 200: return
        except requests.ConnectionError: pass
        time.sleep(0.05)
    raise AssertionError('not ready in time')


def stop(p):
    try: os.killpg(p.pid, signal.SIGTERM); p.wait(10)
    except Exception: os.killpg(p.pid, signal.SIGKILL)


def workers_of(p) -> set:
    import psutil
    return {c.pid for c in psutil.Process(p.pid).children()}


def post(url, data, **kw):
    return requests.post(url + '/predict', data=data, headers={'Content-Type': 'image/png', 'Connection': 'close'},
                         timeout=10, **kw)


def test_gunicorn_metrics_count_every_worker(toy_models, tmp_path):
    p, url = start(toy_models, tmp_path)
    try:
        wait_ready(p, url)
        body, codes = png(tiles(1)[0]), []
        answered = lambda: {int(m.group(1)) for f in (tmp_path/'prom').iterdir() if (m := re.match(r'counter_(\d+)\.db', f.name))}
        deadline = time.time() + 30                # the second worker may still be loading when /ready first answers
        while len(answered()) < 2 and time.time() < deadline:
            with ThreadPoolExecutor(8) as ex: codes += list(ex.map(lambda _: post(url, body).status_code, range(40)))
        assert codes == [200] * len(codes)
        assert len(answered()) >= 2, 'both workers should have answered'  # else the sum below proves nothing
        for _ in range(6):                                                 # whichever worker answers, it sums all
            txt = requests.get(url + '/metrics', headers={'Connection': 'close'}, timeout=5).text
            n = re.search(r'mhist_requests_total\{model="both",route="/predict",status="200"\} (\S+)', txt)
            assert n and float(n.group(1)) == len(codes), txt[:1500]
    finally: stop(p)


def test_gunicorn_replaces_a_killed_worker(toy_models, tmp_path):
    p, url = start(toy_models, tmp_path)
    try:
        wait_ready(p, url)
        deadline = time.time() + 20                                  # the second worker may still be forking
        while len(workers_of(p)) < 2 and time.time() < deadline: time.sleep(0.05)
        body, before = png(tiles(1)[0]), workers_of(p)
        assert len(before) == 2
        results = []
        def load():
            for _ in range(60):
                try: results.append(post(url, body).status_code)
                except requests.RequestException: results.append('error')
        t = threading.Thread(target=load); t.start()
        time.sleep(0.3); os.kill(next(iter(before)), signal.SIGKILL)
        t.join(60)
        deadline = time.time() + 20
        while time.time() < deadline and len(workers_of(p) - before) < 1: time.sleep(0.1)
        after = workers_of(p)
        assert len(after) == 2 and len(after - before) == 1, (before, after)           # replaced
        assert results.count(200) >= len(results) - 1, results                         # at most the one in flight
        assert [post(url, body).status_code for _ in range(10)] == [200] * 10
    finally: stop(p)


@pytest.mark.parametrize('damage', ['altered', 'corrupt'])
def test_bad_model_refuses_to_start(toy_models, tmp_path, damage):
    bad = tmp_path/'models'; shutil.copytree(toy_models, bad)
    f = bad/'model_vit.onnx'
    if damage == 'altered': f.write_bytes(f.read_bytes() + b'\0')                      # sha256 mismatch
    else:                                                                              # hash fits, the file is garbage
        f.write_bytes(b'not onnx'); m = json.loads((bad/'manifest_vit.json').read_text())
        import hashlib; m['sha256'] = hashlib.sha256(b'not onnx').hexdigest(); (bad/'manifest_vit.json').write_text(json.dumps(m))
    p, url = start(bad, tmp_path)
    try:
        rc = p.wait(60)
        err = p.stderr.read()
        assert rc != 0 and 'model_vit.onnx' in err, (rc, err[-2000:])
    finally:
        if p.poll() is None: stop(p)
    r = mhist('serve', '--models', bad, '--port', free_port(), timeout=60)                 # the CLI checks before forking
    assert r.returncode != 0 and 'model_vit.onnx' in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]


# ---- AWS Lambda: events of the documented shapes ----

def test_lambda_events(toy_models, monkeypatch):
    from mhist_nb.toy_models import expected_logit
    import mhist_nb.aws_lambda as aws
    monkeypatch.setenv('MHIST_MODEL_DIR', str(toy_models)); monkeypatch.setenv('MHIST_ALLOWED_ORIGINS', 'https://viewer.example')
    monkeypatch.setattr(aws, 'APP', None)
    t = tiles(1)[0]
    v2 = json.loads((ROOT/'tests'/'events'/'apigw_http_v2.json').read_text())
    v2['body'] = base64.b64encode(png(t)).decode()
    r = aws.handler(v2, None)
    assert r['statusCode'] == 200 and not r['isBase64Encoded'], r
    body = json.loads(r['body'])
    assert list(body['results'][0]['predictions']) == ['vit']
    assert abs(body['results'][0]['predictions']['vit']['logit'] - expected_logit(t)) < 1e-4
    assert r['headers']['Access-Control-Allow-Origin'] == 'https://viewer.example'
    v1 = json.loads((ROOT/'tests'/'events'/'apigw_rest_v1.json').read_text())
    v1['body'] = json.dumps({'images': [base64.b64encode(png(t)).decode()] * 2})
    r = aws.handler(v1, None)
    assert r['statusCode'] == 200 and list(json.loads(r['body'])['results'][1]['predictions']) == ['mlp'], r
    assert 'Access-Control-Allow-Origin' not in r['headers']                           # no Origin header sent
    bad = dict(v1, body='{"image": "!!"}')
    r = aws.handler(bad, None)
    assert r['statusCode'] == 400 and json.loads(r['body'])['error'] == 'bad base64'
    r = aws.handler(dict(v2, rawPath='/models', requestContext={**v2['requestContext'], 'http': {**v2['requestContext']['http'], 'method': 'GET'}}, body=''), None)
    assert r['statusCode'] == 200 and [m['name'] for m in json.loads(r['body'])['models']] == ['mlp', 'vit']


def test_lambda_loads_models_at_init(toy_models):
    "In Lambda (AWS_LAMBDA_FUNCTION_NAME set), importing the handler module loads the models, outside the handler."
    code = ('import time; t = time.perf_counter(); import mhist_nb.aws_lambda as a; '
            'print(a.APP is not None, sorted(a.APP.extensions["mhist"]["predictor"].models))')
    env = dict(os.environ, AWS_LAMBDA_FUNCTION_NAME='mhist', MHIST_MODEL_DIR=str(toy_models))
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "True ['mlp', 'vit']", r.stderr[-2000:]


# ---- the serving image's environment, for real ----

def test_serving_environment_without_torch(toy_models, tmp_path):
    "As docker/api.Dockerfile installs: a fresh venv, `pip install --no-deps` the project, then the serve requirements."
    venv = tmp_path/'venv'
    subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True, timeout=120)
    py = venv/'bin'/'python'
    pip = [str(py), '-m', 'pip', 'install', '--quiet', '--disable-pip-version-check']
    r = subprocess.run(pip + ['--no-deps', str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(pip + ['-r', str(ROOT/'docker'/'requirements-serve.txt')], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    smoke = textwrap.dedent(f'''
        import importlib.util, io, json, sys
        import numpy as np
        from PIL import Image
        assert importlib.util.find_spec('torch') is None, 'torch is installed in the serving environment'
        from mhist_nb.api import create_app, ServeConfig
        c = create_app(ServeConfig(model_dir={str(toy_models)!r})).test_client()
        b = io.BytesIO(); Image.fromarray(np.full((224, 224, 3), 200, np.uint8)).save(b, 'PNG')
        r = c.post('/predict', data=b.getvalue(), content_type='image/png')
        assert r.status_code == 200 and sorted(r.get_json()['results'][0]['predictions']) == ['mlp', 'vit'], r.get_data()
        assert c.post('/predict', data=b'nope', content_type='image/png').status_code == 422
        assert c.get('/metrics').status_code == 200
        print('ok')
    ''')
    r = subprocess.run([str(py), '-c', smoke], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == 'ok', r.stderr[-3000:]


def test_sagemaker_inference_script(toy_models):
    "sagemaker/inference.py as a framework container calls it: model_fn once, then input_fn, predict_fn, output_fn."
    import importlib.util
    spec = importlib.util.spec_from_file_location('inference', ROOT/'sagemaker'/'inference.py')
    inf = importlib.util.module_from_spec(spec); spec.loader.exec_module(inf)
    model = inf.model_fn(str(toy_models))
    t = tiles(2)
    for body, ctype in ((png(t[0]), 'application/x-image'), (png(t[0]), 'image/png'),
                        (json.dumps({'images': [base64.b64encode(png(x)).decode() for x in t]}).encode(), 'application/json')):
        out = json.loads(inf.output_fn(inf.predict_fn(inf.input_fn(body, ctype), model), 'application/json'))
        assert sorted(out['results'][0]['predictions']) == ['mlp', 'vit']
    with pytest.raises(Exception, match='text/csv'): inf.input_fn(b'1,2', 'text/csv')


# ---- `mhist serve` as shipped: one gthread worker, models loaded once in the master ----

def serve_cli(models, tmp_path, *args, **env):
    "Start `mhist serve` on a free port with its temp dir in `tmp_path`/tmp; (process, url)."
    port = free_port()
    (tmp_path/'tmp').mkdir(exist_ok=True)
    e = {k: v for k, v in os.environ.items() if not k.startswith(('MHIST_', 'PROMETHEUS_'))}
    e.update(TMPDIR=str(tmp_path/'tmp'), **env)
    exe = shutil.which('mhist', path=str(BIN))
    p = subprocess.Popen([exe, 'serve', '--models', str(models), '--port', str(port), *map(str, args)], env=e,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    return p, f'http://127.0.0.1:{port}'


def raw_http(url, data: bytes) -> tuple[int, dict, bytes]:
    "Send `data` as it is on a new connection; the status, headers and body of the answer."
    import socket
    host, port = url.split('//')[1].split(':')
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        got = b''
        while chunk := s.recv(65536): got += chunk
    head, body = got.split(b'\r\n\r\n', 1)
    lines = head.decode('latin1').split('\r\n')
    return int(lines[0].split()[1]), dict(l.split(': ', 1) for l in lines[1:]), body


def test_serve_holds_against_slow_and_hostile_clients(toy_models, tmp_path):
    """Measured before: two clients sending headers at a byte a second blocked both sync workers; a chunked body over
    the limit was cut and answered 200; gunicorn's own 400/431 were HTML. Two request threads here, three slow
    clients: /health can answer only because the header deadline frees the threads."""
    import socket
    p, url = serve_cli(toy_models, tmp_path, '--request-threads', 2, '--max-body-mb', 1, MHIST_HEADER_TIMEOUT='2')
    try:
        wait_ready(p, url)
        import psutil
        assert len(psutil.Process(p.pid).children()) == 1                      # one worker by default
        host, port = url.split('//')[1].split(':')
        stop_dribbling, slow = threading.Event(), []
        def dribble():
            s = socket.create_connection((host, int(port)), timeout=30); slow.append(s)
            for b in b'GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ' + b'a' * 200:
                if stop_dribbling.is_set(): return
                try: s.send(bytes([b]))
                except OSError: return                                         # the server shut it
                time.sleep(0.5)
        ts = [threading.Thread(target=dribble, daemon=True) for _ in range(3)]
        for t in ts: t.start()
        time.sleep(1.5)                                                        # all three are dribbling
        assert requests.get(url + '/health', timeout=30).json() == {'status': 'ok'}
        for s in slow: assert s.recv(100) == b''                               # closed by the server, not answered
        stop_dribbling.set()

        h = {'Content-Type': 'image/png'}
        over = requests.post(url + '/predict', data=iter([b'\0' * 500_000, b'\0' * 500_001]), headers=h,
                             timeout=30)                               # a generator: chunked, no Content-Length
        assert over.status_code == 413 and 'larger than 1 MB' in over.json()['detail'], over.text
        under = requests.post(url + '/predict', data=iter([b'\0' * 500_000] * 2), headers=h, timeout=30)
        assert under.status_code == 422 and 'not an image' in under.json()['detail'], under.text   # read in full

        for req, status in ((b'GET /' + b'a' * 5000 + b' HTTP/1.1\r\nHost: x\r\n\r\n', 400),       # line too long
                            (b'GET /health HTTP/1.1\r\n' + b''.join(b'X-%d: 1\r\n' % i for i in range(120)) + b'\r\n', 431)):
            code, headers, raw = raw_http(url, req)
            assert code == status and headers['Content-Type'] == 'application/json', (code, headers, raw[:300])
            j = json.loads(raw)
            assert set(j) == {'error', 'detail', 'request_id'} and j['request_id'] == headers['X-Request-Id'], j
        idle = requests.Session(); assert idle.get(url + '/health', timeout=10).status_code == 200   # kept alive, idle
    finally: stop(p)                                                           # SIGTERM, SIGKILL after 10 s
    assert not list((tmp_path/'tmp').glob('mhist-prometheus-*'))              # a clean stop (on_exit) despite it


def test_a_changed_model_file_does_not_take_the_server_down(toy_models, tmp_path):
    "The models are verified and loaded once, in the master: a worker restarted after the file changed inherits them."
    import psutil
    from mhist_nb.toy_models import expected_logit
    models = tmp_path/'models'; shutil.copytree(toy_models, models)
    p, url = serve_cli(models, tmp_path)
    try:
        wait_ready(p, url)
        (worker,) = psutil.Process(p.pid).children()
        f = models/'model_vit.onnx'; f.write_bytes(f.read_bytes() + b'\0')   # no longer the verified file
        os.kill(worker.pid, signal.SIGKILL)
        deadline = time.time() + 30
        while time.time() < deadline and {c.pid for c in psutil.Process(p.pid).children()} in (set(), {worker.pid}):
            time.sleep(0.1)
        wait_ready(p, url)
        t = tiles(1)[0]
        r = post(url, png(t))
        assert r.status_code == 200 and p.poll() is None, r.text
        assert abs(r.json()['results'][0]['predictions']['vit']['logit'] - expected_logit(t)) < 1e-4   # the verified model
    finally: stop(p)


def test_a_failed_start_leaves_no_metrics_folder(toy_models, tmp_path):
    "gunicorn cannot bind (the port is taken): it exits non-zero, says why, and removes the folder it made."
    import socket
    with socket.socket() as held:
        held.bind(('127.0.0.1', 0)); held.listen()
        port = held.getsockname()[1]
        (tmp_path/'tmp').mkdir()
        e = {k: v for k, v in os.environ.items() if not k.startswith(('MHIST_', 'PROMETHEUS_'))}
        r = mhist('serve', '--models', toy_models, '--port', port, env={**e, 'TMPDIR': str(tmp_path/'tmp')}, timeout=60)
    assert r.returncode != 0 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert not list((tmp_path/'tmp').glob('mhist-prometheus-*'))
