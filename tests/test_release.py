"""Releases end to end (nbs/20_release.ipynb): the shared tiny pipeline's models released with `mhist release` to a local
S3 (moto's server mode, over HTTP) and to the MLflow Model Registry (its sqlite store, and the shared MLflow server),
then served by `mhist serve` and `mhist predict` from `s3://…` and `models:/…@champion` with the answers the reports
folder gives; a tampered object, a half-written release and a wrong alias each stop a server with one clear error."""
import json, os, shutil, signal, subprocess, time
from pathlib import Path

import numpy as np
import pytest
import requests

from conftest import BIN, free_port, mhist
from mhist_nb.toy_models import png_bytes as png

BUCKET = 'mhist-releases'


@pytest.fixture(scope='module')
def released(tiny_pipeline, s3_server, tmp_path_factory):
    "The tiny pipeline's reports released (version t1) to S3 with `current` moved, and registered with alias champion."
    import boto3
    rep, uri, run = tiny_pipeline
    assert run.returncode == 0, run.stderr[-3000:]
    tmp = tmp_path_factory.mktemp('released')
    env = {**os.environ, **s3_server['env'], 'MLFLOW_TRACKING_URI': uri, 'MHIST_MODEL_CACHE': str(tmp/'cache')}
    boto3.client('s3', endpoint_url=s3_server['endpoint'], aws_access_key_id='testing', aws_secret_access_key='testing',
                 region_name='us-east-1').create_bucket(Bucket=BUCKET)
    r = mhist('release', rep, '--out', tmp/'releases', '--version', 't1', '--s3', f's3://{BUCKET}/team', '--alias',
              'champion', env=env)
    assert r.returncode == 0, r.stderr
    images = []
    for i, seed in enumerate((0, 1, 2)):
        f = tmp/f'tile{i}.png'
        f.write_bytes(png(np.random.default_rng(seed).integers(0, 256, (224, 224, 3), dtype=np.uint8)))
        images.append(f)
    return dict(rep=rep, env=env, out=r.stdout, release=tmp/'releases'/'t1', images=images, tmp=tmp)


def predict(models, images, env, model='all'):
    r = mhist('predict', '--models', models, '--model', model, *images, '--json', env=env)
    assert r.returncode == 0, r.stderr
    return {(Path(x['file']).name, n): p['p_ssa'] for x in json.loads(r.stdout) for n, p in x['predictions'].items()}


def test_release_index_says_what_it_holds(released):
    idx = json.loads((released['release']/'release.json').read_text())
    rep = released['rep']
    assert set(idx['models']) == {'mlp', 'mlp.int8', 'vit', 'vit.int8'}
    for fam in ('mlp', 'vit'):                          # the training runs, as the run records of the reports say
        assert idx['mlflow_runs'][fam] == json.loads((rep/f'run_{fam}.json').read_text())['run_id']
        assert idx['models'][fam]['threshold'] == json.loads((rep/f'manifest_{fam}.json').read_text())['threshold']
    assert Path(idx['params_file']).name == 'tiny.yaml' and idx['git_commit']
    assert 'published to s3://mhist-releases/team/releases/t1/ (current)' in released['out']
    assert 'registered models:/mhist-vit/1 (alias champion)' in released['out']


def in_process(models, images, model='all'):
    "What the reports folder's models answer, in this process: the reference."
    from mhist_nb.serve import Predictor
    pred = Predictor(models)
    return {(f.name, n): p['p_ssa'] for f in images for n, p in pred.predict([f.read_bytes()], model)[0].items()}


def test_s3_and_registry_releases_answer_as_the_folder(released):
    env, images = released['env'], released['images']
    folder = in_process(released['rep'], images)
    assert len(folder) == 3 * 4
    assert predict(f's3://{BUCKET}/team/releases/current', images, env) == folder
    assert predict(f's3://{BUCKET}/team', images, env) == folder              # the root: its current release
    vit = predict('models:/mhist-vit@champion', images, env, model='vit')
    assert vit == {k: v for k, v in folder.items() if k[1] == 'vit'}
    blobs = list((released['tmp']/'cache'/'blobs').iterdir())                  # one blob per distinct file, kept
    assert len(blobs) == len(json.loads((released['release']/'release.json').read_text())['files'])


def serve(models, env):
    port = free_port()
    p = subprocess.Popen([str(BIN/'mhist'), 'serve', '--models', models, '--port', str(port), '--host', '127.0.0.1'],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f'http://127.0.0.1:{port}'
    for _ in range(600):
        if p.poll() is not None: raise AssertionError(f'mhist serve exited: {p.stderr.read()[-3000:]}')
        try:
            if requests.get(url + '/ready', timeout=5).status_code == 200: return p, url
        except requests.RequestException: pass                        # not listening yet, or loading
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL); raise AssertionError('not ready in time')


@pytest.mark.parametrize('uri', [f's3://{BUCKET}/team/releases/t1', 'models:/mhist-vit@champion'])
def test_mhist_serve_serves_a_release(released, uri):
    folder = in_process(released['rep'], released['images'][:1])
    p, url = serve(uri, released['env'])
    try:
        r = requests.post(url + '/predict?model=vit', data=released['images'][0].read_bytes(),
                          headers={'Content-Type': 'image/png'}, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()['results'][0]['predictions']['vit']['p_ssa'] == folder[('tile0.png', 'vit')]
    finally:
        os.killpg(p.pid, signal.SIGTERM); p.wait(15)


def refused(models, env, image):
    r = mhist('predict', '--models', models, image, '--json', env=env)
    assert r.returncode == 2 and 'Traceback' not in r.stderr, (r.returncode, r.stderr)
    return r.stderr


def test_broken_releases_are_refused_with_one_error(released, s3_server):
    import boto3
    env = {**released['env'], 'MHIST_MODEL_CACHE': str(released['tmp']/'cache-2')}
    s3 = boto3.client('s3', endpoint_url=s3_server['endpoint'], aws_access_key_id='testing',
                      aws_secret_access_key='testing', region_name='us-east-1')
    rel, img = released['release'], released['images'][0]
    for f in rel.iterdir():                                                   # a copy whose manifest was edited
        s3.put_object(Bucket=BUCKET, Key=f'tampered/releases/t1/{f.name}', Body=f.read_bytes())
    s3.put_object(Bucket=BUCKET, Key='tampered/releases/t1/manifest_vit.json', Body=b'{"threshold": 0.0}')
    assert 'manifest_vit.json: its sha256 is' in refused(f's3://{BUCKET}/tampered/releases/t1', env, img)
    s3.put_object(Bucket=BUCKET, Key='half/releases/t2/model_vit.onnx', Body=(rel/'model_vit.onnx').read_bytes())
    assert 'upload did not finish' in refused(f's3://{BUCKET}/half/releases/t2', env, img)
    assert "no alias 'production'" in refused('models:/mhist-vit@production', env, img)
    assert 'nothing was published there' in refused(f's3://{BUCKET}/elsewhere', env, img)
    local = Path(shutil.copytree(rel, released['tmp']/'same-size'))       # a local release, a model byte flipped
    data = bytearray((local/'model_vit.onnx').read_bytes()); data[100] ^= 1
    (local/'model_vit.onnx').write_bytes(bytes(data))
    err = refused(local, env, img)
    assert 'model_vit.onnx' in err and 'sha256' in err, err


def test_registry_on_the_shared_tracking_server(tracking_server, tmp_path):
    from mhist_nb.toy_models import toy_model_dir
    run = toy_model_dir(tmp_path/'run', families=('vit',), thresholds=(0.6,))   # small: the registry's path is tested
    user, pw = tracking_server['auth']
    env = {**os.environ, 'MLFLOW_TRACKING_URI': tracking_server['uri'], 'MLFLOW_TRACKING_USERNAME': user,
           'MLFLOW_TRACKING_PASSWORD': pw, 'MHIST_MODEL_CACHE': str(tmp_path/'cache')}
    r = mhist('release', run, '--out', tmp_path/'releases', '--version', 'srv1', '--alias', 'champion', env=env)
    assert r.returncode == 0 and 'models:/mhist-vit/' in r.stdout, r.stderr
    img = tmp_path/'tile.png'
    img.write_bytes(png(np.random.default_rng(5).integers(0, 256, (224, 224, 3), dtype=np.uint8)))
    assert predict('models:/mhist-vit@champion', [img], env, 'vit') == in_process(run, [img], 'vit')
