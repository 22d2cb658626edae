"""Explanation maps outside the notebook's own tests: the study ViT's class-token read-out, maps leave a model exactly as
they found it, the crypt walls of the shared synthetic set redraw exactly, 15_explain runs in every pipeline, and
(with a GPU) maps on CUDA agree with maps on the CPU."""
import copy

import pytest, torch, yaml

from conftest import ROOT


def test_every_pipeline_explains_after_the_comparison():
    from mhist_nb.pipeline import DEFAULT_RUN
    assert DEFAULT_RUN[-2:] == ('14_compare', '15_explain'), DEFAULT_RUN
    for f in ('demo', 'mhist_cpu', 'mhist_gpu', 'gpu_smoke'):
        assert yaml.safe_load((ROOT/'params'/f'{f}.yaml').read_text())['run'] == list(DEFAULT_RUN), f


def test_study_vit_rollout_reads_the_class_token():
    "ViT-B/16 (random weights): 12 blocks of 197 tokens, the class token's row, a map of shares on the 224 tile."
    from mhist_nb.models import create
    from mhist_nb.explain import block_attentions, rollout, readout_of, attention_rollout
    torch.manual_seed(0)
    vb, x = create('vit_base'), torch.randn(1, 3, 224, 224)
    att = block_attentions(vb, x)
    assert readout_of(vb) == 'cls' and len(att) == 12 and att[0].shape == (1, 197, 197)
    r = rollout(att)
    torch.testing.assert_close(r.sum(-1), torch.ones(1, 197))
    assert 0 < r[0, 0, 1:].sum() < 1                           # the rest stays with the class token
    m = attention_rollout(vb, x)
    assert m.shape == (1, 224, 224) and m.min() >= 0 and m.max() <= 1


def test_maps_leave_the_model_as_it_was():
    "Weights, BatchNorm statistics, training mode, gradient flags, fused attention and hooks are all unchanged."
    from mhist_nb.models import create
    from mhist_nb.explain import attention_rollout, ig_map, occlusion_map, randomized_copy
    torch.manual_seed(0)
    vc = create('vit_micro_conv').train()
    vc.head.weight.requires_grad_(False)
    before = copy.deepcopy(vc.state_dict())
    flags, fused = [p.requires_grad for p in vc.parameters()], [b.attn.fused_attn for b in vc.blocks]
    x = torch.randn(2, 3, 224, 224)
    attention_rollout(vc, x); ig_map(vc, x, n_steps=4); occlusion_map(vc, x, patch=112, stride=112); randomized_copy(vc)
    after = vc.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)         # BN running stats too: maps run in eval mode
    assert vc.training and [p.requires_grad for p in vc.parameters()] == flags
    assert [b.attn.fused_attn for b in vc.blocks] == fused
    assert not any(m._forward_hooks for m in vc.modules())


def test_crypt_walls_of_the_shared_synthetic_set(synth_dir):
    "Every tile of the shared set redraws exactly (crypt_wall_masks checks it pixel for pixel)."
    import pandas as pd
    from mhist_nb.explain import crypt_wall_masks
    names = pd.read_csv(synth_dir/'annotations.csv')['Image Name'][:12].tolist()
    walls = crypt_wall_masks(synth_dir, names)
    assert walls.shape == (12, 224, 224) and 0.1 < walls.mean() < 0.6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_maps_on_cuda_match_the_cpu():
    from mhist_nb.models import create
    from mhist_nb.explain import attention_rollout, ig_map, occlusion_map
    torch.manual_seed(0)
    vc, x = create('vit_micro_conv').eval(), torch.randn(2, 3, 224, 224)
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False      # full fp32 on both sides
    try:
        for f, tol in ((attention_rollout, 1e-5), (lambda m, z: ig_map(m, z, n_steps=8), 1e-3), (occlusion_map, 1e-4)):
            cpu = f(vc, x)
            gpu = f(copy.deepcopy(vc).cuda(), x.cuda()).cpu()
            torch.testing.assert_close(gpu, cpu, atol=tol * max(1., cpu.abs().max().item()), rtol=0)
    finally: torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
