"""Training under torchrun for real, with the gloo backend on loopback: a two-process run resumed from its `last.pt`
ends where the uninterrupted run does (dropout on, so every rank's RNG state matters), and two "machines" (two torchrun
agents joined through a static rendezvous) train exactly like two processes on one; the training notebook run by
the pipeline trains under torchrun (tests/test_pipeline.py::test_sagemaker_two_instances_on_loopback).
(The one-process vs two-process agreement is tested in nbs/32_ddp.ipynb.)"""
import json, os, subprocess, sys

import numpy as np, pytest, torch

from conftest import free_port

EPOCHS, COLS = 4, ['train_loss', 'train_auc', 'val_loss', 'val_auc', 'lr']


def config(synth_dir, ckpt, **fit):
    "A worker configuration: the tiny MLP (with dropout) on 32-pixel tiles with flips, constant learning rate."
    return dict(data=dict(data_dir=str(synth_dir), batch_size=8, seed=0, size=32, augment={'flips': True}, device='cpu'),
                model=dict(name='mlp_small', kw=dict(in_features=3 * 32 * 32, hidden=[32, 16], dropout=0.3)),
                init=None, mlflow=None, fit=dict(method='fit', epochs=EPOCHS, **fit),
                trainer=dict(lr=3e-3, device='cpu', quiet=True, seed=0, ckpt_dir=str(ckpt)))


def run(cfg, tmp, name, **distributed):
    "Write `cfg` and train it under torchrun; return rank 0's fit.json."
    from mhist_nb.ddp import launch_torchrun
    f = tmp/f'{name}.json'
    f.write_text(json.dumps(cfg))
    launch_torchrun(f, quiet=True, backend='gloo', **{'nproc_per_node': 2, **distributed})
    return json.loads((tmp/name/'fit.json').read_text())


def table(fit):
    return np.array([[r[c] for c in COLS] for r in fit['history']], float)


@pytest.fixture(scope='module')
def uninterrupted(synth_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('ddp')
    return tmp, run(config(synth_dir, tmp/'full'), tmp, 'full')


def test_two_process_resume_equals_uninterrupted(uninterrupted, synth_dir):
    tmp, full = uninterrupted
    cfg = config(synth_dir, tmp/'part')
    cfg['fit']['epochs'] = 2                                  # the run stops after epoch 1...
    part = run(cfg, tmp, 'part')
    assert len(part['history']) == 2 and part['world'] == 2
    ck = torch.load(tmp/'part'/'last.pt', weights_only=True)
    assert len(ck['rng_ranks']) == 2 and not torch.equal(ck['rng_ranks'][0]['torch'], ck['rng_ranks'][1]['torch'])
    resumed = run(config(synth_dir, tmp/'part', resume=str(tmp/'part'/'last.pt')), tmp, 'part')
    assert [r['epoch'] for r in resumed['history']] == list(range(EPOCHS))
    np.testing.assert_array_equal(table(resumed), table(full))   # ...and resumes bit for bit: same shards, draws, dropout masks
    assert resumed['best']['epoch'] == full['best']['epoch']
    a = torch.load(tmp/'part'/'best.pt', weights_only=True)['model']
    b = torch.load(tmp/'full'/'best.pt', weights_only=True)['model']
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_needs_the_same_number_of_processes_for_exactness(uninterrupted, synth_dir):
    "A 2-process checkpoint resumed by 3 processes goes on, with one warning that dropout draws differ."
    tmp, _ = uninterrupted
    cfg = config(synth_dir, tmp/'three', resume=str(tmp/'full'/'last.pt'))
    cfg['fit']['epochs'] = EPOCHS + 1
    from mhist_nb.ddp import torchrun_command
    f = tmp/'three.json'
    f.write_text(json.dumps(cfg))
    env = dict(os.environ, MHIST_DDP_BACKEND='gloo', OMP_NUM_THREADS='1')
    r = subprocess.run(torchrun_command(f, 3), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (r.stdout + r.stderr).count('written by 2 process(es), this run has 3') == 1
    hist = json.loads((tmp/'three'/'fit.json').read_text())['history']
    assert [h['epoch'] for h in hist] == list(range(EPOCHS + 1))


def test_two_machines_on_loopback(uninterrupted, synth_dir):
    "Two torchrun agents (nnodes=2, one process each): node 0 has the configuration, node 1 gets it from rank 0."
    from mhist_nb.ddp import torchrun_command
    tmp, full = uninterrupted
    cfg = config(synth_dir, tmp/'nodes')
    f = tmp/'nodes.json'
    f.write_text(json.dumps(cfg))
    port, env = free_port(), dict(os.environ, MHIST_DDP_BACKEND='gloo', OMP_NUM_THREADS='1')
    node = lambda rank, c: subprocess.Popen(torchrun_command(c, 1, nnodes=2, node_rank=rank, master_addr='127.0.0.1',
                                                             master_port=port), env=env, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True)
    n1, n0 = node(1, None), node(0, f)
    out1, out0 = n1.communicate(timeout=600)[0], n0.communicate(timeout=600)[0]
    assert (n0.returncode, n1.returncode) == (0, 0), out0[-3000:] + out1[-3000:]
    nodes = json.loads((tmp/'nodes'/'fit.json').read_text())
    assert nodes['world'] == 2
    np.testing.assert_allclose(table(nodes), table(full), atol=1e-6)   # the same two ranks, wherever they run



PLAIN_LOADER = '''
import sys, torch, torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from mhist_nb.trainer import Trainer
dist.init_process_group('gloo')
torch.manual_seed(0)
x, y = torch.randn(11, 6), (torch.arange(11) % 2).float()
net = torch.nn.Linear(6, 1)
ds = TensorDataset(x, y)
dl = DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds, shuffle=False)) if dist.get_world_size() > 1 else DataLoader(ds, batch_size=4)
pr = Trainer(net, device='cpu', quiet=True).predict(dl)
if dist.get_rank() == 0: pr.to_csv(sys.argv[1], index=False)
dist.destroy_process_group()
'''


def test_plain_loader_with_distributed_sampler(tmp_path):
    """A user's own script: a plain DataLoader with PyTorch's DistributedSampler over 11 samples on 2 ranks (one padded
    repeat). `predict` returns each sample once, in order, equal to one process's predictions."""
    import pandas as pd
    from mhist_nb.ddp import torchrun_command
    script = tmp_path/'predict.py'
    script.write_text(PLAIN_LOADER)
    cmd = torchrun_command(None, 2)
    cmd = cmd[:cmd.index('-m', 3)] + [str(script), str(tmp_path/'2.csv')]     # the script instead of mhist_nb.ddp
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = subprocess.run([sys.executable, str(script), str(tmp_path/'1.csv')], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port())))
    assert r.returncode == 0, r.stderr[-2000:]                   # the same script as one process: the reference
    one, two = pd.read_csv(tmp_path/'1.csv'), pd.read_csv(tmp_path/'2.csv')
    assert len(two) == 11
    np.testing.assert_allclose(two.logit, one.logit, rtol=1e-6)
    np.testing.assert_array_equal(two.y, one.y)
