"The `mhist` console script, run as a user would: in a subprocess, reading exit codes and output."
import os, shutil
import pandas as pd
import pytest
from PIL import Image
from conftest import mhist


def test_help_on_every_subcommand():
    top = mhist('--help')
    assert top.returncode == 0
    for cmd in ('synth', 'check', 'explore'):
        assert cmd in top.stdout
        r = mhist(cmd, '--help')
        assert r.returncode == 0 and f'usage: mhist {cmd}' in r.stdout


def test_no_subcommand_is_a_usage_error():
    r = mhist()
    assert r.returncode == 2 and 'usage' in r.stderr


def test_check_valid_directory(synth_dir):
    r = mhist('check', synth_dir)
    assert r.returncode == 0, r.stderr
    assert 'valid MHIST directory' in r.stdout
    df = pd.read_csv(synth_dir/'annotations.csv')
    assert f'{len(df)} tiles' in r.stdout
    n_train_hp = ((df.Partition == 'train') & (df['Majority Vote Label'] == 'HP')).sum()
    assert any(line.split()[:2] == ['train', str(n_train_hp)] for line in r.stdout.splitlines())


def test_check_broken_directory_lists_every_problem(synth_dir, tmp_path):
    d = tmp_path/'broken'; shutil.copytree(synth_dir, d)
    t = pd.read_csv(d/'annotations.csv')
    t.loc[0, 'Majority Vote Label'] = 'TA'
    t.loc[1, 'Partition'] = 'validation'
    t.to_csv(d/'annotations.csv', index=False)
    (d/'images'/t.loc[2, 'Image Name']).unlink()
    Image.new('L', (224, 224)).save(d/'images'/t.loc[3, 'Image Name'])
    r = mhist('check', d)
    assert r.returncode == 1
    assert '4 problem(s)' in r.stderr
    for needle in ("unknown label 'TA'", "unknown partition 'validation'", 'listed in annotations.csv but missing', 'mode L'):
        assert needle in r.stderr
    assert 'Traceback' not in r.stderr
    # --no-images reports the table problems only
    r = mhist('check', d, '--no-images')
    assert r.returncode == 1 and '2 problem(s)' in r.stderr


def test_check_missing_directory(tmp_path):
    r = mhist('check', tmp_path/'nope')
    assert r.returncode == 1 and 'is not a directory' in r.stderr


def test_synth_refuses_foreign_directory_and_keeps_it(tmp_path):
    d = tmp_path/'mine'; d.mkdir(); (d/'annotations.csv').write_text('precious')
    r = mhist('synth', d, '--scale', '0.01', '--overwrite', '--quiet')
    assert r.returncode == 2 and 'refusing to overwrite' in r.stderr and 'Traceback' not in r.stderr
    assert (d/'annotations.csv').read_text() == 'precious'


def test_synth_parallel_equals_serial(tmp_path):
    a = mhist('synth', tmp_path/'a', '--scale', '0.01', '--jobs', '1', '--quiet')
    b = mhist('synth', tmp_path/'b', '--scale', '0.01', '--jobs', '2', '--quiet')
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    assert (tmp_path/'a'/'annotations.csv').read_bytes() == (tmp_path/'b'/'annotations.csv').read_bytes()
    for p in (tmp_path/'a'/'images').iterdir():
        assert p.read_bytes() == (tmp_path/'b'/'images'/p.name).read_bytes(), p.name
    assert mhist('check', tmp_path/'b').returncode == 0


def test_synth_bad_scale(tmp_path):
    r = mhist('synth', tmp_path/'x', '--scale', '-1', '--quiet')
    assert r.returncode == 2 and 'scale must be positive' in r.stderr
    assert not (tmp_path/'x').exists()


def test_run_stops_at_once_when_the_tracking_server_is_down(tmp_path):
    "Measured before: 257 s of client retries, then a raw MlflowException traceback. Now one message, before any work."
    import socket, time, yaml
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]   # nothing listens there
    params = tmp_path/'p.yaml'
    params.write_text(yaml.safe_dump({'name': 't', 'run': ['10_train_mlp'], 'synth': {'scale': 0.02, 'seed': 0},
                                      'common': {'data_dir': str(tmp_path/'data')}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(('MLFLOW_', 'MHIST_'))}
    t0 = time.perf_counter()
    r = mhist('run', params, '--reports', tmp_path/'reports', env={**env, 'MLFLOW_TRACKING_URI': f'http://127.0.0.1:{port}'})
    assert r.returncode == 1, r.stderr[-2000:]
    assert time.perf_counter() - t0 < 60
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and f'MLflow tracking server http://127.0.0.1:{port} is not reachable' in err[0], r.stderr[-2000:]
    assert 'MHIST_TRACKING=off' in err[0] and 'Traceback' not in r.stderr
    assert not (tmp_path/'data').exists() and not (tmp_path/'reports').exists()          # nothing was started


def test_serve_refuses_bad_numbers_before_starting(tmp_path):
    "Measured before: --workers 0 silently became 2 workers; --port 70000 was a gunicorn traceback. Now usage errors."
    for args, words in ((['--workers', '0'], 'argument --workers: must be at least 1, got 0'),
                        (['--port', '70000'], 'argument --port: must be from 1 to 65535, got 70000'),
                        (['--request-threads', 'many'], "argument --request-threads: 'many' is not a whole number")):
        r = mhist('serve', '--models', tmp_path, *args, env={**os.environ, 'TMPDIR': str(tmp_path)})
        assert r.returncode == 2 and words in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert not list(tmp_path.glob('mhist-prometheus-*'))
