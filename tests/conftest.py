import os, secrets, shutil, socket, subprocess, sys, tempfile, time
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def mhist(*args, check=False, **kw):
    "Run the installed `mhist` console script; return the CompletedProcess."
    exe = shutil.which('mhist', path=str(BIN)) or shutil.which('mhist')
    assert exe, 'the mhist console script is not installed (pip install -e .)'
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, check=check, **kw)


@pytest.fixture(scope='session')
def synth_dir(tmp_path_factory):
    "A small synthetic MHIST-layout dataset shared by the tests (read-only by convention)."
    from mhist_nb.synth import synth
    return synth(tmp_path_factory.mktemp('data')/'synth', scale=0.02, seed=0)


@pytest.fixture(scope='session')
def tiny_pipeline(tmp_path_factory):
    """The whole default pipeline (explore -> MLP -> ViT -> threshold study -> ONNX -> comparison -> explanations) on a tiny synthetic
    set, run once per session with `mhist run`: the end-to-end test checks its reports, the serving tests serve its
    models. Returns (reports folder, MLflow tracking URI, the CompletedProcess)."""
    import yaml
    tmp = tmp_path_factory.mktemp('pipeline')
    params = tmp/'tiny.yaml'
    params.write_text(yaml.safe_dump({
        'name': 'tiny', 'synth': {'scale': 0.05, 'seed': 0, 'jobs': 2},
        'common': {'data_dir': str(tmp/'data'), 'seed': 0, 'quiet': True},
        '10_train_mlp': {'epochs': 2}, '11_train_vit': {'head_epochs': 1, 'full_epochs': 2},
        '13_onnx': {'latency_runs': 3}}))
    uri = f"sqlite:///{tmp/'mlflow.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES='0')
    r = mhist('run', params, '--reports', tmp/'reports', '--quiet', env=env)
    return tmp/'reports'/'tiny', uri, r


# ---------------------------------------------------------------- PostgreSQL and a shared MLflow server, once per session
PG_BINS = sorted(Path('/usr/lib/postgresql').glob('*/bin/initdb'))
PG_BIN = PG_BINS[-1].parent if PG_BINS else (Path(shutil.which('initdb')).parent if shutil.which('initdb') else None)
MLFLOW = Path(sys.executable).parent/'mlflow'


def free_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def as_pg(args, **kw):
    "Run a PostgreSQL program as the `postgres` system user when we are root (PostgreSQL refuses to run as root)."
    cmd = [str(PG_BIN/args[0]), *map(str, args[1:])]
    if os.geteuid() == 0: cmd = ['runuser', '-u', 'postgres', '--', *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, **kw)


@pytest.fixture(scope='session')
def postgres():
    "A throw-away PostgreSQL cluster on 127.0.0.1: a password-protected `mlflow` role owning databases mlflow, mlflow_auth, optuna."
    if PG_BIN is None: pytest.skip('PostgreSQL is absent: `make test-deps` installs Debian\'s postgresql')
    d = Path(tempfile.mkdtemp(prefix='mhist-pg-', dir='/var/tmp' if os.geteuid() == 0 else None))
    if os.geteuid() == 0: shutil.chown(d, 'postgres', 'postgres')
    port, pw = free_port(), secrets.token_hex(8)
    as_pg(['initdb', '-D', d/'data', '-U', 'postgres', '-E', 'UTF8', '--auth-local=trust', '--auth-host=scram-sha-256', '--no-sync'])
    as_pg(['pg_ctl', '-D', d/'data', '-l', d/'log', '-w', '-o', f'-h 127.0.0.1 -p {port} -k {d}', 'start'])
    try:
        for q in (f"CREATE ROLE mlflow LOGIN PASSWORD '{pw}'", 'CREATE DATABASE mlflow OWNER mlflow',
                    'CREATE DATABASE mlflow_auth OWNER mlflow', 'CREATE DATABASE optuna OWNER mlflow'):
            as_pg(['psql', '-h', d, '-p', port, '-U', 'postgres', '-v', 'ON_ERROR_STOP=1', '-c', q])
        yield dict(port=port, dir=d, url=lambda db: f'postgresql://mlflow:{pw}@127.0.0.1:{port}/{db}',
                   admin_pw=secrets.token_urlsafe(12))   # MLflow's first admin: one for every server on this cluster's auth db
    finally:
        subprocess.run(['runuser', '-u', 'postgres', '--'] * (os.geteuid() == 0) + [str(PG_BIN/'pg_ctl'), '-D', str(d/'data'),
                        '-m', 'fast', 'stop'], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


def sql(pg, query: str, db: str = 'mlflow') -> str:
    "The result of `query` in database `db` of the `postgres` fixture's cluster, as text."
    return as_pg(['psql', '-h', pg['dir'], '-p', pg['port'], '-U', 'postgres', '-d', db, '-tAc', query]).stdout.strip()


ENTRYPOINT = ROOT/'docker'/'tracking-entrypoint.sh'


class TrackingServer:
    """The tracking image's command (docker/tracking-entrypoint.sh: `mlflow server` on PostgreSQL, proxied artifacts,
    basic auth) on loopback with the settings docker-compose.tracking.yml passes, a folder as the artifact store."""
    def __init__(self, postgres, tmp: Path):
        self.tmp, self.port, self.proc = tmp, free_port(), None
        tmp.mkdir(parents=True, exist_ok=True)
        self.auth = ('admin', postgres['admin_pw'])
        self.uri, self.artifacts, self.log = f'http://127.0.0.1:{self.port}', tmp/'artifacts', tmp/'server.log'
        url = postgres['url']('mlflow')
        self.env = {**os.environ, 'HOME': str(tmp), 'PATH': f"{MLFLOW.parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    'POSTGRES_HOST': '127.0.0.1', 'POSTGRES_PORT': str(postgres['port']), 'POSTGRES_USER': 'mlflow',
                    'POSTGRES_PASSWORD': url.split(':')[2].split('@')[0], 'POSTGRES_DB': 'mlflow', 'MLFLOW_AUTH_DB': 'mlflow_auth',
                    'MLFLOW_ADMIN_PASSWORD': self.auth[1], 'MLFLOW_ARTIFACTS_DESTINATION': self.artifacts.as_uri(),
                    'MLFLOW_HOST': '127.0.0.1', 'MLFLOW_PORT': str(self.port), 'MLFLOW_FLASK_SERVER_SECRET_KEY': secrets.token_hex(16)}

    def start(self):
        "Start the server (again, on the same port and store) and wait until it answers."
        import requests                  # here, not at the top: a bare GPU image (make gpu-check) may lack it
        with open(self.log, 'a') as log:
            self.proc = subprocess.Popen([str(ENTRYPOINT)], stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        for _ in range(360):
            if self.proc.poll() is not None: pytest.fail(f'mlflow server exited: {self.log.read_text()[-3000:]}')
            try:
                if requests.get(f'{self.uri}/health', timeout=5).ok: return self
            except requests.RequestException: pass      # not listening yet, or busy migrating the database
            time.sleep(0.5)
        pytest.fail(f'mlflow server did not start: {self.log.read_text()[-3000:]}')

    def stop(self):
        "Stop the server and every process it started (uvicorn/gunicorn workers)."
        if self.proc is None: return
        try: os.killpg(self.proc.pid, 15)
        except ProcessLookupError: pass
        try: self.proc.wait(20)
        except subprocess.TimeoutExpired: os.killpg(self.proc.pid, 9)
        self.proc = None


@pytest.fixture(scope='session')
def tracking_server(postgres, tmp_path_factory):
    "A shared MLflow server (`TrackingServer`) for the session: a dict of its uri, auth (admin), artifacts and log."
    srv = TrackingServer(postgres, tmp_path_factory.mktemp('mlflow-server')).start()
    assert oct((srv.tmp/'basic_auth.ini').stat().st_mode & 0o777) == '0o600'             # it holds the passwords
    try: yield dict(uri=srv.uri, auth=srv.auth, artifacts=srv.artifacts, log=srv.log)
    finally: srv.stop()


# ---------------------------------------------------------------- a local S3 (moto's server mode, over HTTP), once per session
@pytest.fixture(scope='session')
def s3_server(tmp_path_factory):
    """A local S3-compatible server for the session: moto's server mode in its own process, spoken to over HTTP with an
    endpoint URL, exactly as boto3 speaks to AWS. Returns a dict of `endpoint` and the environment (`env`: the endpoint
    as AWS_ENDPOINT_URL_S3 and dummy credentials) that makes boto3 and the `mhist` commands use it."""
    exe = BIN/'moto_server'
    if not exe.exists(): pytest.skip('moto[server] is not installed (the dev extra)')
    port, log = free_port(), tmp_path_factory.mktemp('moto')/'moto.log'
    env = dict(AWS_ENDPOINT_URL_S3=f'http://127.0.0.1:{port}', AWS_ACCESS_KEY_ID='testing',
               AWS_SECRET_ACCESS_KEY='testing', AWS_DEFAULT_REGION='us-east-1')
    with open(log, 'wb') as f:
        proc = subprocess.Popen([str(exe), '-H', '127.0.0.1', '-p', str(port)], stdout=f, stderr=subprocess.STDOUT)
    try:
        for _ in range(200):
            try:
                with socket.create_connection(('127.0.0.1', port), 0.2): break
            except OSError: time.sleep(0.05)
        else: pytest.fail(f'moto server did not start: {log.read_text()[-2000:]}')
        yield dict(endpoint=env['AWS_ENDPOINT_URL_S3'], env=env)
    finally:
        proc.terminate()
        try: proc.wait(10)
        except subprocess.TimeoutExpired: proc.kill()
