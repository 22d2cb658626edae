"""Trainer overhead and memory: `Trainer.fit` images/s vs a bare PyTorch loop, and the peak RSS of one CPU training step of the full study MLP.

Part 1 trains each model on the same random in-memory tensors (normalised 3x224x224 float32, ~35% positive labels)
through a plain `DataLoader(TensorDataset(x, y), shuffle=True)`, with the same initial weights (seeded), the same
shuffle order, the same torch threads, AdamW and BCEWithLogitsLoss. The bare loop is zero_grad / forward / loss /
backward / step and nothing else. For the trainer two numbers are given: the train phase alone (`Trainer._train_epoch`,
timed by a wrapper, because the history's `seconds` column also covers validation), and the whole of `fit`
including its per-epoch validation pass, metrics, best.pt/last.pt checkpoints and the final restore of the best
weights. One epoch of each is a warm-up; the next `--epochs` epochs are timed; bare and trainer runs alternate
`--repeats` times and the best run of each is kept.

Part 2 runs one batch training step (forward, backward, AdamW step) of the full study MLP (`create('mlp')`,
150528 -> 2352 -> 2352 -> 294 -> 1) on CPU in a fresh subprocess per row and reads `ru_maxrss` at its end.

    .venv/bin/python benchmarks/trainer.py [--epochs 3] [--batch 32] [--threads N] [--repeats 3] [--skip-full-mlp]
"""
import argparse, json, os, resource, shutil, subprocess, sys, tempfile, time
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from mhist_nb.models import create, MLP, count_parameters
from mhist_nb.trainer import Trainer, Callback, seed_everything

N_TRAIN, N_VAL, POS, SEED = 256, 32, 0.35, 0


def make_data(n, seed):
    "`n` random normalised images and 0/1 labels (~35% positive)."
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 224, 224, generator=g), (torch.rand(n, generator=g) < POS).long()


def loader(ds, batch, shuffle):
    "A plain DataLoader whose shuffle order depends only on SEED, so bare and trainer runs see the same batches."
    return DataLoader(ds, batch_size=batch, shuffle=shuffle, generator=torch.Generator().manual_seed(SEED) if shuffle else None)


def fresh(build):
    seed_everything(SEED)
    return build()


def bare(build, train, batch, epochs, lr):
    "Images/s of a bare loop over `epochs` timed epochs after one warm-up epoch."
    model = fresh(build).train()
    opt, loss_fn, dl = torch.optim.AdamW(model.parameters(), lr=lr, fused=True), nn.BCEWithLogitsLoss(), loader(train, batch, True)
    def epoch():
        for x, y in dl:
            opt.zero_grad()
            loss = loss_fn(model(x).squeeze(-1), y.float())
            loss.backward()
            opt.step()
    epoch()
    t = time.perf_counter()
    for _ in range(epochs): epoch()
    return epochs * len(train) / (time.perf_counter() - t)


class _Clock(Callback):
    "Wall time of `fit` from the start of epoch 1 (after the warm-up epoch 0) to the end of `fit`."
    def on_epoch_start(self, trainer, epoch):
        if epoch == 1: self.t0 = time.perf_counter()
    def on_fit_end(self, trainer): self.t1 = time.perf_counter()


def trainer_run(build, train, val, batch, epochs, lr):
    "Images/s of `Trainer.fit`: (train phase only, whole fit incl. validation + checkpoints), epochs 1..`epochs`."
    model, clock, ckpt = fresh(build), _Clock(), tempfile.mkdtemp(prefix='bench-trainer-')
    tr = Trainer(model, lr=lr, optimizer='adamw', quiet=True, ckpt_dir=ckpt, amp='off', device='cpu', seed=SEED, callbacks=[clock])
    train_secs, inner = [], tr._train_epoch
    def timed(dl, epoch):
        t = time.perf_counter(); out = inner(dl, epoch); train_secs.append(time.perf_counter() - t); return out
    tr._train_epoch = timed                                  # instance attribute: shadows the method for this trainer only
    try: tr.fit(loader(train, batch, True), loader(val, batch, False), epochs=1 + epochs)
    finally: shutil.rmtree(ckpt, ignore_errors=True)
    n = epochs * len(train)
    return n / sum(train_secs[1:]), n / (clock.t1 - clock.t0)


# ---- part 2: one full-MLP step in a child process ----
def child(kind, batch, lr):
    "Run in a fresh process: one training step of the full study MLP; print RSS peaks (KiB) and timings as JSON."
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = dict(import_kib=rss())
    seed_everything(SEED)
    model = create('mlp')
    x, y = make_data(batch, SEED)
    out.update(params=count_parameters(model), setup_kib=rss())
    t = time.perf_counter()
    if kind in ('bare', 'bare_fused'):
        opt, loss_fn = torch.optim.AdamW(model.parameters(), lr=lr, fused=kind == 'bare_fused'), nn.BCEWithLogitsLoss()
        opt.zero_grad()
        loss_fn(model(x).squeeze(-1), y.float()).backward()
        opt.step()
    else:                                                    # the trainer's own step: `_build_opt` + `_train_epoch` on one batch
        tr = Trainer(model, lr=lr, optimizer='adamw', quiet=True, amp='off', device='cpu', seed=SEED)
        tr._build_opt(lr, 1, 1)
        tr._train_epoch(DataLoader(TensorDataset(x, y), batch_size=batch), 0)
        shutil.rmtree(tr.ckpt_dir, ignore_errors=True)
    hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))   # this mm's peak, KiB
    out.update(step_s=time.perf_counter() - t, peak_kib=rss(), vmhwm_kib=hwm)
    print(json.dumps(out))


def run_child(kind, a):
    "Run `child(kind)` in a fresh process whose ru_maxrss does not include this (large) process's memory."
    cmd = [sys.executable, os.path.abspath(__file__), '--_child', kind, '--batch', str(a.batch), '--lr', str(a.lr)]
    if a.threads: cmd += ['--threads', str(a.threads)]
    # Linux carries ru_maxrss across execve (and a vfork/posix_spawn child execs from *our* mm, so it would start at our
    # peak RSS): a direct subprocess would report max(our peak, its own). A shell that forks the command instead of
    # exec-ing it (`; exit $?` stops that) starts the child from the shell's small mm with a fresh maxrss.
    r = subprocess.run(['/bin/sh', '-c', '"$0" "$@"; exit $?', *cmd], capture_output=True, text=True)
    if r.returncode != 0: raise RuntimeError(f'{kind} child failed ({r.returncode}):\n{r.stderr[-3000:]}')
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--epochs', type=int, default=3, help='timed epochs (after one warm-up epoch)')
    ap.add_argument('--batch', type=int, default=32)
    ap.add_argument('--threads', type=int, default=None, help='torch threads (default: torch default)')
    ap.add_argument('--repeats', type=int, default=3, help='alternating bare/trainer runs; best of each is kept')
    ap.add_argument('--lr', type=float, default=1e-3)
    ap.add_argument('--skip-full-mlp', action='store_true', help='skip part 2 (full study MLP peak RSS)')
    ap.add_argument('--_child', choices=('bare', 'bare_fused', 'trainer'), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    if a._child: return child(a._child, a.batch, a.lr)

    train, val = TensorDataset(*make_data(N_TRAIN, SEED)), TensorDataset(*make_data(N_VAL, SEED + 1))
    models = [('vit_micro_conv', lambda: create('vit_micro_conv')),
              ('mlp_small (256, 64, 16)', lambda: MLP(hidden=(256, 64, 16)))]
    rows, spread = [], []
    for name, build in models:
        b, t, f = [], [], []
        for _ in range(a.repeats):
            b.append(bare(build, train, a.batch, a.epochs, a.lr))
            tt, ff = trainer_run(build, train, val, a.batch, a.epochs, a.lr)
            t.append(tt); f.append(ff)
        rows.append((name, max(b), max(t), max(f)))
        spread.append(f'{name}: bare {min(b):.1f}-{max(b):.1f}, trainer train phase {min(t):.1f}-{max(t):.1f}, fit {min(f):.1f}-{max(f):.1f} img/s')
    print(f'{N_TRAIN} random train images 3x224x224, batch {a.batch}, CPU, torch threads {torch.get_num_threads()}, '
          f'cpu_count {os.cpu_count()}, torch {torch.__version__}; 1 warm-up + {a.epochs} timed epochs, best of {a.repeats}; '
          f'fit validates on {N_VAL} images and writes best.pt/last.pt every epoch\n')
    w = max(len(r[0]) for r in rows)
    print(f'| {"model":<{w}} | {"bare img/s":>10} | {"trainer img/s (train phase)":>27} | {"ratio":>6} | '
          f'{"trainer fit img/s incl. val+ckpt":>32} |')
    print(f'|{"-" * (w + 2)}|{"-" * 11}:|{"-" * 28}:|{"-" * 7}:|{"-" * 33}:|')
    for name, b, t, f in rows:
        print(f'| {name:<{w}} | {b:>10.1f} | {t:>27.1f} | {t / b:>6.1%} | {f:>32.1f} |')
    print('\nratio = trainer train phase / bare (goal >= 95%). Range over the repeats (min-max): ' + '; '.join(spread))

    if a.skip_full_mlp: return
    res = {k: run_child(k, a) for k in ('bare', 'bare_fused', 'trainer')}
    n = res['bare']['params']
    floor = 4 * n * 4                                        # params + grads + AdamW exp_avg + exp_avg_sq, fp32
    gb = lambda kib: kib * 1024 / 1e9
    print(f'\nFull study MLP ({n:,} params, {n * 4 / 1e9:.2f} GB fp32), one batch-{a.batch} training step on CPU, '
          f'fresh process per row, peak RSS = ru_maxrss at the end; minus imports = peak - RSS after the imports; '
          f'vs floor = (minus imports) / floor; GB = 10^9 bytes\n')
    print(f'| {"what":<58} | {"peak RSS GB":>11} | {"minus imports GB":>16} | {"vs floor":>8} | {"step s":>6} |')
    print(f'|{"-" * 60}|{"-" * 12}:|{"-" * 17}:|{"-" * 9}:|{"-" * 7}:|')
    print(f'| {"floor: params + grads + 2 AdamW moments (4 x fp32 params)":<58} | {"":>11} | {floor / 1e9:>16.2f} | {"1.00x":>8} | {"":>6} |')
    r = res['bare']; imp = gb(r['import_kib'])
    print(f'| {"process after import torch + mhist_nb (before model)":<58} | {imp:>11.2f} | {0:>16.2f} | {"":>8} | {"":>6} |')
    print(f'| {"process after model + batch created (before the step)":<58} | {gb(r["setup_kib"]):>11.2f} | '
          f'{gb(r["setup_kib"]) - imp:>16.2f} | {"":>8} | {"":>6} |')
    for k, what in (('bare', 'bare step, torch default AdamW (foreach)'),
                    ('bare_fused', 'bare step, AdamW(fused=True)'),
                    ('trainer', 'Trainer._train_epoch on one batch (fused AdamW + metrics)')):
        r = res[k]; net = gb(r['peak_kib']) - gb(r['import_kib'])
        print(f'| {what:<58} | {gb(r["peak_kib"]):>11.2f} | {net:>16.2f} | {net * 1e9 / floor:>7.2f}x | {r["step_s"]:>6.1f} |')
    print('\ncheck: VmHWM of each child (its own address space peak) = ' +
          ', '.join(f'{k} {gb(r["vmhwm_kib"]):.2f} GB' for k, r in res.items()))


if __name__ == '__main__': main()
