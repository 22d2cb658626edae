"""`make gpu-check`: the one command to run on a GPU box. It needs the `python3` on the PATH with torch (papermill,
nbconvert, ipykernel and mlflow only for the smoke pipeline), no install step and no network, and ends with one
summary table of pass/fail and figures, also written as `summary.json` and `summary.md` under `--out`
(default reports/gpu-check/).

Steps, each a subprocess of this Python with the checkout on PYTHONPATH:

- tests: `pytest -m gpu tests/test_gpu.py` (resume on CUDA three ways, bf16/fp16 autocast engaged, `amp: auto`, both
  data paths, compile vs eager, deterministic resume, NCCL DDP with two GPUs or more), one row per test;
- ddp: with two GPUs or more, `benchmarks/ddp.py` (NCCL on every GPU vs one process); with fewer, a skip saying why;
- benchmark: `benchmarks/gpu.py` (ViT-B/16, bf16, batch 128: bare loop, Trainer, both data paths, compile, MFU); it
  fails when the Trainer on the device path runs below 90 % of the bare loop;
- pipeline: `mhist run params/gpu_smoke.yaml`, seconds per notebook (skipped, saying so, without papermill & co).

Without a CUDA GPU (or without torch) it says there is nothing to check and exits 0. `--device cpu` runs the same
steps on the CPU with tiny settings, which is how `make test` checks this script and the GPU tests themselves.

    python3 tools/gpu_check.py [--out reports/gpu-check] [--only tests benchmark ...] [--device cpu] [--floor 0.9]
"""
import argparse, importlib.util, json, os, platform, subprocess, sys, threading, time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ('tests', 'ddp', 'benchmark', 'pipeline')
TIMEOUT_S = dict(tests=300, ddp=240, benchmark=300, pipeline=420)
PIPELINE_MODULES = ('papermill', 'nbconvert', 'ipykernel', 'mlflow')
CPU_BENCH = ['--device', 'cpu', '--model', 'vit_micro_conv', '--scale', '0.02', '--batch', '16', '--no-compile',
             '--epochs', '1', '--workers', '0']


def gpus() -> int | None:
    "CUDA devices visible to this Python; None without torch."
    try: import torch
    except ImportError: return None
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run(cmd, log: Path, timeout: float, env=None) -> tuple[int, float]:
    "Run `cmd` in the checkout with its output going to `log` (and echoed); return (exit code, seconds). 124: timed out."
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), *filter(None, [os.environ.get('PYTHONPATH')])]),
           **(env or {})}
    t = time.perf_counter()
    with open(log, 'w') as f:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        def copy():                                     # a thread, so that a silent, hung step still times out
            for line in p.stdout: f.write(line); print(line, end='', flush=True)
        reader = threading.Thread(target=copy, daemon=True); reader.start()
        try: rc = p.wait(timeout)
        except subprocess.TimeoutExpired: p.kill(); p.wait(); rc = 124
        reader.join(5)
        if rc == 124: f.write(f'\n[gpu_check] timed out after {timeout} s\n')
    return rc, time.perf_counter() - t


def row(check: str, status: str, seconds: float | None = None, detail: str = '') -> dict:
    return dict(check=check, status=status, seconds=None if seconds is None else round(seconds, 1), detail=detail)


def junit_rows(xml: Path) -> list[dict]:
    "One row per test case of a pytest JUnit report: pass, fail or skip, its seconds, and its message or printed figures."
    out = []
    for case in ET.parse(xml).getroot().iter('testcase'):
        bad = case.find('failure') if case.find('failure') is not None else case.find('error')
        skip = case.find('skipped')
        printed = ' '.join(l.strip() for l in (case.findtext('system-out') or '').splitlines()
                           if l.strip() and not l.startswith('----'))        # pytest's 'Captured Out' rulers
        if bad is not None: status, detail = 'fail', (bad.get('message') or '').splitlines()[0][:200] if bad.get('message') else 'error'
        elif skip is not None: status, detail = 'skip', (skip.get('message') or '').removeprefix('Skipped: ')
        else: status, detail = 'pass', printed
        out.append(row(f"test: {case.get('name')}", status, float(case.get('time', 0)), detail))
    return out


def step_tests(a, out: Path) -> list[dict]:
    xml = out/'tests.xml'
    env = dict(MHIST_CHECK_DEVICE=a.device, **({'MHIST_CHECK_COMPILE': 'aot_eager'} if a.device == 'cpu' else {}))
    rc, s = run([sys.executable, '-m', 'pytest', '-q', '-m', 'gpu', '-p', 'no:cacheprovider', '-o', 'junit_logging=system-out',
                 '--junitxml', str(xml), 'tests/test_gpu.py'], out/'tests.log', TIMEOUT_S['tests'], env)
    if not xml.is_file(): return [row('tests', 'fail', s, f'pytest exited {rc} without a report: see {out/"tests.log"}')]
    rows = junit_rows(xml)
    if rc not in (0, 1): rows.append(row('tests', 'fail', s, f'pytest exited {rc}: see {out/"tests.log"}'))
    return rows


def step_ddp(a, out: Path, n: int) -> list[dict]:
    if a.device == 'cpu' or n < 2:
        return [row('ddp benchmark', 'skip', detail=f'{n} GPU(s): NCCL DDP needs two or more' if a.device != 'cpu' else 'no GPUs (--device cpu)')]
    rc, s = run([sys.executable, 'benchmarks/ddp.py', '--model', 'vit_micro_conv', '--epochs', '3', '--json', str(out/'ddp.json')],
                out/'ddp.log', TIMEOUT_S['ddp'])
    if rc: return [row('ddp benchmark', 'fail', s, f'exit {rc}: see {out/"ddp.log"}')]
    r = json.loads((out/'ddp.json').read_text())['rows']
    return [row(f"ddp: {x['run']}", 'pass', None, f"{x['s_per_epoch']:.2f} s/epoch, max |d val AUC| {x['max_abs_d_val_auc']:.2g}, "
                f"max |d val loss| {x['max_abs_d_val_loss']:.2g}") for x in r]


def step_benchmark(a, out: Path) -> list[dict]:
    args = CPU_BENCH if a.device == 'cpu' else []
    rc, s = run([sys.executable, 'benchmarks/gpu.py', *args, '--floor', str(a.floor), '--json', str(out/'gpu.json')],
                out/'benchmark.log', TIMEOUT_S['benchmark'])
    if not (out/'gpu.json').is_file(): return [row('benchmark', 'fail', s, f'exit {rc} without a table: see {out/"benchmark.log"}')]
    b = json.loads((out/'gpu.json').read_text())
    mfu = lambda r: f", MFU {100 * r['mfu']:.1f} %" if r['mfu'] is not None else ''
    rows = [row(f"benchmark: {r['path']}", 'pass', None, f"{r['img_s']:.1f} img/s, {100 * r['share_of_bare']:.1f} % of bare{mfu(r)}")
            for r in b['rows']]
    rows.append(row('benchmark: device path >= floor', 'pass' if b['ok'] and rc == 0 else 'fail', s,
                    f"{100 * b['device_path_share']:.1f} % of the bare loop (floor {100 * b['floor']:.0f} %); "
                    f"{b['model']}, batch {b['batch']}, peak {b['peak_tflops'] or 'n/a'} TFLOP/s ({b['peak_source'] or 'no datasheet entry'})"))
    return rows


def notebook_seconds(folder: Path) -> dict:
    "Seconds per executed notebook of a pipeline report folder, from papermill's metadata."
    out = {}
    for nb in sorted(folder.glob('*.ipynb')):
        d = json.loads(nb.read_text()).get('metadata', {}).get('papermill', {}).get('duration')
        if d is not None: out[nb.stem] = round(d, 1)
    return out


def step_pipeline(a, out: Path) -> list[dict]:
    missing = [m for m in PIPELINE_MODULES if importlib.util.find_spec(m) is None]
    if missing: return [row('smoke pipeline', 'skip', detail=f'{", ".join(missing)} not importable: params/gpu_smoke.yaml not run')]
    if a.device == 'cpu' and not a.pipeline_on_cpu: return [row('smoke pipeline', 'skip', detail='--device cpu: the demo pipeline is make demo')]
    env = dict(MLFLOW_TRACKING_URI=f"sqlite:///{out/'mlflow.db'}")
    cmd = [sys.executable, '-c', 'import sys; from mhist_nb.cli import main; sys.exit(main(sys.argv[1:]))',
           'run', 'params/gpu_smoke.yaml', '--reports', str(out/'reports'), '--quiet']
    rc, s = run(cmd, out/'pipeline.log', TIMEOUT_S['pipeline'], env)
    secs = notebook_seconds(out/'reports'/'gpu_smoke')
    rows = [row(f'pipeline: {k}', 'pass', v) for k, v in secs.items()]
    return rows + [row('smoke pipeline', 'pass' if rc == 0 else 'fail', s,
                       f'{len(secs)} notebooks' if rc == 0 else f'exit {rc}: see {out/"pipeline.log"}')]


def table(rows: list[dict]) -> str:
    w = max(len(r['check']) for r in rows)
    lines = [f'| {"check":<{w}} | status | seconds | figures / reason |', f'|{"-" * (w + 2)}|--------|---------|------------------|']
    for r in rows:
        s = '' if r['seconds'] is None else f"{r['seconds']:.1f}"
        detail = r['detail'].replace('|', '\\|')                              # a figure's |x| must not end the cell
        lines.append(f"| {r['check']:<{w}} | {r['status'].upper() if r['status'] == 'fail' else r['status']:<6} | {s:>7} | {detail} |")
    return '\n'.join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', default=str(ROOT/'reports'/'gpu-check'), help='folder for the summary and the logs')
    ap.add_argument('--only', nargs='+', choices=STEPS, default=list(STEPS), help='run these steps only')
    ap.add_argument('--device', default='cuda', choices=['cuda', 'cpu'], help='cpu: the same steps, tiny, on the CPU')
    ap.add_argument('--floor', type=float, default=None,
                    help="the benchmark's floor, device path / bare loop (default 0.9 on a GPU; none on a CPU, where tiny runs are noise)")
    ap.add_argument('--pipeline-on-cpu', action='store_true', help='with --device cpu, run the smoke pipeline too')
    a = ap.parse_args(argv)
    if a.floor is None: a.floor = 0.90 if a.device == 'cuda' else 0.0
    n = gpus()
    if a.device == 'cuda' and not n:
        why = 'torch is not importable' if n is None else 'no CUDA GPU is visible'
        print(f'gpu-check: {why} to {sys.executable}: nothing to check'); return 0
    out = Path(a.out).resolve(); out.mkdir(parents=True, exist_ok=True)
    import torch
    name = torch.cuda.get_device_name(0) if a.device == 'cuda' else f'CPU ({platform.processor() or platform.machine()})'
    t0, rows = time.perf_counter(), []
    for step in a.only:
        print(f'\n==== gpu-check: {step} ====', flush=True)
        rows += dict(tests=lambda: step_tests(a, out), ddp=lambda: step_ddp(a, out, n or 0),
                     benchmark=lambda: step_benchmark(a, out), pipeline=lambda: step_pipeline(a, out))[step]()
    total, ok = time.perf_counter() - t0, not any(r['status'] == 'fail' for r in rows)
    head = (f'gpu-check on {name} ({n or 0} GPU(s)), torch {torch.__version__}, Python {platform.python_version()}: '
            f'{"all checks passed" if ok else "FAILED"} in {total:.0f} s')
    md = f'{head}\n\n{table(rows)}\n'
    (out/'summary.md').write_text(md)
    (out/'summary.json').write_text(json.dumps(dict(device=name, gpus=n or 0, torch=torch.__version__, ok=ok, seconds=round(total, 1),
                                                    steps=a.only, rows=rows), indent=1))
    print(f'\n{md}\nwritten: {out/"summary.json"}, {out/"summary.md"}')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
