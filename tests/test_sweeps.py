"""A sweep shared through an Optuna study in a real PostgreSQL: two `mhist sweep` processes on loopback (the first starts
the study, the second joins it with --worker), each trial a tiny training notebook in its own MLflow child run."""
import os, subprocess, time

import pytest, yaml

from conftest import BIN, mhist

BUDGET, WORKERS, EPOCHS = 4, 2, 3


@pytest.fixture(scope='module')
def sweep(postgres, tracking_server, synth_dir, tmp_path_factory):
    import optuna
    tmp = tmp_path_factory.mktemp('optuna')
    base = tmp/'base.yaml'
    base.write_text(yaml.safe_dump({'name': 'base', 'run': ['10_train_mlp'],
                                    'common': {'data_dir': str(synth_dir), 'seed': 0, 'quiet': True},
                                    '10_train_mlp': {'epochs': EPOCHS, 'save_last': False, 'log_checkpoint': False}}))
    sw = tmp/'sweep.yaml'
    sw.write_text(yaml.safe_dump({'name': 'shared', 'base': str(base), 'notebook': '10_train_mlp', 'method': 'optuna',
                                  'storage': '${MHIST_TEST_OPTUNA_DB}', 'n_trials': BUDGET, 'seed': 0,
                                  'grid': {'lr': [0.003, 0.001, 1e-7], 'dropout': [0.0, 0.2]},   # 1e-7: a trial that barely learns
                                  'rule': {'monitor': 'best_val_auc', 'mode': 'max'}}))
    user, pw = tracking_server['auth']
    env = {**{k: v for k, v in os.environ.items() if not k.startswith('MHIST_')},
           'MLFLOW_TRACKING_URI': tracking_server['uri'], 'MLFLOW_TRACKING_USERNAME': user, 'MLFLOW_TRACKING_PASSWORD': pw,
           'MHIST_TEST_OPTUNA_DB': postgres['url']('optuna')}
    first = subprocess.Popen([str(BIN/'mhist'), 'sweep', str(sw), '--reports', str(tmp/'a'), '--quiet'], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(240):                                       # the second worker joins once the study exists
        if 'shared' in optuna.get_all_study_names(postgres['url']('optuna')): break
        time.sleep(0.5)
    second = mhist('sweep', sw, '--worker', '--reports', tmp/'b', '--quiet', env=env)
    out, err = first.communicate(timeout=1800)
    study = optuna.load_study(study_name='shared', storage=postgres['url']('optuna'))
    return dict(first=(first.returncode, out, err), second=second, study=study, tmp=tmp, env=env)


def test_both_workers_finish(sweep):
    rc, out, err = sweep['first']
    assert rc == 0, err[-3000:]
    assert sweep['second'].returncode == 0, sweep['second'].stderr[-3000:]
    assert 'best_val_auc' in out                                   # the ranking, read from the study


def test_budget_shared_and_no_configuration_twice(sweep):
    ran = [t for t in sweep['study'].trials if 'duplicate_of' not in t.user_attrs]
    assert BUDGET <= len(ran) <= BUDGET + WORKERS - 1, len(ran)
    configs = [tuple(sorted(t.params.items())) for t in ran]
    assert len(set(configs)) == len(configs), configs
    assert {t.state.name for t in ran} <= {'COMPLETE', 'PRUNED'}, [(t.number, t.state.name) for t in ran]
    assert len({t.user_attrs.get('mlflow_run_id') for t in ran}) == len(ran)


def test_kernels_report_every_epoch_and_pruned_trials_are_marked(sweep):
    "The training kernel reported each epoch to its trial (the pruner's input); a pruned trial says where it stopped."
    from mlflow import MlflowClient
    os.environ.update(MLFLOW_TRACKING_USERNAME=sweep['env']['MLFLOW_TRACKING_USERNAME'],
                      MLFLOW_TRACKING_PASSWORD=sweep['env']['MLFLOW_TRACKING_PASSWORD'])
    try:
        client = MlflowClient(sweep['env']['MLFLOW_TRACKING_URI'])
        for t in (t for t in sweep['study'].trials if 'duplicate_of' not in t.user_attrs):
            run = client.get_run(t.user_attrs['mlflow_run_id'])
            if t.state.name == 'COMPLETE':
                assert sorted(t.intermediate_values) == list(range(EPOCHS)), (t.number, t.intermediate_values)
                assert abs(t.value - run.data.metrics['best_val_auc']) < 1e-9
            else:                                                   # PRUNED: stopped after the epoch it names
                stop = t.user_attrs['pruned_at_epoch']
                assert max(t.intermediate_values) == stop < EPOCHS - 1
                assert run.data.tags.get('mhist.optuna') == 'pruned'
    finally:
        for k in ('MLFLOW_TRACKING_USERNAME', 'MLFLOW_TRACKING_PASSWORD'): os.environ.pop(k, None)


def test_every_trial_is_a_child_of_one_parent(sweep):
    from mlflow import MlflowClient
    os.environ.update(MLFLOW_TRACKING_USERNAME=sweep['env']['MLFLOW_TRACKING_USERNAME'],
                      MLFLOW_TRACKING_PASSWORD=sweep['env']['MLFLOW_TRACKING_PASSWORD'])
    try:
        client = MlflowClient(sweep['env']['MLFLOW_TRACKING_URI'])
        parent = sweep['study'].user_attrs['mlflow_parent']
        assert client.get_run(parent).info.status == 'FINISHED'
        for t in (t for t in sweep['study'].trials if 'duplicate_of' not in t.user_attrs):
            assert client.get_run(t.user_attrs['mlflow_run_id']).data.tags['mlflow.parentRunId'] == parent
    finally:
        for k in ('MLFLOW_TRACKING_USERNAME', 'MLFLOW_TRACKING_PASSWORD'): os.environ.pop(k, None)
