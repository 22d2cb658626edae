"""The whole default pipeline (explore → MLP → ViT → threshold study → ONNX → comparison → explanations) on a tiny synthetic set,
as `make demo` runs it at full size: every report file is there, manifests verify, and MLflow holds both training
runs with their notebooks, ONNX files and threshold study attached."""
import json


def walk(client, run_id, path=None):
    "Every artifact file of a run."
    for a in client.list_artifacts(run_id, path):
        if a.is_dir: yield from walk(client, run_id, a.path)
        else: yield a.path


def test_default_pipeline_end_to_end(tiny_pipeline):
    from mlflow import MlflowClient
    from mhist_nb.export import read_manifest
    out, uri, r = tiny_pipeline
    assert r.returncode == 0, r.stderr[-4000:]
    for nb in ('02_explore', '10_train_mlp', '11_train_vit', '12_threshold', '13_onnx', '14_compare', '15_explain'):
        assert (out/f'{nb}.ipynb').is_file() and (out/f'{nb}.html').is_file(), nb
    summary = (out/'summary.md').read_text()
    for section in ('## Ranking (test)', 'Paired difference AUC(vit) − AUC(mlp)', '## Operating points', '### Model files', '### Latency'):
        assert section in summary, section
    ex = json.loads((out/'explain_summary.json').read_text())
    assert not ex['standalone'] and set(ex['models']) == {'mlp', 'vit'}, ex.keys()
    for f in ex['figures']: assert (out/f).is_file(), f
    client = MlflowClient(uri)
    for fam in ('mlp', 'vit'):
        m = read_manifest(out/f'manifest_{fam}.json')                     # verifies the sha256 of the ONNX file
        t = json.loads((out/f'threshold_{fam}.json').read_text())
        assert m['threshold'] == t['threshold'] and m['threshold_rule'] == t['rule'] == 'spec_at_sens'
        run_id = json.loads((out/f'run_{fam}.json').read_text())['run_id']
        run = client.get_run(run_id)
        assert run.info.status == 'FINISHED' and run.data.tags['mhist.pipeline'] == 'tiny'
        arts = set(walk(client, run_id))
        for a in (f'notebook/1{0 if fam == "mlp" else 1}_train_{fam}.ipynb', f'onnx/model_{fam}.onnx',
                  f'onnx/manifest_{fam}.json', f'threshold/threshold_{fam}.json', f'predictions/predictions_{fam}_test.csv'):
            assert a in arts, (a, sorted(arts))
