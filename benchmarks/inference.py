"""Inference speed: ONNX Runtime against PyTorch eager, INT8 against fp32, and both against this machine's GEMM peak.

Prints one table; every number is measured in this run, on the same machine, with the same thread count for PyTorch
(`torch.set_num_threads`) and ONNX Runtime (`intra_op_num_threads`). Each ratio is measured side by side: the two
things compared are timed in alternating blocks of calls, round by round, so a change in machine load hits both
alike. Each block starts after a 50 ms pause with one untimed call: PyTorch's OpenMP threads and ONNX Runtime's
threads spin for a while after their work, and a call made while the other library's threads still spin on the same
cores is slowed by 15-30% (measured here: single alternating 2048^3 GEMMs reached 162 and 397 GFLOP/s, blocks 227 and
460).

    .venv/bin/python benchmarks/inference.py [--threads N] [--runs 10] [--runs-b32 3]

1. fp32 GEMM peak: the best 2048x2048 matrix product, 2 FLOPs per multiply-add, with `torch.matmul` and with a
   one-node ONNX Runtime `MatMul`. The two libraries' kernels differ (on this AMD CPU PyTorch's MKL does not reach
   AVX-512 speed, ONNX Runtime's MLAS does), so the machine's measured peak is the higher of the two.
2. ViT-B/16 (`create('vit_base')`, random init: speed does not depend on the weights) at batch 1: PyTorch eager
   (`inference_mode`) against ONNX Runtime fp32, p50 latency and speed-up. Goal: >= 2.5x.
3. ViT-B/16 at batch 32 in ONNX Runtime fp32: FLOPs per image / time per image, as a % of the machine's peak; the
   batch-32 calls are interleaved with the GEMM calls, and best is compared with best. Goal: >= 70%. FLOPs are
   counted with `torch.utils.flop_counter.FlopCounterMode` with timm's fused attention off, so the attention matrix
   products are counted too, at 2 FLOPs per multiply-add: about 35.1 GFLOP per image. The "17.6 GFLOPs" usually
   quoted for ViT-B/16 counts multiply-adds (17.6 GMAC), the same work.
4. The study MLP (`create('mlp')`, 360 M parameters, 1.44 GB, random init) in ONNX Runtime at batch 1: INT8
   (`quantize_int8`: dynamic, per channel) against fp32, p50 latency speed-up (goal >= 3x) and file size ratio
   (goal <= 1/4).

Takes two to three minutes; memory peaks at about 13 GB while quantizing the MLP. The load average printed with the
table shows whether other processes shared the machine.
"""
import argparse, gc, os, platform, shutil, tempfile, time
from pathlib import Path
import numpy as np, torch, onnxruntime as ort
from torch.utils.flop_counter import FlopCounterMode
from mhist_nb.models import create
from mhist_nb.export import export_onnx, ort_session, onnx_logits, quantize_int8


def side_by_side(fns:dict, rounds:int, block=5, warmup:int=2) -> dict:
    "Seconds of each call of each callable in `fns`: per round, in alternating order, a block of timed calls each."
    block = block if isinstance(block, dict) else {k: block for k in fns}
    for f in fns.values():
        for _ in range(warmup): f()
    ts = {k: [] for k in fns}
    for i in range(rounds):
        for k in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
            time.sleep(0.05); fns[k]()                                   # let the other pool go idle; switch in
            for _ in range(block[k]):
                t = time.perf_counter(); fns[k](); ts[k].append(time.perf_counter() - t)
    return ts

def p50_ms(ts): return float(np.median(ts)) * 1e3


def gemm_fns(n:int, threads:int) -> dict:
    "One n x n x n fp32 matrix product as a callable: 'torch' (torch.matmul) and 'ort' (one-node ONNX Runtime MatMul)."
    from onnx import helper, TensorProto
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    io = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n])
    graph = helper.make_graph([helper.make_node('MatMul', ['A', 'B'], ['Y'])], 'gemm', [io('A'), io('B')], [io('Y')])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)]); model.ir_version = 8
    so = ort.SessionOptions(); so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    s = ort.InferenceSession(model.SerializeToString(), so, providers=['CPUExecutionProvider'])
    feed = {'A': a.numpy(), 'B': b.numpy()}
    return {'torch': lambda: torch.matmul(a, b, out=c), 'ort': lambda: s.run(None, feed)}


def vit_flops(model, size:int=224) -> int:
    "FLOPs of one forward pass of a timm ViT (FlopCounterMode, attention unfused so its matmuls are counted)."
    attns = [m for m in model.modules() if hasattr(m, 'fused_attn')]
    fused = [m.fused_attn for m in attns]
    for m in attns: m.fused_attn = False
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as fc: model(torch.randn(1, 3, size, size))
    finally:
        for m, f in zip(attns, fused): m.fused_attn = f
    return fc.get_total_flops()


def cpu_name() -> str:
    try: return next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
    except Exception: return platform.processor() or 'unknown CPU'


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--threads', type=int, default=os.cpu_count(), help='threads for PyTorch and ONNX Runtime (default: all cores)')
    ap.add_argument('--runs', type=int, default=10, help='timed calls per batch-1 measurement (in blocks of 5)')
    ap.add_argument('--runs-b32', type=int, default=3, help='timed ViT-B/16 batch-32 calls (seconds each), each beside 5 of each GEMM')
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix='mhist-bench-inference-'))
    rows = []                                     # (measurement, value, goal, met)
    load0 = os.getloadavg()[0]
    try:
        torch.manual_seed(0)
        vit = create('vit_base').eval()
        flops = vit_flops(vit)
        sess = ort_session(export_onnx(vit, tmp/'vit_base.onnx'), a.threads)
        x1 = torch.randn(1, 3, 224, 224); x1n = x1.numpy()
        rounds = max(1, -(-a.runs // 5))
        with torch.inference_mode():
            b1 = side_by_side({'eager': lambda: vit(x1), 'ort': lambda: onnx_logits(sess, x1n)}, rounds, 5)
        speed = p50_ms(b1['eager']) / p50_ms(b1['ort'])
        del vit; gc.collect()

        x32 = np.random.default_rng(0).standard_normal((32, 3, 224, 224), dtype=np.float32)
        gemm = gemm_fns(2048, a.threads)
        fns = {'gemm_torch': gemm['torch'], 'gemm_ort': gemm['ort'], 'vit32': lambda: onnx_logits(sess, x32)}
        ts = side_by_side(fns, a.runs_b32, dict(gemm_torch=5, gemm_ort=5, vit32=1), warmup=1)
        gf = lambda sec: 2 * 2048**3 / sec / 1e9
        torch_peak, ort_peak = gf(min(ts['gemm_torch'])), gf(min(ts['gemm_ort']))
        peak = max(torch_peak, ort_peak)
        eff_best, eff_p50 = 32 * flops / min(ts['vit32']) / 1e9, 32 * flops / float(np.median(ts['vit32'])) / 1e9
        del sess, gemm, fns; gc.collect()
        n_gemm = 5 * a.runs_b32
        rows += [(f'fp32 GEMM 2048^3: torch.matmul, best of {n_gemm}', f'{torch_peak:.1f} GFLOP/s', '', ''),
                 (f'fp32 GEMM 2048^3: ONNX Runtime MatMul, best of {n_gemm}', f'{ort_peak:.1f} GFLOP/s', '', ''),
                 ('fp32 GEMM peak of this machine (the higher)', f'{peak:.1f} GFLOP/s', '', ''),
                 (f'ViT-B/16 batch 1: PyTorch eager fp32, p50 of {len(b1["eager"])}', f"{p50_ms(b1['eager']):.1f} ms", '', ''),
                 (f'ViT-B/16 batch 1: ONNX Runtime fp32, p50 of {len(b1["ort"])}', f"{p50_ms(b1['ort']):.1f} ms", '', ''),
                 ('ViT-B/16 batch 1: ORT speed-up over eager (p50)', f'{speed:.2f}x', '>= 2.5x', 'yes' if speed >= 2.5 else 'no'),
                 (f'ViT-B/16 batch 32: ONNX Runtime fp32, best / p50 of {a.runs_b32}',
                  f"{min(ts['vit32']):.2f} s / {np.median(ts['vit32']):.2f} s", '', ''),
                 (f'ViT-B/16 batch 32: GFLOP/s, best / p50 ({flops / 1e9:.1f} GFLOP/image)', f'{eff_best:.0f} / {eff_p50:.0f}', '', ''),
                 ('ViT-B/16 batch 32: % of the machine peak (best)', f'{100 * eff_best / peak:.0f}%', '>= 70%',
                  'yes' if eff_best >= 0.7 * peak else 'no'),
                 ('ViT-B/16 batch 32: % of the machine peak (p50)', f'{100 * eff_p50 / peak:.0f}%', '', ''),
                 ('ViT-B/16 batch 32: % of the torch.matmul GEMM (best)', f'{100 * eff_best / torch_peak:.0f}%', '', '')]

        torch.manual_seed(0)
        mlp = create('mlp').eval()
        fp32 = export_onnx(mlp, tmp/'mlp.onnx')
        del mlp; gc.collect()
        int8 = quantize_int8(fp32, tmp/'mlp.int8.onnx')
        x1n = np.random.default_rng(1).standard_normal((1, 3, 224, 224), dtype=np.float32)
        s32, s8 = ort_session(fp32, a.threads), ort_session(int8, a.threads)
        lat = side_by_side({'fp32': lambda: onnx_logits(s32, x1n), 'int8': lambda: onnx_logits(s8, x1n)}, rounds, 5)
        del s32, s8; gc.collect()
        mspeed = p50_ms(lat['fp32']) / p50_ms(lat['int8'])
        n32, n8 = fp32.stat().st_size, int8.stat().st_size
        ratio, over = n8 / n32, n8 - n32 / 4
        size_met = 'yes' if ratio <= 0.25 else f'no, by {over / 1e3:.0f} kB ({100 * over / (n32 / 4):.3f}%)'
        rows += [(f'MLP batch 1: ONNX Runtime fp32, p50 of {len(lat["fp32"])}', f"{p50_ms(lat['fp32']):.1f} ms", '', ''),
                 (f'MLP batch 1: ONNX Runtime INT8, p50 of {len(lat["int8"])}', f"{p50_ms(lat['int8']):.1f} ms", '', ''),
                 ('MLP batch 1: INT8 speed-up over fp32 (p50)', f'{mspeed:.2f}x', '>= 3x', 'yes' if mspeed >= 3 else 'no'),
                 ('MLP file: fp32 -> INT8', f'{n32 / 1e6:.1f} MB -> {n8 / 1e6:.1f} MB', '', ''),
                 ('MLP file: INT8 / fp32', f'{ratio:.5f}', '<= 0.25', size_met)]

        print(f'{cpu_name()}, cpu_count {os.cpu_count()}, threads {a.threads} (torch and ORT intra-op), '
              f'torch {torch.__version__}, onnxruntime {ort.__version__}; warm-up, then alternating blocks of timed calls; '
              f'load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end\n')
        w = max(len(r[0]) for r in rows)
        print(f'| {"measurement":<{w}} | {"value":>24} | {"goal":>7} | met |')
        print(f'|{"-" * (w + 2)}|{"-" * 25}:|{"-" * 8}:|-----|')
        for m, v, g, ok in rows: print(f'| {m:<{w}} | {v:>24} | {g:>7} | {ok} |')
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__': main()
