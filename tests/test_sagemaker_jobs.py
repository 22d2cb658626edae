"""`mhist sagemaker train` without AWS: the package made from a commit, the upload to a local S3 server (moto's server
mode, over HTTP), the exact CreateTrainingJob request, and a job followed to its end (status, logs, outputs).

SageMaker is a botocore Stubber on a real boto3 client: no local emulator runs SageMaker training jobs (moto records a
CreateTrainingJob but runs nothing, so there is no InProgress -> Completed, no log and no model to follow), and the
Stubber still checks each request against the service's API model as well as against the exact parameters expected.
S3 and CloudWatch Logs are the local server's, reached over HTTP through the AWS_ENDPOINT_URL_* variables, as boto3
reaches AWS. The entry point the job runs is tested from this package in tests/test_pipeline.py."""
import io, json, os, subprocess, sys, tarfile, time, tomllib
from pathlib import Path

import boto3, pytest
from botocore.stub import Stubber
from conftest import ROOT
from mhist_nb import cli, sagemaker_jobs as smj

ROLE = 'arn:aws:iam::111122223333:role/mhist-training'        # AWS's documentation account id
BUCKET = 'mhist-test'
IMAGE = '763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.7.1-gpu-py312-cu128-ubuntu22.04-sagemaker'
GIT_ENV = dict(GIT_AUTHOR_NAME='t', GIT_AUTHOR_EMAIL='t@example.org', GIT_COMMITTER_NAME='t',
               GIT_COMMITTER_EMAIL='t@example.org', GIT_AUTHOR_DATE='2026-01-01T00:00:00Z',
               GIT_COMMITTER_DATE='2026-01-01T00:00:00Z')


def git(root, *args):
    return subprocess.run(['git', '-C', str(root), *args], check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV}).stdout


def members(data: bytes) -> dict:
    "The files of a gzipped tar and their bytes."
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return {m.name: t.extractfile(m).read() for m in t if m.isfile()}


@pytest.fixture
def repo(tmp_path):
    "A git repository with every packaged path, a file outside them, and an untracked file."
    root = tmp_path/'repo'
    files = {'mhist_nb/__init__.py': '__version__ = "0"\n', 'nbs/10_train_mlp.ipynb': '{}\n',
             'params/demo.yaml': (ROOT/'params'/'demo.yaml').read_text(), 'sagemaker/train.py': 'print(1)\n',
             'sagemaker/inference.py': '', 'pyproject.toml': '[project]\nname = "x"\n', 'README.md': '# x\n',
             'requirements.txt': '-e .\n', 'tests/test_x.py': '', 'docker/Dockerfile': 'FROM x\n'}
    for f, text in files.items():
        (root/f).parent.mkdir(parents=True, exist_ok=True); (root/f).write_text(text)
    git(root, 'init', '-q'); git(root, 'add', '.'); git(root, 'commit', '-q', '-m', 'x')
    (root/'nbs'/'untracked.ipynb').write_text('{}')
    return root


def test_package_of_this_repository_holds_what_the_job_needs():
    pkg = smj.source_package(ROOT, allow_dirty=True)        # the working copies: what this test run checks
    tracked = sorted(f for f in git(ROOT, 'ls-files', '-z', '--', *smj.PACKAGED).split('\0')[:-1] if (ROOT/f).is_file())
    assert pkg.files == tracked and sorted(members(pkg.data)) == tracked
    need = {'mhist_nb/__init__.py', 'mhist_nb/pipeline.py', 'mhist_nb/sagemaker_jobs.py', 'nbs/30_pipeline.ipynb',
            'nbs/11_train_vit.ipynb', 'params/mhist_gpu.yaml', 'sagemaker/train.py', 'pyproject.toml',
            'requirements.txt', tomllib.loads((ROOT/'pyproject.toml').read_text())['project']['readme']}
    assert need <= set(pkg.files), need - set(pkg.files)
    assert not [f for f in pkg.files if f.startswith(('tests/', 'docker/', 'benchmarks/', 'tools/', 'data/'))]
    assert 'sagemaker/inference.py' not in pkg.files
    # the toolkit installs requirements.txt: the project itself, editable, so mhist_nb finds nbs/ beside it
    assert '-e .' in (ROOT/'requirements.txt').read_text().splitlines()


def test_package_has_what_pip_install_e_needs(tmp_path):
    "The unpacked package builds the metadata of its editable install (pyproject.toml, the package, its version)."
    code = tmp_path/'code'
    with tarfile.open(fileobj=io.BytesIO(smj.source_package(ROOT, allow_dirty=True).data)) as t:
        t.extractall(code, filter='data')
    prog = ('import sys, tempfile; from setuptools import build_meta as b; '
            'd = tempfile.mkdtemp(); print(open(f"{d}/{b.prepare_metadata_for_build_editable(d)}/METADATA").read())')
    r = subprocess.run([sys.executable, '-c', prog], cwd=code, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = r.stdout
    assert 'Name: mhist_nb' in meta and 'Requires-Dist: torch' in meta and 'Requires-Dist: papermill' in meta


def test_package_is_a_commit_and_a_dirty_tree_is_refused(repo):
    pkg = smj.source_package(repo)
    got = members(pkg.data)
    assert sorted(got) == ['README.md', 'mhist_nb/__init__.py', 'nbs/10_train_mlp.ipynb', 'params/demo.yaml',
                           'pyproject.toml', 'requirements.txt', 'sagemaker/train.py']
    assert all(got[f] == subprocess.run(['git', '-C', str(repo), 'show', f'HEAD:{f}'], capture_output=True).stdout
               for f in got)
    assert pkg.commit == git(repo, 'rev-parse', 'HEAD').strip() and not pkg.dirty
    (repo/'docker'/'Dockerfile').write_text('FROM y\n')              # outside the package: no matter
    assert not smj.source_package(repo).dirty
    (repo/'params'/'demo.yaml').write_text('name: changed\n')
    with pytest.raises(smj.SageMakerJobError, match=r'differs from commit .* \(params/demo.yaml\).*--allow-dirty'):
        smj.source_package(repo)
    git(repo, 'add', 'nbs/untracked.ipynb'); git(repo, 'rm', '-q', 'nbs/10_train_mlp.ipynb')
    dirty = smj.source_package(repo, allow_dirty=True)
    assert dirty.changed == ['nbs/10_train_mlp.ipynb', 'nbs/untracked.ipynb', 'params/demo.yaml']
    got = members(dirty.data)
    assert 'nbs/untracked.ipynb' in got and 'nbs/10_train_mlp.ipynb' not in got
    assert got['params/demo.yaml'] == b'name: changed\n'


def expected_request(commit: str, job: str = 'j1') -> dict:
    "The CreateTrainingJob request of the tests' command line, written out."
    return {
        'TrainingJobName': job,
        'AlgorithmSpecification': {'TrainingImage': IMAGE, 'TrainingInputMode': 'File'},
        'RoleArn': ROLE,
        'HyperParameters': {'sagemaker_program': '"sagemaker/train.py"',
                            'sagemaker_submit_directory': f'"s3://{BUCKET}/jobs/{job}/source/sourcedir.tar.gz"',
                            'sagemaker_region': '"us-east-1"', 'sagemaker_container_log_level': '20',
                            'sagemaker_job_name': f'"{job}"', 'params': '"params/demo.yaml"', 'name': '"demo"',
                            '11_train_vit.lr_full': '"2e-5"', 'common.seed': '3'},
        'InputDataConfig': [{'ChannelName': 'training', 'DataSource': {'S3DataSource': {
            'S3DataType': 'S3Prefix', 'S3Uri': f's3://{BUCKET}/mhist', 'S3DataDistributionType': 'FullyReplicated'}}}],
        'OutputDataConfig': {'S3OutputPath': f's3://{BUCKET}/jobs'},
        'ResourceConfig': {'InstanceType': 'ml.g5.xlarge', 'InstanceCount': 2, 'VolumeSizeInGB': 30},
        'StoppingCondition': {'MaxRuntimeInSeconds': 7200},
        'Environment': {'MLFLOW_TRACKING_URI': 'https://mlflow.example.org'},
        'Tags': [{'Key': 'mhist:commit', 'Value': commit}, {'Key': 'mhist:dirty', 'Value': 'false'}]}


@pytest.fixture
def aws(repo, s3_server, monkeypatch):
    "The command's setting: the repository above, the local S3 and Logs, role, data and prefix from the environment."
    for k, v in s3_server['env'].items(): monkeypatch.setenv(k, v)
    monkeypatch.setenv('AWS_ENDPOINT_URL_CLOUDWATCH_LOGS', s3_server['endpoint'])
    monkeypatch.setenv('MHIST_SAGEMAKER_ROLE', ROLE)
    monkeypatch.setenv('MHIST_SAGEMAKER_DATA', f's3://{BUCKET}/mhist')
    monkeypatch.setenv('MHIST_S3_PREFIX', f's3://{BUCKET}/jobs/')
    monkeypatch.setenv('MLFLOW_TRACKING_URI', 'https://mlflow.example.org')
    for k in ('MHIST_SAGEMAKER_IMAGE', 'MHIST_TRACKING', 'AWS_REGION', 'AWS_PROFILE'): monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(smj, 'project_root', lambda: repo)
    s3 = boto3.client('s3', region_name='us-east-1')
    if BUCKET not in [b['Name'] for b in s3.list_buckets()['Buckets']]: s3.create_bucket(Bucket=BUCKET)
    for o in s3.list_objects_v2(Bucket=BUCKET).get('Contents', []): s3.delete_object(Bucket=BUCKET, Key=o['Key'])
    sm = boto3.client('sagemaker', region_name='us-east-1')
    real = smj.aws_clients
    monkeypatch.setattr(smj, 'aws_clients', lambda region: (sm, *real(region)[1:]))   # only SageMaker is stubbed
    return dict(repo=repo, s3=s3, sm=sm, logs=boto3.client('logs', region_name='us-east-1'))


ARGS = ['sagemaker', 'train', 'params/demo.yaml', '-p', '11_train_vit.lr_full', '2e-5', '-p', 'common.seed', '3',
        '--torch-version', '2.7', '--instance-count', '2', '--max-run', '7200', '--job-name', 'j1']


def test_dry_run_prints_the_request_and_sends_nothing(aws, monkeypatch, capsys):
    monkeypatch.chdir(aws['repo'])
    with Stubber(aws['sm']) as stub:                        # no response queued: any SageMaker call would fail
        assert cli.main(ARGS + ['--dry-run']) == 0
        stub.assert_no_pending_responses()
    out = capsys.readouterr().out
    assert json.loads(out.split('\n\nsourcedir.tar.gz')[0]) == expected_request(git(aws['repo'], 'rev-parse', 'HEAD').strip())
    assert '  params/demo.yaml\n' in out and 'tests/test_x.py' not in out and 'nothing uploaded' in out
    assert aws['s3'].list_objects_v2(Bucket=BUCKET)['KeyCount'] == 0


def put_tar(s3, key, files: dict):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w:gz') as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name); info.size = len(data); t.addfile(info, io.BytesIO(data))
    s3.put_object(Bucket=BUCKET, Key=key, Body=buf.getvalue())


def test_train_uploads_creates_and_follows_the_job(aws, monkeypatch, capsys, tmp_path):
    s3, logs, repo = aws['s3'], aws['logs'], aws['repo']
    # what the job leaves behind: its model and output archives, and one log stream per instance
    put_tar(s3, 'jobs/j1/output/model.tar.gz', {'vit/best.pt': b'weights', 'predictions_vit_test.csv': b'p\n'})
    put_tar(s3, 'jobs/j1/output/output.tar.gz', {'demo/14_compare.html': b'<html>'})
    group, now = smj.LOG_GROUP, int(time.time() * 1000)
    if not logs.describe_log_groups(logGroupNamePrefix=group)['logGroups']: logs.create_log_group(logGroupName=group)
    for host, lines in (('algo-1', ['reports in /opt/ml/output/data/demo']), ('algo-2', ['joining the training'])):
        logs.create_log_stream(logGroupName=group, logStreamName=f'j1/{host}-1765040000')
        logs.put_log_events(logGroupName=group, logStreamName=f'j1/{host}-1765040000',
                            logEvents=[{'timestamp': now, 'message': m} for m in lines])
    arn = 'arn:aws:sagemaker:us-east-1:111122223333:training-job/j1'
    described = lambda status, secondary: {
        'TrainingJobName': 'j1', 'TrainingJobArn': arn, 'TrainingJobStatus': status, 'SecondaryStatus': secondary,
        'AlgorithmSpecification': {'TrainingInputMode': 'File'}, 'CreationTime': now / 1000,
        'ResourceConfig': {'InstanceType': 'ml.g5.xlarge', 'InstanceCount': 2, 'VolumeSizeInGB': 30},
        'StoppingCondition': {'MaxRuntimeInSeconds': 7200},
        'ModelArtifacts': {'S3ModelArtifacts': f's3://{BUCKET}/jobs/j1/output/model.tar.gz'}}
    with Stubber(aws['sm']) as stub:
        stub.add_response('create_training_job', {'TrainingJobArn': arn},
                          expected_request(git(repo, 'rev-parse', 'HEAD').strip()))
        stub.add_response('describe_training_job', described('InProgress', 'Training'), {'TrainingJobName': 'j1'})
        stub.add_response('describe_training_job', described('Completed', 'Completed'), {'TrainingJobName': 'j1'})
        code = cli.main([*ARGS[:2], str(repo/'params'/'demo.yaml'), *ARGS[3:], '--wait', '--poll', '0',
                         '--download', str(tmp_path/'dl')])
        stub.assert_no_pending_responses()
    out, err = capsys.readouterr()
    assert code == 0, err
    uploaded = s3.get_object(Bucket=BUCKET, Key='jobs/j1/source/sourcedir.tar.gz')['Body'].read()
    assert uploaded == smj.source_package(repo).data                 # the commit's package, byte for byte
    assert f'started {arn}' in out and 'j1: InProgress (Training)' in out and 'j1: Completed (Completed)' in out
    assert '[algo-1] reports in /opt/ml/output/data/demo' in out and '[algo-2] joining the training' in out
    assert out.count('joining the training') == 1                    # each log line once, across polls
    assert (tmp_path/'dl'/'model'/'vit'/'best.pt').read_bytes() == b'weights'
    assert (tmp_path/'dl'/'output'/'demo'/'14_compare.html').read_bytes() == b'<html>'
    assert 'j1 completed' in out


def test_refusals_send_nothing(aws, monkeypatch, capsys):
    monkeypatch.chdir(aws['repo'])
    with Stubber(aws['sm']) as stub:
        assert cli.main([*ARGS[:3], '--torch-version', '9.9']) == 2
        assert 'no known SageMaker PyTorch training image for torch 9.9' in capsys.readouterr().err
        assert cli.main([*ARGS[:3], '-p', '11_train_vit.lr_ful', '1', '--torch-version', '2.7']) == 2
        assert "unknown parameter 'lr_ful'" in capsys.readouterr().err
        (aws['repo']/'sagemaker'/'train.py').write_text('print(2)\n')
        assert cli.main(ARGS) == 2
        err = capsys.readouterr().err
        assert err.startswith('error: the working tree differs') and 'sagemaker/train.py' in err and '--allow-dirty' in err
        assert len(err.strip().splitlines()) == 1                    # one line, no traceback
        stub.assert_no_pending_responses()
    assert aws['s3'].list_objects_v2(Bucket=BUCKET)['KeyCount'] == 0


def test_a_failed_job_is_exit_code_1_with_its_reason(aws, monkeypatch, capsys):
    monkeypatch.chdir(aws['repo'])
    failed = {'TrainingJobName': 'j1', 'TrainingJobArn': 'arn:aws:sagemaker:us-east-1:111122223333:training-job/j1',
              'TrainingJobStatus': 'Failed', 'SecondaryStatus': 'Failed', 'FailureReason': 'AlgorithmError: exit 1',
              'AlgorithmSpecification': {'TrainingInputMode': 'File'}, 'CreationTime': time.time(),
              'ResourceConfig': {'InstanceType': 'ml.g5.xlarge', 'InstanceCount': 2, 'VolumeSizeInGB': 30},
              'StoppingCondition': {'MaxRuntimeInSeconds': 7200},
              'ModelArtifacts': {'S3ModelArtifacts': f's3://{BUCKET}/jobs/j1/output/model.tar.gz'}}
    with Stubber(aws['sm']) as stub:
        stub.add_response('create_training_job', {'TrainingJobArn': failed['TrainingJobArn']}, None)
        stub.add_response('describe_training_job', failed, {'TrainingJobName': 'j1'})
        assert cli.main(ARGS + ['--wait', '--poll', '0', '--download', 'dl']) == 1
    assert 'error: j1 failed: AlgorithmError: exit 1' in capsys.readouterr().err
    assert not (aws['repo']/'dl').exists()


def test_console_script_refuses_in_one_line(tmp_path):
    "As a user sees it: `mhist sagemaker train` without a role or S3 prefix is one line on stderr, exit 2, no traceback."
    from conftest import mhist
    env = {k: v for k, v in os.environ.items() if not k.startswith('MHIST_')}
    r = mhist('sagemaker', 'train', 'params/demo.yaml', '--data', 's3://b/mhist', env=env, cwd=ROOT)
    assert r.returncode == 2 and r.stdout == ''
    assert r.stderr == 'error: missing --role (or MHIST_SAGEMAKER_ROLE), --s3-prefix (or MHIST_S3_PREFIX)\n'
    r = mhist('sagemaker', env=env)
    assert r.returncode == 2 and 'usage: mhist sagemaker' in r.stderr and 'train' in mhist('sagemaker', '--help').stdout
