"""GPU training throughput: does the data path keep the GPU busy? One table, all rows measured in one run on one GPU.

Rows (images/s over the training phase of an epoch, after warm-up epochs; the same model, initial weights,
batch size, bf16 autocast and fused AdamW everywhere):

- bare loop: zero_grad / forward / loss / backward / step over ready-made normalised batches already on the GPU;
- Trainer, same batches: `Trainer` fed that same list of GPU batches (the trainer's own overhead);
- Trainer + MHISTData, workers: the worker path (`data_device='workers'`, pinned memory, flips + rot90 per tile);
- Trainer + MHISTData, device: uint8 tiles resident on the GPU, batched flips + rot90 + normalisation there;
- the same bare loop and device-path Trainer under `torch.compile` (compile time reported apart).

"% bare" is each row over the bare loop of the same run (goal: the device path >= 95 %; the script exits 1 when the
Trainer on the device path runs at < 90 %, `--floor`). MFU is model FLOPs (one forward and backward, counted by
`torch.utils.flop_counter`) times images/s over the card's dense bf16 peak from its datasheet (`DENSE_BF16_TFLOPS`,
looked up by the name torch reports; the peak measured here on an 8192^3 bf16 matmul is printed beside it). Tiles
come from `mhist_nb.synth` (3,152 at `--scale 1`). `--json FILE` writes the table and the verdict.

    python benchmarks/gpu.py [--model vit_base] [--batch 128] [--epochs 2] [--workers 8] [--scale 1.0] [--no-compile]

Without a CUDA GPU it says so and exits 0; `--device cpu` with a tiny model (`--model vit_micro_conv --scale 0.02
--batch 16 --no-compile`) runs the same code on a CPU, to check the script itself.
"""
import argparse, json, os, shutil, sys, tempfile, time
from pathlib import Path
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))       # runs from a checkout without installation
from mhist_nb.data import MHISTData
from mhist_nb.models import create
from mhist_nb.synth import synth
from mhist_nb.trainer import Trainer, seed_everything

SEED = 0
FLOOR = 0.90      # the Trainer on the device path must run at >= 90 % of the bare loop's images/s

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets, by a substring of the device name
# (most specific first). Cards without native bf16 (T4, V100) list their fp16 peak: what autocast uses there.
DENSE_BF16_TFLOPS = [('H200', 989), ('GH200', 989), ('H100 PCIe', 756), ('H100 NVL', 835), ('H100', 989),
                     ('B200', 2250), ('A100', 312), ('L40S', 362), ('L40', 181), ('L4', 121),
                     ('RTX 4090', 165), ('RTX A6000', 155), ('T4', 65), ('V100', 125)]


def datasheet_peak(name: str) -> tuple[float, str]:
    "(dense bf16 FLOP/s, the table's key) for a device name, or (nan, '') when the card is not in the table."
    for key, tflops in DENSE_BF16_TFLOPS:
        if key in name: return tflops * 1e12, key
    return float('nan'), ''


def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)


def matmul_peak(device, n=8192, iters=20) -> float:
    "Measured bf16 matmul FLOP/s on `device` (n x n x n)."
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3): a @ b
    sync(device); t = time.perf_counter()
    for _ in range(iters): a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t)


def model_flops(build, device, amp) -> float:
    "FLOPs of one training step (forward + backward) per image."
    from torch.utils.flop_counter import FlopCounterMode
    m, x = build().to(device), torch.randn(2, 3, 224, 224, device=device)
    with FlopCounterMode(display=False) as fc:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None): out = m(x)
        out.float().sum().backward()
    return fc.get_total_flops() / 2


def fresh(name):
    seed_everything(SEED)
    return create(name)


def bare(name, batches, device, amp, epochs, warmup, compiled=False):
    "Images/s of a bare loop over ready-made `batches`; returns (img/s, seconds of the first epoch)."
    model = fresh(name).to(device).train()
    fwd = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ('cuda', 'cpu'))
    loss_fn = nn.BCEWithLogitsLoss()
    def epoch():
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = fwd(x).squeeze(-1)
            loss_fn(out.float(), y).backward()
            opt.step()
        sync(device)
    t = time.perf_counter(); epoch(); first = time.perf_counter() - t
    for _ in range(warmup - 1): epoch()
    t = time.perf_counter()
    for _ in range(epochs): epoch()
    return epochs * sum(len(y) for _, y in batches) / (time.perf_counter() - t), first


def trainer(name, train, val, device, amp, epochs, warmup, scratch, compiled=False):
    "Images/s of `Trainer`'s training phase (validation, metrics and checkpoints excluded); (img/s, first epoch s)."
    t = Trainer(fresh(name), lr=1e-4, quiet=True, amp={torch.bfloat16: 'bf16', None: 'off'}[amp], device=str(device),
                seed=SEED, save_last=False, ckpt_dir=tempfile.mkdtemp(prefix='ckpt-', dir=scratch), compile=compiled)
    secs, n, inner = [], [], t._train_epoch
    def timed(dl, epoch):
        s = time.perf_counter(); out = inner(dl, epoch); sync(device)
        secs.append(time.perf_counter() - s); n.append(len(dl.dataset) if hasattr(dl, 'dataset') else sum(len(b[1]) for b in dl))
        return out
    t._train_epoch = timed                                  # instance attribute: this trainer only
    t.fit(train, val, epochs=warmup + epochs)
    return sum(n[warmup:]) / sum(secs[warmup:]), secs[0]


def main(argv=None):
    "Run `measure` in a scratch folder (synthetic tiles, checkpoints) that is removed afterwards, whatever happens."
    scratch = Path(tempfile.mkdtemp(prefix='mhist-bench-gpu-'))
    try: return measure(argv, scratch)
    finally: shutil.rmtree(scratch, ignore_errors=True)


def measure(argv, scratch: Path):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--model', default='vit_base'); ap.add_argument('--batch', type=int, default=128)
    ap.add_argument('--epochs', type=int, default=2); ap.add_argument('--warmup', type=int, default=1)
    ap.add_argument('--workers', type=int, default=8); ap.add_argument('--scale', type=float, default=1.0)
    ap.add_argument('--device', default=None); ap.add_argument('--no-compile', action='store_true')
    ap.add_argument('--data-dir', default=None, help='an MHIST-layout folder (default: synthetic tiles in a temp dir)')
    ap.add_argument('--floor', type=float, default=FLOOR, help='exit 1 when the device path is below this share of the bare loop')
    ap.add_argument('--json', default=None, help='write the table and the verdict to this file')
    a = ap.parse_args(argv)
    if a.device is None and not torch.cuda.is_available():
        print('benchmarks/gpu.py: no CUDA GPU here, nothing to measure (use --device cpu to check the script).'); return 0
    device = torch.device(a.device or 'cuda')
    amp = torch.bfloat16 if device.type == 'cuda' else None
    if device.type == 'cuda': torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True
    data_dir = Path(a.data_dir) if a.data_dir else synth(scratch / 'synth', scale=a.scale, seed=0,
                                                          n_jobs=os.cpu_count() or 1)
    aug = dict(flips=True, rot90=True)
    mk = lambda **kw: MHISTData(data_dir, batch_size=a.batch, seed=SEED, augment=aug, device=str(device), **kw)
    dev_data = mk(data_device=str(device))
    # ready-made batches: the device path's first epoch, materialised once
    batches = [(x.contiguous(), y) for x, y, *_ in dev_data.train]
    val_batches = [(x, y) for x, y, *_ in dev_data.val]
    n_train = sum(len(y) for _, y in batches)
    print(f'{torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"}, torch {torch.__version__}, '
          f'{a.model}, batch {a.batch}, {n_train} training tiles, amp {amp}', flush=True)
    rows = []
    def add(label, fn):
        ips, first = fn(); rows.append((label, ips, first)); print(f'  {label:<42} {ips:9.1f} img/s', flush=True)
    e, w = a.epochs, a.warmup
    add('bare loop, GPU batches', lambda: bare(a.model, batches, device, amp, e, w))
    add('Trainer, same batches', lambda: trainer(a.model, batches, val_batches, device, amp, e, w, scratch))
    wk = mk(data_device='workers', num_workers=a.workers)
    add(f'Trainer + MHISTData, workers ({a.workers})', lambda: trainer(a.model, wk.train, wk.val, device, amp, e, w, scratch))
    del wk
    add('Trainer + MHISTData, device', lambda: trainer(a.model, dev_data.train, dev_data.val, device, amp, e, w, scratch))
    if not a.no_compile:
        add('bare loop, compiled', lambda: bare(a.model, batches, device, amp, e, w + 1, compiled=True))
        add('Trainer + MHISTData, device, compiled', lambda: trainer(a.model, dev_data.train, dev_data.val, device, amp, e, w + 1, scratch, compiled=True))
    flops = model_flops(lambda: create(a.model), device, amp)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'
    peak, key = datasheet_peak(name) if device.type == 'cuda' else (float('nan'), '')
    measured = matmul_peak(device) if device.type == 'cuda' else float('nan')
    base = rows[0][1]
    print(f'\nmodel: {flops / 1e9:.1f} GFLOP per image per training step; {name}: dense bf16 peak '
          f'{peak / 1e12:.0f} TFLOP/s ({"datasheet, " + key if key else "not in DENSE_BF16_TFLOPS"}), '
          f'measured on a bf16 matmul {measured / 1e12:.0f} TFLOP/s\n')
    print(f'| {"path":<42} | {"img/s":>8} | {"% bare":>6} | {"MFU":>6} | {"1st epoch s":>11} |')
    print(f'|{"-" * 44}|{"-" * 10}|{"-" * 8}|{"-" * 8}|{"-" * 13}|')
    for label, ips, first in rows:
        print(f'| {label:<42} | {ips:8.1f} | {100 * ips / base:5.1f}% | {100 * ips * flops / peak:5.1f}% | {first:11.1f} |')
    share = rows[3][1] / base
    ok = share >= a.floor
    print(f'\ndevice path at {100 * share:.1f} % of the bare loop (goal >= 95 %, floor {100 * a.floor:.0f} %): '
          f'{"pass" if ok else "FAIL"}')
    if a.json:
        num = lambda v: None if v != v else v                              # NaN (no datasheet peak, CPU) as null
        Path(a.json).write_text(json.dumps(dict(
            device=name, torch=torch.__version__, model=a.model, batch=a.batch, train_tiles=n_train, amp=str(amp),
            gflop_per_image=flops / 1e9, peak_tflops=num(peak / 1e12), peak_source=f'datasheet ({key})' if key else None,
            measured_matmul_tflops=num(measured / 1e12), device_path_share=share, floor=a.floor, ok=ok,
            rows=[dict(path=label, img_s=ips, share_of_bare=ips / base, mfu=num(ips * flops / peak), first_epoch_s=first)
                  for label, ips, first in rows]), indent=1, allow_nan=False))
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
