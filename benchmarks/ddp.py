"""Training under torchrun vs one process: seconds per epoch and agreement, measured side by side in one run.

The same model, data, global batch and initial weights are trained for `--epochs` epochs three ways: in this process
(`Trainer.fit`), and with `fit_torchrun` (32_ddp) on 1 and on `--nproc` processes. On a machine with N >= 2 GPUs the
default is N processes with NCCL; on CPUs it is 2 processes with gloo, each with its share of the cores (on a 2-core
machine this measures DDP's overhead, not a speed-up). The table gives the median seconds per epoch (the history's
`seconds`: train + validation, epoch 0 excluded as warm-up) and the largest |difference| of the validation AUC and loss
from the in-process run.

    .venv/bin/python benchmarks/ddp.py [--epochs 4] [--nproc N] [--model mlp_small] [--size 64] [--scale 0.1] [--json FILE]
"""
import argparse, json, os, shutil, tempfile
from pathlib import Path
import numpy as np, pandas as pd, torch
from mhist_nb.data import MHISTData
from mhist_nb.ddp import data_options, fit_torchrun
from mhist_nb.models import create
from mhist_nb.synth import synth
from mhist_nb.trainer import Trainer


def main():
    gpus = torch.cuda.device_count()
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--epochs', type=int, default=4)
    ap.add_argument('--nproc', type=int, default=gpus if gpus >= 2 else 2)
    ap.add_argument('--model', default='mlp_small')
    ap.add_argument('--size', type=int, default=64, help='tile side after resizing (the MLP input follows it)')
    ap.add_argument('--scale', type=float, default=0.1, help='synthetic set size (1.0: as many tiles as MHIST)')
    ap.add_argument('--batch', type=int, default=32)
    ap.add_argument('--json', default=None, help='also write the table to this file')
    a = ap.parse_args()
    device = 'cuda' if gpus else 'cpu'
    tmp = Path(tempfile.mkdtemp(prefix='mhist-bench-ddp-'))
    try:
        p = dict(batch_size=a.batch, seed=0, cache='memory', size=a.size, augment=dict(flips=True), device=device)
        data = MHISTData(synth(tmp/'synth', scale=a.scale, seed=0), **p)
        kw = dict(in_features=3 * a.size * a.size) if a.model.startswith('mlp') else dict(img_size=a.size)

        def trainer(name):
            torch.manual_seed(0)
            return Trainer(create(a.model, **kw), lr=1e-3, device=device, quiet=True, save_last=False, ckpt_dir=tmp/name)

        runs = {'one process (in-process fit)': trainer('inproc').fit(data.train, data.val, epochs=a.epochs)}
        for n in (1, a.nproc):
            dist = dict(nproc_per_node=n, backend='nccl' if gpus >= n > 1 else 'gloo')
            runs[f'torchrun, {n} process(es), {dist["backend"]}'] = fit_torchrun(
                trainer(f'ddp{n}'), data_options(p, data), a.model, kw, dict(method='fit', epochs=a.epochs), dist, quiet=True)
        ref = runs['one process (in-process fit)']
        rows = [dict(run=k, s_per_epoch=float(np.median(h.seconds[1:])) if len(h) > 1 else float(h.seconds[0]),
                     max_abs_d_val_auc=float((h.val_auc - ref.val_auc).abs().max()),
                     max_abs_d_val_loss=float((h.val_loss - ref.val_loss).abs().max())) for k, h in runs.items()]
        print(f'{a.model}, {len(data.train.dataset)} training tiles at {a.size}px, batch {a.batch}, {a.epochs} epochs, '
              f'{device} ({gpus} GPU(s), {os.cpu_count()} cores)')
        print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f'{v:.3g}'))
        if a.json: Path(a.json).write_text(json.dumps(dict(model=a.model, size=a.size, batch=a.batch, epochs=a.epochs,
                                                           device=device, gpus=gpus, rows=rows), indent=1))
    finally: shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__': main()
