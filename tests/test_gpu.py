"""GPU checks (pytest -m gpu; `make gpu-check` runs them through tools/gpu_check.py, which tabulates the outcome).

Each test is a claim the README makes about training on a GPU: resume on the same GPU, from a CPU checkpoint and from
a checkpoint written with more GPUs visible; bf16 and fp16 autocast really engaged (checked on the activations'
dtypes, not on the trainer's settings); `amp: auto` choosing as the card's datasheet says; both data paths giving the
same batches; `compile` giving eager's losses; `deterministic: true` resuming bit for bit; with two GPUs or more,
NCCL DDP on 2 ranks equal to one process, each rank on its own GPU.

MHIST_CHECK_DEVICE=cpu runs the same tests on the CPU (`tools/gpu_check.py --device cpu`, part of `make test`), so
the tests themselves are exercised before a GPU is found for them; tests that only a GPU can answer skip there.
"""
import json, os
import pandas as pd, pytest, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

DEVICE = os.environ.get('MHIST_CHECK_DEVICE', 'cuda')
ON_GPU = DEVICE.startswith('cuda')
COMPILE_BACKEND = os.environ.get('MHIST_CHECK_COMPILE', 'inductor')
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(), reason='needs a CUDA GPU')]

# Cards whose bf16 is native (compute capability >= 8.0) or not, by the name torch reports; written from NVIDIA's
# datasheets, independently of amp_dtype's rule, so that the `auto` test can fail.
NATIVE_BF16 = {'A100': True, 'A10': True, 'A30': True, 'A40': True, 'L4': True, 'L40': True, 'H100': True, 'H200': True,
               'GH200': True, 'B200': True, 'RTX 4090': True, 'RTX 3090': True, 'RTX A6000': True,
               'T4': False, 'V100': False, 'P100': False, 'RTX 2080': False}
COMPILE_TOL = 1e-3      # |per-step loss, compiled - eager| (fp32, no TF32): kernels fuse and reorder sums, no more
DDP_TOL = 1e-3          # |metric, 2 NCCL ranks - 1 process| (fp32, no TF32): the ranks sum their halves in another order


def toy(n=320, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < 0.35).float()
    x = torch.randn(n, 3, 8, 8, generator=g) + 0.4 * y[:, None, None, None] * torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(9))
    return TensorDataset(x, y)


def loaders():
    from mhist_nb.data import EpochSampler
    tr, va = toy(), toy(160, 1)
    return DataLoader(tr, batch_size=32, sampler=EpochSampler(len(tr), 0)), DataLoader(va, batch_size=64)


def trainer(ckpt, device=DEVICE, amp='off', cbs=(), dropout=0.3, **kw):
    from mhist_nb.models import MLP
    from mhist_nb.trainer import Trainer
    torch.manual_seed(0)
    return Trainer(MLP(in_features=192, hidden=(32, 16), dropout=dropout), lr=3e-3, scheduler='cosine', quiet=True,
                   device=device, amp=amp, ckpt_dir=ckpt, callbacks=cbs, seed=7, **kw)


class Stop:
    "A callback that interrupts training after epoch `at`."
    def __init__(self, at=1): self.at = at
    def __getattr__(self, name): return lambda *a: None
    def on_epoch_end(self, trainer, row):
        if row['epoch'] == self.at: raise KeyboardInterrupt


def interrupted(path, make, fit):
    "Train with `make(path, cbs)` until the `Stop`; return the checkpoint it left."
    with pytest.raises(KeyboardInterrupt): fit(make(path, [Stop()]))
    return path/'last.pt'


def strip(h): return h.drop(columns='seconds')


def test_resume_on_the_same_device(tmp_path):
    tr, va = loaders()
    fit = lambda t, **kw: t.fit(tr, va, epochs=4, **kw)
    h = fit(trainer(tmp_path/'a'))
    ck = interrupted(tmp_path/'b', lambda p, cbs: trainer(p, cbs=cbs), fit)
    pd.testing.assert_frame_equal(strip(h), strip(fit(trainer(tmp_path/'b'), resume=ck)), rtol=1e-4)
    on_cpu = trainer(tmp_path/'c', device='cpu')                  # a checkpoint of this device continues on a CPU
    on_cpu.load_checkpoint(ck)
    assert on_cpu.epoch == 3 and next(on_cpu.model.parameters()).device.type == 'cpu'


def test_resume_from_a_cpu_checkpoint(tmp_path):
    tr, va = loaders()
    ck = interrupted(tmp_path/'cpu', lambda p, cbs: trainer(p, device='cpu', cbs=cbs), lambda t: t.fit(tr, va, epochs=4))
    t = trainer(tmp_path/'cpu', amp='fp16' if ON_GPU else 'off')  # and with loss scaling, which the CPU run had not
    h = t.fit(tr, va, epochs=4, resume=ck)
    assert h.epoch.tolist() == [0, 1, 2, 3] and h.train_loss.notna().all()
    assert next(t.model.parameters()).device.type == torch.device(DEVICE).type


def test_resume_from_a_checkpoint_with_more_gpus(tmp_path):
    "A checkpoint holding one CUDA RNG state per GPU of an 8-GPU machine (the older form) resumes on this one."
    tr, va = loaders()
    ck = interrupted(tmp_path/'x', lambda p, cbs: trainer(p, cbs=cbs), lambda t: t.fit(tr, va, epochs=3))
    state = torch.load(ck, weights_only=True)
    if ON_GPU: assert state['rng']['cuda'].dim() == 1            # one device's state, not one per visible GPU
    state['rng']['cuda'] = [torch.cuda.get_rng_state() if ON_GPU else torch.zeros(8, dtype=torch.uint8)] * 8
    torch.save(state, ck)
    assert len(trainer(tmp_path/'x').fit(tr, va, epochs=3, resume=ck)) == 3
    if ON_GPU and torch.cuda.device_count() >= 2:                 # written on cuda:1, resumed on cuda:0
        ck1 = interrupted(tmp_path/'y', lambda p, cbs: trainer(p, device='cuda:1', cbs=cbs), lambda t: t.fit(tr, va, epochs=3))
        assert len(trainer(tmp_path/'y', device='cuda:0').fit(tr, va, epochs=3, resume=ck1)) == 3


class Dtypes:
    "Forward hooks recording the output dtype of every Linear layer while training."
    def __init__(self, model):
        self.seen = set()
        self.hooks = [m.register_forward_hook(lambda m, i, o: self.seen.add(o.dtype)) for m in model.modules()
                      if isinstance(m, nn.Linear)]
    def remove(self):
        for h in self.hooks: h.remove()


@pytest.mark.parametrize('amp', ['bf16', 'fp16', 'auto'])
def test_autocast_engaged(tmp_path, amp):
    tr, va = loaders()
    t = trainer(tmp_path, amp=amp, dropout=0.)
    want = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(amp)
    if amp == 'auto':
        if not ON_GPU: want = None                                           # off on a CPU
        else:
            name = torch.cuda.get_device_name(t.device)
            known = [v for k, v in NATIVE_BF16.items() if k in name]
            if not known: pytest.skip(f'{name} is not in the datasheet table NATIVE_BF16: cannot say what auto should pick')
            want = torch.bfloat16 if known[0] else torch.float16
    hooks = Dtypes(t.model)
    h = t.fit(tr, va, epochs=3)
    hooks.remove()
    assert h.train_loss.notna().all() and h.val_auc.iloc[-1] > 0.75, h.val_auc.tolist()
    assert (want or torch.float32) in hooks.seen, hooks.seen                # training ran in that dtype...
    assert t.scaler.is_enabled() == (want == torch.float16)                  # ...with loss scaling for fp16 only
    assert t.predict(va).logit.dtype == 'float32'                            # predictions stay float32
    print(f"amp {amp}: Linear outputs in {sorted(str(d).removeprefix('torch.') for d in hooks.seen)}, loss scaling {t.scaler.is_enabled()}")


def test_device_path_matches_worker_path(tmp_path):
    from mhist_nb.synth import synth
    from mhist_nb.data import MHISTData
    d = synth(tmp_path/'synth', scale=0.03, seed=0, n_jobs=4)
    base = dict(batch_size=16, seed=1, augment=dict(flips=True, rot90=True, hed_jitter=0.05), device=DEVICE)
    mk = lambda **kw: MHISTData(d, **{**base, **kw})
    dev, cpu = mk(data_device=DEVICE), mk(data_device='workers', num_workers=0)
    if ON_GPU: assert dev.data_device.startswith('cuda:') and mk(data_device='auto').data_device == dev.data_device
    assert mk(device='cpu').data_device == 'workers'                         # the default: CPU tensors for readers
    for _ in range(2):                                                       # two epochs: order and draws per epoch
        for (xg, yg, ng, _), (xc, yc, nc, _) in zip(dev.train, cpu.train):
            assert xg.device.type == torch.device(DEVICE).type and ng == nc
            torch.testing.assert_close(xg.cpu(), xc, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(yg.cpu(), yc)
    assert dev.val.dataset[0][0].device.type == 'cpu'                        # the dataset's own transform stayed put


class Losses:
    "Every training step's loss, as a float."
    def __getattr__(self, name): return lambda *a: None
    def __init__(self): self.steps = []
    def on_batch_end(self, trainer, batch, loss): self.steps.append(float(loss))


def test_compile_matches_eager(tmp_path):
    "Three epochs (30 steps) of `vit_micro_conv` on 64-pixel tiles, fp32 without TF32: compiled losses equal eager's."
    from mhist_nb.models import create
    from mhist_nb.trainer import Trainer, _full_fp32
    x, y = torch.randn(320, 3, 64, 64, generator=torch.Generator().manual_seed(0)), (torch.arange(320) % 3 == 0).float()
    x[y == 1, :, ::8] += 1.                                                 # a learnable stripe pattern
    dl = DataLoader(TensorDataset(x, y), batch_size=32)
    runs = {}
    for mode in ('eager', COMPILE_BACKEND):
        torch.manual_seed(0)
        log = Losses()
        t = Trainer(create('vit_micro_conv', img_size=64), lr=1e-3, amp='off', device=DEVICE, quiet=True, seed=0,
                    save_last=False, ckpt_dir=tmp_path/mode, callbacks=[log], compile=False if mode == 'eager' else mode)
        with _full_fp32(): t.fit(dl, dl, epochs=3)
        runs[mode] = torch.tensor(log.steps)
    d = (runs[COMPILE_BACKEND] - runs['eager']).abs().max().item()
    print(f'compile ({COMPILE_BACKEND}) vs eager: max |loss difference| over {len(runs["eager"])} steps = {d:.2e} (tolerance {COMPILE_TOL})')
    assert len(runs['eager']) == 30 and d <= COMPILE_TOL


def test_deterministic_resume_is_bit_exact(tmp_path):
    "`vit_micro_conv` with dropout, autocast as `auto` picks, deterministic: interrupted and resumed == uninterrupted, bit for bit."
    from mhist_nb.models import create
    from mhist_nb.trainer import Trainer
    x, y = torch.randn(192, 3, 32, 32, generator=torch.Generator().manual_seed(1)), (torch.arange(192) % 3 == 0).float()
    from mhist_nb.data import EpochSampler
    tr = DataLoader(TensorDataset(x, y), batch_size=32, sampler=EpochSampler(192, 0))
    va = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32)
    def make(path, cbs=()):
        torch.manual_seed(0)
        return Trainer(create('vit_micro_conv', img_size=32, drop_rate=0.2, attn_drop_rate=0.1), lr=1e-3, amp='auto',
                       device=DEVICE, quiet=True, seed=3, ckpt_dir=path, callbacks=cbs, deterministic=True)
    fit = lambda t, **kw: t.fit(tr, va, epochs=4, **kw)
    straight = make(tmp_path/'a'); h = fit(straight)
    ck = interrupted(tmp_path/'b', make, fit)
    resumed = make(tmp_path/'b'); h2 = fit(resumed, resume=ck)
    pd.testing.assert_frame_equal(strip(h), strip(h2), check_exact=True)
    for k, v in straight.model.state_dict().items(): assert torch.equal(resumed.model.state_dict()[k], v), k
    print(f'resumed after epoch 1 == uninterrupted, {len(h)} epochs, bit for bit (amp {straight.amp})')


@pytest.mark.skipif(not ON_GPU or torch.cuda.device_count() < 2, reason='only a GPU can show this' if not ON_GPU else
                    f'NCCL DDP needs at least 2 GPUs; this machine has {torch.cuda.device_count()}')
def test_nccl_two_ranks_equal_one_process(tmp_path):
    from mhist_nb.data import MHISTData
    from mhist_nb.ddp import data_options, fit_torchrun
    from mhist_nb.models import create
    from mhist_nb.synth import synth
    from mhist_nb.trainer import Trainer, _full_fp32
    p = dict(batch_size=16, seed=0, size=32, augment=dict(flips=True, rot90=True), device='cuda', data_device='auto')
    data = MHISTData(synth(tmp_path/'synth', scale=0.05, seed=0, n_jobs=4), **p)
    kw = dict(img_size=32)
    def make(name):
        torch.manual_seed(0)
        return Trainer(create('vit_micro_conv', **kw), lr=1e-3, amp='off', device='cuda', quiet=True, ckpt_dir=tmp_path/name)
    with _full_fp32(): one = make('one').fit(data.train, data.val, epochs=3)
    env = dict(NVIDIA_TF32_OVERRIDE='0')                                     # the ranks in plain fp32 too
    old = {k: os.environ.get(k) for k in env}; os.environ.update(env)
    try: two = fit_torchrun(make('two'), data_options(p, data), 'vit_micro_conv', kw, dict(method='fit', epochs=3),
                            dict(nproc_per_node=2, backend='nccl'), quiet=True)
    finally:
        for k, v in old.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v
    cols = ['train_loss', 'val_loss', 'val_auc']
    d = (two[cols] - one[cols]).abs().max().max()
    print(f'NCCL 2 ranks vs 1 process: max |difference| of {cols} = {d:.2e} (tolerance {DDP_TOL})')
    assert d <= DDP_TOL
    devices = json.loads((tmp_path/'two'/'fit.json').read_text())['devices']
    assert [r['model'] for r in devices] == ['cuda:0', 'cuda:1'] and all(r['data'] == r['model'] for r in devices), devices
