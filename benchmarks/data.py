"""Data-layer throughput: synthetic tile generation, and DataLoader epochs that decode PNGs vs epochs read from the cache.

Prints one table; all rows are measured in this run on the same machine and threads.

    .venv/bin/python benchmarks/data.py [--scale 0.1] [--epochs 3] [--batch 64]
"""
import argparse, os, shutil, tempfile, time
from pathlib import Path
import torch
from torch.utils.data import DataLoader, BatchSampler, SequentialSampler
from mhist_nb.data import read_mhist, TileCache, MHISTDataset, make_transform, _Batches
from mhist_nb.synth import synth


def epoch(ds, batch):
    "Seconds for one pass over `ds` through the project's batched DataLoader, in the main process."
    dl = DataLoader(_Batches(ds), sampler=BatchSampler(SequentialSampler(ds), batch, drop_last=False), batch_size=None)
    t = time.perf_counter()
    for _ in dl: pass
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--scale', type=float, default=0.1)
    ap.add_argument('--epochs', type=int, default=3)
    ap.add_argument('--batch', type=int, default=64)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    try:
        t = time.perf_counter(); d = synth(tmp/'synth', scale=a.scale, seed=0, n_jobs=1)
        t_synth = time.perf_counter() - t
        df = read_mhist(d, check_images=False); n = len(df)
        tf = make_transform([0.5] * 3, [0.25] * 3)
        rows = [('synth: generate + write PNG (1 process)', n / t_synth)]
        mem = MHISTDataset(df, TileCache(d, df.name, mode='memory'), tf)
        first = epoch(mem, a.batch)
        cached = min(epoch(mem, a.batch) for _ in range(a.epochs))
        rows += [('memory cache: first epoch (decodes PNGs)', n / first), ('memory cache: cached epoch (best of %d)' % a.epochs, n / cached)]
        t = time.perf_counter(); cache = TileCache(d, df.name, mode='disk', cache_dir=tmp/'cache'); t_build = time.perf_counter() - t
        disk = MHISTDataset(df, cache, tf)
        t_disk = min(epoch(disk, a.batch) for _ in range(a.epochs))
        rows += [('disk cache: build memmap (decodes PNGs)', n / t_build), ('disk cache: memmap epoch (best of %d)' % a.epochs, n / t_disk)]
        nocache = MHISTDataset(df, TileCache(d, df.name, mode='none'), tf)
        rows += [('no cache: epoch (decodes every time)', n / epoch(nocache, a.batch))]
        base = n / first
        print(f'{n} tiles of 224x224, batch {a.batch}, main process (workers 0), torch threads {torch.get_num_threads()}, cpu_count {os.cpu_count()}\n')
        print(f'| {"what":<46} | {"tiles/s":>9} | {"vs first epoch":>14} |')
        print(f'|{"-" * 48}|{"-" * 11}:|{"-" * 15}:|')
        for what, r in rows: print(f'| {what:<46} | {r:>9.0f} | {r / base:>13.1f}x |')
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__': main()
