"""GPU checks (pytest -m gpu; skipped without CUDA): resume on CUDA and across devices, bf16 and fp16 steps, `amp='auto'`,
and the device-resident data path against the worker path. `make gpu-check` runs them, then benchmarks/gpu.py."""
import pytest, torch
import pandas as pd
from torch.utils.data import DataLoader, TensorDataset

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]


def toy(n=320, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < 0.35).float()
    x = torch.randn(n, 3, 8, 8, generator=g) + 0.4 * y[:, None, None, None] * torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(9))
    return TensorDataset(x, y)


def loaders():
    from mhist_nb.data import EpochSampler
    tr, va = toy(), toy(160, 1)
    return DataLoader(tr, batch_size=32, sampler=EpochSampler(len(tr), 0)), DataLoader(va, batch_size=64)


def trainer(ckpt, device='cuda', amp='off', cbs=(), dropout=0.3):
    from mhist_nb.models import MLP
    from mhist_nb.trainer import Trainer
    torch.manual_seed(0)
    return Trainer(MLP(in_features=192, hidden=(32, 16), dropout=dropout), lr=3e-3, scheduler='cosine', quiet=True,
                   device=device, amp=amp, ckpt_dir=ckpt, callbacks=cbs, seed=7)


class Stop:
    def __getattr__(self, name): return lambda *a: None
    def on_epoch_end(self, trainer, row):
        if row['epoch'] == 1: raise KeyboardInterrupt


def test_resume_on_cuda_and_across_devices(tmp_path):
    tr, va = loaders()
    straight = trainer(tmp_path/'a'); h = straight.fit(tr, va, epochs=4)
    with pytest.raises(KeyboardInterrupt): trainer(tmp_path/'b', cbs=[Stop()]).fit(tr, va, epochs=4)
    resumed = trainer(tmp_path/'b'); h2 = resumed.fit(tr, va, epochs=4, resume=tmp_path/'b'/'last.pt')
    pd.testing.assert_frame_equal(h.drop(columns='seconds'), h2.drop(columns='seconds'), rtol=1e-4)
    on_cpu = trainer(tmp_path/'c', device='cpu')                  # a GPU checkpoint continues on a CPU
    on_cpu.load_checkpoint(tmp_path/'b'/'last.pt')
    assert on_cpu.epoch == 3 and next(on_cpu.model.parameters()).device.type == 'cpu'


@pytest.mark.parametrize('amp', ['bf16', 'fp16', 'auto'])
def test_mixed_precision_steps(tmp_path, amp):
    tr, va = loaders()
    t = trainer(tmp_path, amp=amp, dropout=0.)
    h = t.fit(tr, va, epochs=3)
    assert h.train_loss.notna().all() and h.val_auc.iloc[-1] > 0.75, h.val_auc.tolist()
    assert t.scaler.is_enabled() == (t.amp == torch.float16)
    if amp == 'auto': assert t.amp == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    assert t.predict(va).logit.dtype == 'float32'


def test_device_path_matches_worker_path(tmp_path):
    from mhist_nb.synth import synth
    from mhist_nb.data import MHISTData
    d = synth(tmp_path/'synth', scale=0.03, seed=0, n_jobs=4)
    mk = lambda **kw: MHISTData(d, batch_size=16, seed=1, augment=dict(flips=True, rot90=True, hed_jitter=0.05), **kw)
    gpu, cpu = mk(data_device='cuda'), mk(data_device='workers', num_workers=0)
    assert gpu.data_device == 'cuda' and mk(data_device='auto').data_device == 'cuda'   # auto: a few MB fit on any GPU
    assert mk().data_device == 'workers'                                     # the default: CPU tensors for readers
    for _ in range(2):                                                       # two epochs: order and draws per epoch
        for (xg, yg, ng, _), (xc, yc, nc, _) in zip(gpu.train, cpu.train):
            assert xg.device.type == 'cuda' and ng == nc
            torch.testing.assert_close(xg.cpu(), xc, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(yg.cpu(), yc)
