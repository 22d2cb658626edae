"""Serving speed and cost: gunicorn + Flask API against the in-process `Predictor`, memory per worker, ready time,
Lambda-style cold start, ViT-B/16 fp32 against INT8, and what INT8 changes in the demo models' calls.

Every number is measured in this run, on this machine. The API runs as in production,
`gunicorn -c python:mhist_nb.gunicorn_conf 'mhist_nb.api:create_app()'` in a fresh process group, configured by
environment only (MHIST_MODEL_DIR, MHIST_BIND=127.0.0.1:<free port>, MHIST_WORKERS, MHIST_THREADS, MHIST_MAX_BATCH;
PROMETHEUS_MULTIPROC_DIR in `--work`, removed after each server),
and is always stopped (SIGTERM to the group, then SIGKILL) before the next measurement starts. Requests are raw
`image/png` bodies of real 224x224 RGB tiles (`--tiles` distinct PNGs from `DATA/images`; random RGB tiles encoded as
PNG when that folder is missing), cycled over.

    .venv/bin/python benchmarks/serve.py [--workers 2] [--threads 1] [--concurrency 8] [--requests 2000]
                                         [--requests-big 200] [--seq 50] [--work DIR] [--quick] [--defaults-only]

Models: (a) the demo models that `make demo` writes to `reports/demo/` (skipped, with a note, when it has no
manifests), served from that folder as they are (each worker loads all of its manifests: mlp, vit and their INT8
versions); (b) ViT-B/16 (`create('vit_base')`, random init: speed and memory do not depend on the weights), exported
once by this script in a subprocess (`export_onnx`, `quantize_int8`, `write_manifest`; normalisation of the study,
threshold 0.5) into `--work` (default `$TMPDIR/mhist-bench-serve`), and reused by later runs when its manifests still
verify; delete the folder to re-export. The benchmark process itself never imports torch.

0. Default server, before and after: the ViT-B/16 fp32 folder served by the old default of `mhist serve` (2 sync
   workers, each loading and verifying its own models; a config file in `--work` that overrides today's) and by the
   new one (1 gthread worker, models loaded once in the master), both running, loaded in alternating rounds with the
   in-process calls. For each: memory after the load (RSS and PSS summed over master and workers, against the bytes
   of the folder's model files) and throughput at `--concurrency`, API / in-process. `--defaults-only` stops after
   this table.
1. Load: N POST /predict?model=NAME requests (`--requests`; `--requests-big` for ViT-B/16 and the 1.44 GB demo MLP,
   whose batch-1 calls take 0.1-0.5 s here) from `--concurrency` client threads, each with its own keep-alive
   `http.client` connection (gunicorn's sync workers close it after every answer, so it reconnects), after an untimed
   warm-up of 2 requests per client thread. Reported: errors (any non-200 answer or exception; the bodies of the
   first ones are printed), p50/p99 client latency, throughput (N / wall time), and the in-process `Predictor` on the
   same PNG bytes at batch 1 with the same thread budget, two ways: one Predictor with workers x threads ORT threads
   called sequentially, and `--workers` Python threads sharing one Predictor with `--threads` ORT threads (ONNX
   Runtime releases the GIL). The three run side by side: N is split into `--rounds` rounds, each a block of API
   requests, of sequential and of parallel in-process calls, in rotating order, so that other load on the machine
   hits all three alike. API / in-process divides by the better in-process way (goal >= 90%). Each answer's p_ssa
   is compared with the in-process p_ssa of the same tile (max |dp|). The load generator runs on the same cores as
   the workers; its CPU time per wall second is printed (client CPU), since the workers do not get that time.
2. Memory: VmRSS (and its anonymous part, RssAnon) from /proc/PID/status of the gunicorn master and of each worker
   (its children, via psutil) right after the load.
3. Ready time: wall time from `Popen` of gunicorn to the first 200 from GET /ready (polled every 20 ms; a poll that
   connects waits for its answer), i.e. until the first worker has loaded and verified (sha256) its models; then the
   time of the first POST /predict. `--ready-runs` fresh launches each; goal for the ViT-B/16 fp32 folder: median
   <= 2 s. The model files are in the page cache (they were just verified or served). Then where one worker's load
   time goes, in a fresh process per model: import mhist_nb.api, read_manifest (its sha256 of the model file), and
   the ONNX Runtime session (graph optimisation, weight pre-packing).
4. Lambda-style cold start: a fresh `python -c` with AWS_LAMBDA_FUNCTION_NAME and MHIST_MODEL_DIR set imports
   `mhist_nb.aws_lambda` (which loads the models at import, as in a Lambda init) and calls `handler` once with an API
   Gateway HTTP API payload 2.0 event (POST /predict, base64 PNG, isBase64Encoded). Timed inside the child: import +
   load, first invocation, their total (goal for ViT-B/16: median <= 2 s); outside: the whole process (interpreter
   start and exit included). Also checked: the answer is 200 and `torch` is not in `sys.modules`.
5. ViT-B/16 fp32 against INT8 at batch 1: one gunicorn worker with workers x threads ORT threads serving both, and
   in this process one Predictor of as many threads; `--seq` sequential calls per model and way, in alternating
   blocks of 5 (a pause of 50 ms before each block, one untimed call at its start), so that a change in machine load
   hits all four alike. Each answer's `timings_ms.infer` (the ONNX Runtime run, timed inside the worker) splits a
   call's latency into inference and the rest (decode, preprocess, HTTP, Flask, JSON): the rest is the API's
   overhead and hardly moves with other load, which the latencies themselves do on a shared machine.
6. INT8 call flips: for each demo family with an INT8 manifest, the validation tiles named in
   `predictions_{family}_val.csv` (PNGs in the `data_dir` of `run_{family}.json`) through fp32 and INT8 in one
   Predictor: the share of tiles whose label differs, max |dp| and max |dlogit|; and, as a check of the fp32 export,
   max |p - the training notebook's p|.

Progress goes to stderr, the tables to stdout; gunicorn's logs go to `--work`/logs/. A full run takes several minutes
on 2 cores (plus under a minute for the first ViT-B/16 export); `--quick` (few requests, one launch each) one to two.
"""
import argparse, base64, http.client, io, itertools, json, os, platform, shlex, shutil, signal, socket, subprocess, sys
import tempfile, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STUDY_MEAN, STUDY_STD = [0.738, 0.649, 0.775], [0.197, 0.244, 0.170]
T_START = time.perf_counter()


def say(*a):
    "Progress on stderr, with the elapsed time."
    print(f'[{time.perf_counter() - T_START:6.1f}s]', *a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- ViT-B/16 export (in a child process: torch stays out)

VITB_DIRS = dict(fp32=('vitb',), int8=('vitb.int8',), both=('vitb', 'vitb.int8'))

def vitb_manifests(work:Path) -> dict:
    "Model folders of the ViT-B/16 export: {'fp32': dir, 'int8': dir, 'both': dir}, each holding the manifests named."
    return {k: work/'vitb'/k for k in VITB_DIRS}

def export_vitb(work:Path):
    "Export ViT-B/16 (random init) to fp32 and INT8 ONNX with manifests in three folders (runs in a child process)."
    import torch
    from mhist_nb.models import create
    from mhist_nb.export import export_onnx, quantize_int8, write_manifest
    d = work/'vitb'; d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = create('vit_base', pretrained=False).eval()
    fp32 = export_onnx(model, d/'model_vitb.onnx')
    del model
    int8 = quantize_int8(fp32, d/'model_vitb.int8.onnx')
    files = {'vitb': fp32, 'vitb.int8': int8}
    for k, names in VITB_DIRS.items():
        for n in names:
            (d/k).mkdir(exist_ok=True)
            here = d/k/Path(files[n]).name                  # a manifest names files in its own folder only: a hard link
            if not here.exists(): os.link(files[n], here)   # (no copy) of the one export into each folder
            write_manifest(d/k/f'manifest_{n}.json', onnx=here, model='vit_base', family='vitb', mean=STUDY_MEAN,
                           std=STUDY_STD, threshold=0.5, threshold_rule='fixed',
                           source='benchmarks/serve.py: random initial weights, for speed and memory only')

def ensure_vitb(work:Path) -> dict:
    "The ViT-B/16 folders, exported now unless every manifest of an earlier run still verifies."
    from mhist_nb.serve import read_manifest
    dirs = vitb_manifests(work)
    try:
        for k, names in VITB_DIRS.items():
            for n in names: read_manifest(dirs[k]/f'manifest_{n}.json')       # sha256: also warms the page cache
        say(f'ViT-B/16: reusing the export in {work/"vitb"}')
        return dirs
    except (FileNotFoundError, ValueError) as e:
        say(f'ViT-B/16: exporting into {work/"vitb"} ({e.__class__.__name__}: {str(e)[:100]}); takes a minute or two')
    shutil.rmtree(work/'vitb', ignore_errors=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, __file__, '--export-vitb', str(work)], check=True, cwd=ROOT, timeout=1800)
    say(f'ViT-B/16: exported in {time.perf_counter() - t:.0f} s')
    for k, names in VITB_DIRS.items():
        for n in names: read_manifest(dirs[k]/f'manifest_{n}.json')
    return dirs


# ---------------------------------------------------------------- tiles, HTTP, gunicorn

def load_tiles(data_dir:Path, n:int) -> tuple[list[bytes], str]:
    "`n` distinct PNG tiles (bytes) spread over `data_dir/images`, or random RGB tiles encoded as PNG."
    imgs = sorted((data_dir/'images').glob('*.png')) if (data_dir/'images').is_dir() else []
    if imgs:
        pick = [imgs[int(i)] for i in np.linspace(0, len(imgs) - 1, min(n, len(imgs)))]
        return [p.read_bytes() for p in pick], f'{len(pick)} PNG tiles from {data_dir/"images"}'
    from PIL import Image
    rng, out = np.random.default_rng(0), []
    for _ in range(n):
        b = io.BytesIO(); Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(b, 'PNG'); out.append(b.getvalue())
    return out, f'{n} random RGB tiles as PNG ({data_dir/"images"} not found)'

def free_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def http_call(port, method, path, body=None, timeout=120.0, conn=None):
    "(status, body bytes) of one request; `conn` is reused (and reopened by http.client after a close)."
    c = conn or http.client.HTTPConnection('127.0.0.1', port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers={'Content-Type': 'image/png'} if body is not None else {})
        r = c.getresponse(); return r.status, r.read()
    finally:
        if conn is None: c.close()


class Server:
    "gunicorn with the production config in its own process group; a context manager that always stops it."
    count = 0
    def __init__(self, model_dir, workers:int|None, threads:int|None, work:Path, label:str, max_batch:int=32,
                 conf:str='python:mhist_nb.gunicorn_conf'):
        "`workers` or `threads` None: the configuration's own default (no MHIST_WORKERS / MHIST_THREADS set)."
        self.model_dir, self.workers, self.threads, self.label, self.max_batch = Path(model_dir), workers, threads, label, max_batch
        self.conf = conf
        (work/'logs').mkdir(parents=True, exist_ok=True)
        Server.count += 1
        self.log_path = work/'logs'/f'gunicorn-{Server.count:02d}-{label.replace("/", "").replace(" ", "_")}.log'
        self.prom = Path(tempfile.mkdtemp(prefix='prom-', dir=work))
        self.proc = None

    def start(self):
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(('MHIST_', 'AWS_LAMBDA'))}
        env.update(MHIST_MODEL_DIR=str(self.model_dir), MHIST_BIND=f'127.0.0.1:{self.port}', MHIST_MAX_BATCH=str(self.max_batch),
                   PROMETHEUS_MULTIPROC_DIR=str(self.prom))
        if self.workers: env['MHIST_WORKERS'] = str(self.workers)
        if self.threads: env['MHIST_THREADS'] = str(self.threads)
        self.log = open(self.log_path, 'wb')
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, '-m', 'gunicorn', '-c', self.conf, 'mhist_nb.api:create_app()'],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, timeout:float=180.0) -> float:
        "Seconds from Popen to the first 200 from GET /ready, polling every 20 ms."
        deadline = self.t0 + timeout
        while True:
            if self.proc.poll() is not None: raise RuntimeError(f'gunicorn ({self.label}) exited with {self.proc.returncode}:\n{self.log_tail()}')
            left = deadline - time.perf_counter()
            if left <= 0: raise TimeoutError(f'gunicorn ({self.label}) not ready after {timeout:.0f} s:\n{self.log_tail()}')
            try:
                st, _ = http_call(self.port, 'GET', '/ready', timeout=max(0.05, left))
                if st == 200: return time.perf_counter() - self.t0
            except (ConnectionError, OSError, http.client.HTTPException): pass
            time.sleep(0.02)

    def log_tail(self, n=3000) -> str:
        try: return self.log_path.read_bytes()[-n:].decode(errors='replace')
        except OSError: return ''

    def problems(self) -> list[str]:
        "Lines of the log that say something went wrong (tracebacks, worker timeouts or deaths)."
        keys = ('Traceback', 'WORKER TIMEOUT', 'SIGKILL', '[ERROR]', '[CRITICAL]', '"status": 5')
        try: lines = self.log_path.read_text(errors='replace').splitlines()
        except OSError: return []
        return [l for l in lines if any(k in l for k in keys)]

    def rss(self) -> dict:
        "VmRSS and RssAnon in MB of the master and each worker (children of the master)."
        import psutil
        def status(pid):
            d = {}
            for line in open(f'/proc/{pid}/status'):
                k, _, v = line.partition(':')
                if k in ('VmRSS', 'RssAnon'): d[k] = int(v.split()[0]) * 1024 / 1e6
            return d
        kids = psutil.Process(self.proc.pid).children()
        return dict(master=status(self.proc.pid), workers=[status(k.pid) for k in kids])

    def memory(self) -> dict:
        "RSS and PSS (MB) summed over the master and its workers (PSS shares each page among the processes that map it)."
        import psutil
        procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children()]
        infos = [q.memory_full_info() for q in procs]
        return dict(processes=len(procs), rss=sum(i.rss for i in infos) / 1e6, pss=sum(i.pss for i in infos) / 1e6)

    def stop(self):
        if self.proc is None: return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired: pass
            except ProcessLookupError: pass
        try: os.killpg(self.proc.pid, signal.SIGKILL)                  # stragglers of the group, if any
        except (ProcessLookupError, PermissionError): pass
        try: self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired: pass
        self.log.close(); self.proc = None
        shutil.rmtree(self.prom, ignore_errors=True)

    def __enter__(self): return self.start()
    def __exit__(self, *exc): self.stop()


def p_of(body:bytes, model:str) -> float:
    return json.loads(body)['results'][0]['predictions'][model]['p_ssa']

def load_test(port:int, model:str, tiles:list, n:int, concurrency:int, warmup:int=2, start:int=0) -> dict:
    "N POST /predict?model=MODEL from `concurrency` threads (request i sends tile i % len): latencies, errors, p_ssa per tile."
    path = f'/predict?model={model}'
    lat, errors, ps = [None] * n, [], {}
    lock = threading.Lock()

    def client(k, counter):
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=300)
        try:
            for _ in range(warmup if counter is None else 0): http_call(port, 'POST', path, tiles[k % len(tiles)], conn=conn)
            while counter is not None:
                i = next(counter)
                if i >= n: break
                t = time.perf_counter()
                try: st, body = http_call(port, 'POST', path, tiles[(start + i) % len(tiles)], conn=conn)
                except Exception as e:
                    st, body = type(e).__name__, str(e).encode()
                    conn.close(); conn = http.client.HTTPConnection('127.0.0.1', port, timeout=300)
                lat[i] = time.perf_counter() - t
                if st != 200:
                    with lock: errors.append((start + i, st, body[:400]))
                else:
                    try: p = p_of(body, model)
                    except Exception as e:
                        with lock: errors.append((start + i, f'200 with a bad body ({type(e).__name__})', body[:400])); continue
                    with lock: ps.setdefault((start + i) % len(tiles), set()).add(p)
        finally: conn.close()

    if warmup:
        with ThreadPoolExecutor(concurrency) as ex: list(ex.map(lambda k: client(k, None), range(concurrency)))
    counter = itertools.count()
    t0, c0 = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(concurrency) as ex: list(ex.map(lambda k: client(k, counter), range(concurrency)))
    return dict(lat=lat, errors=errors, ps=ps, wall=time.perf_counter() - t0, cpu=time.process_time() - c0)


# ---------------------------------------------------------------- in-process

def inproc(pred, model:str, tiles:list, n:int, parallel:int, start:int=0) -> dict:
    "Wall seconds of `n` batch-1 `pred.predict` calls (call i: tile i % len) from `parallel` Python threads; p per tile."
    counter, ps = itertools.count(), {}
    def run():
        while (i := next(counter)) < n:
            k = (start + i) % len(tiles)
            ps[k] = pred.predict([tiles[k]], models=[model])[0][model]['p_ssa']
    t0 = time.perf_counter()
    if parallel == 1: run()
    else:
        with ThreadPoolExecutor(parallel) as ex: list(ex.map(lambda _: run(), range(parallel)))
    return dict(wall=time.perf_counter() - t0, ps=ps)

def alternate(fns:dict, per:int, block:int=5) -> tuple[dict, dict]:
    "Milliseconds of each call of each callable, and what it returned: alternating blocks (50 ms pause, one untimed call, `block` timed)."
    ts, out, rounds = {k: [] for k in fns}, {k: [] for k in fns}, -(-per // block)
    for r in range(rounds):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            time.sleep(0.05); fns[k]()
            for _ in range(min(block, per - len(ts[k]))):
                t = time.perf_counter(); v = fns[k](); ts[k].append((time.perf_counter() - t) * 1e3); out[k].append(v)
    return ts, out


# ---------------------------------------------------------------- Lambda cold start

LAMBDA_CHILD = r'''
import json, sys, time
event = json.load(open(sys.argv[1]))
t0 = time.perf_counter()
import mhist_nb.aws_lambda as L
t1 = time.perf_counter()
r = L.handler(event, None)
t2 = time.perf_counter()
body = r.get('body') or ''
print(json.dumps(dict(import_s=t1 - t0, first_s=t2 - t1, status=r['statusCode'], torch='torch' in sys.modules,
                      body=body if r['statusCode'] != 200 else json.loads(body)['results'][0]['predictions'])))
'''

BREAKDOWN_CHILD = r'''
import json, sys, time
t0 = time.perf_counter()
import mhist_nb.api
t1 = time.perf_counter()
from mhist_nb.serve import read_manifest, ort_session
m = read_manifest(sys.argv[1])
t2 = time.perf_counter()
s = ort_session(m['onnx_path'], int(sys.argv[2]))
t3 = time.perf_counter()
print(json.dumps(dict(imports=t1 - t0, sha256=t2 - t1, session=t3 - t2)))
'''

def load_breakdown(manifest, threads:int) -> dict:
    "Seconds of a fresh process's steps to a loaded model: import mhist_nb.api, read_manifest (sha256), ORT session."
    r = subprocess.run([sys.executable, '-c', BREAKDOWN_CHILD, str(manifest), str(threads)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    if r.returncode != 0: raise RuntimeError(f'load breakdown child failed ({r.returncode}):\n{r.stderr[-3000:]}')
    return json.loads(r.stdout.strip().splitlines()[-1])


def lambda_event(png:bytes, model:str) -> dict:
    "An API Gateway HTTP API (payload 2.0) event: POST /predict?model=MODEL with a base64 PNG body."
    return {'version': '2.0', 'routeKey': 'POST /predict', 'rawPath': '/predict', 'rawQueryString': f'model={model}',
            'cookies': [], 'headers': {'content-type': 'image/png', 'host': 'abc123.execute-api.eu-west-1.amazonaws.com'},
            'queryStringParameters': {'model': model},
            'requestContext': {'accountId': '123456789012', 'apiId': 'abc123', 'domainName': 'abc123.execute-api.eu-west-1.amazonaws.com',
                               'http': {'method': 'POST', 'path': '/predict', 'protocol': 'HTTP/1.1', 'sourceIp': '127.0.0.1',
                                        'userAgent': 'benchmarks/serve.py'},
                               'requestId': 'bench', 'routeKey': 'POST /predict', 'stage': '$default', 'timeEpoch': 0},
            'body': base64.b64encode(png).decode(), 'isBase64Encoded': True}

def cold_start(model_dir, model:str, png:bytes, threads:int, work:Path) -> dict:
    ev = work/f'event-{model}.json'; ev.write_text(json.dumps(lambda_event(png, model)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(('MHIST_', 'AWS_LAMBDA'))}
    env.update(AWS_LAMBDA_FUNCTION_NAME='mhist-bench', MHIST_MODEL_DIR=str(model_dir), MHIST_THREADS=str(threads))
    t = time.perf_counter()
    r = subprocess.run([sys.executable, '-c', LAMBDA_CHILD, str(ev)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t
    if r.returncode != 0: raise RuntimeError(f'Lambda child failed ({r.returncode}):\n{r.stderr[-3000:]}')
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return dict(out, wall_s=wall, total_s=out['import_s'] + out['first_s'])


# ---------------------------------------------------------------- INT8 flips

def int8_flips(demo:Path, family:str, threads:int, limit:int|None) -> dict|None:
    import csv
    from mhist_nb.serve import Predictor
    m32, m8, csvp, runp = (demo/f'manifest_{family}.json', demo/f'manifest_{family}.int8.json',
                           demo/f'predictions_{family}_val.csv', demo/f'run_{family}.json')
    if not all(p.is_file() for p in (m32, m8, csvp, runp)): return None
    rows = list(csv.DictReader(open(csvp)))[:limit]
    data_dir = Path(json.loads(runp.read_text())['data_dir'])
    data_dir = data_dir if data_dir.is_absolute() else ROOT/data_dir
    pred = Predictor([m32, m8], threads=threads)
    f8 = f'{family}.int8'
    p32, p8, z32, z8, lab32, lab8, ptrain = [], [], [], [], [], [], []
    for i in range(0, len(rows), 32):
        chunk = rows[i:i + 32]
        res = pred.predict([(data_dir/'images'/r['name']).read_bytes() for r in chunk], models=[family, f8])
        for r, o in zip(chunk, res):
            p32.append(o[family]['p_ssa']); p8.append(o[f8]['p_ssa']); z32.append(o[family]['logit']); z8.append(o[f8]['logit'])
            lab32.append(o[family]['label']); lab8.append(o[f8]['label'])
            if r.get('p') not in (None, ''): ptrain.append(float(r['p']) - o[family]['p_ssa'])
    flips = sum(a != b for a, b in zip(lab32, lab8))
    return dict(n=len(rows), flips=flips, share=flips / len(rows), dp=float(np.max(np.abs(np.subtract(p32, p8)))),
                dz=float(np.max(np.abs(np.subtract(z32, z8)))), logit_std=float(np.std(z32)),
                thr=(pred.models[family][0]['threshold'], pred.models[f8][0]['threshold']),
                vs_train=float(np.max(np.abs(ptrain))) if ptrain else None)


# ---------------------------------------------------------------- output

def table(headers, rows, right=None):
    "A markdown table; columns in `right` (default: all but the first) are right-aligned."
    right = set(range(1, len(headers))) if right is None else set(right)
    rows = [[str(c) for c in r] for r in rows]
    w = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    fmt = lambda cells: '| ' + ' | '.join(c.rjust(w[i]) if i in right else c.ljust(w[i]) for i, c in enumerate(cells)) + ' |'
    print(fmt([str(h) for h in headers]))
    print('|' + '|'.join('-' * (w[i] + 1) + ':' if i in right else '-' * (w[i] + 2) for i in range(len(headers))) + '|')
    for r in rows: print(fmt(r))
    print(flush=True)

def cpu_name() -> str:
    try: return next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
    except Exception: return platform.processor() or 'unknown CPU'

def mem_total_gb() -> float:
    try: return next(int(l.split()[1]) for l in open('/proc/meminfo') if l.startswith('MemTotal')) * 1024 / 1e9
    except Exception: return float('nan')

def yes(ok:bool) -> str: return 'yes' if ok else 'no'

def max_dp(api_ps:dict, ref_ps:dict) -> float:
    d = [abs(p - ref_ps[k]) for k, s in api_ps.items() for p in s if k in ref_ps]
    return max(d) if d else float('nan')

def med(xs): return float(np.median(xs))


# ---------------------------------------------------------------- main

OLD_DEFAULT_CONF = """# `mhist serve` before one-process serving: 2 sync workers, each loading and verifying its own models
import os
os.environ.setdefault('MHIST_THREADS', str(max(1, len(os.sched_getaffinity(0)) // 2)))   # the cores shared by the workers
from mhist_nb.gunicorn_conf import *
worker_class, workers, preload_app = 'sync', 2, False
"""

def compare_defaults(a, model_dir:Path, model:str, tiles:list, n:int) -> list:
    """The old default (2 sync workers, each its own models) against the new one (1 gthread worker, models loaded once
    in the master), both running at once: `a.rounds` rounds, each a block of `n / rounds` requests at `a.concurrency` to
    either server and as many in-process calls each way, in rotating order, so that other load on the machine hits all
    alike. Memory after the load (RSS and PSS summed over the processes, against the bytes of the folder's model files);
    throughput, API / in-process (the better of: one caller with all cores as ORT threads; as many Python threads as
    cores sharing a Predictor of 1 ORT thread each)."""
    from contextlib import ExitStack
    from mhist_nb.serve import Predictor, manifest_paths, read_manifest
    cores = len(os.sched_getaffinity(0))
    model_mb = sum(Path(read_manifest(m, verify=False)['onnx_path']).stat().st_size for m in manifest_paths(model_dir)) / 1e6
    conf = a.work/'gunicorn_old_default.py'; conf.write_text(OLD_DEFAULT_CONF)
    preds = dict(seq=(Predictor([model_dir/f'manifest_{model}.json'], threads=cores), 1),
                 par=(Predictor([model_dir/f'manifest_{model}.json'], threads=1), cores))
    for pr, par in preds.values(): inproc(pr, model, tiles, 2 * par, par)                      # warm-up
    labels = {'old': 'old default: 2 sync workers', 'new': 'new default: 1 gthread worker'}
    with ExitStack() as stack:
        srv = {'old': stack.enter_context(Server(model_dir, None, None, a.work, 'old-default', conf=str(conf))),
               'new': stack.enter_context(Server(model_dir, None, None, a.work, 'new-default'))}
        for k, procs in (('old', 3), ('new', 2)):
            say(f'defaults: {labels[k]}: starting')
            srv[k].wait_ready(timeout=300)
            deadline = time.time() + 120                           # every worker up (the second one may still be loading)
            while time.time() < deadline and srv[k].memory()['processes'] < procs: time.sleep(0.1)
        say(f'defaults: {n} requests at concurrency {a.concurrency} to each server, and in process, in {a.rounds} rounds')
        wall, errs = dict(old=0., new=0., seq=0., par=0.), dict(old=[], new=[])
        sizes = [n // a.rounds + (r < n % a.rounds) for r in range(a.rounds)]
        for r, k in enumerate(sizes):
            start, order = sum(sizes[:r]), ['old', 'new', 'seq', 'par']
            for what in order[r % 4:] + order[:r % 4]:
                time.sleep(0.1)                                    # let the other side's threads go idle
                if what in srv:
                    t = load_test(srv[what].port, model, tiles, k, a.concurrency, warmup=2 if r == 0 else 0, start=start)
                    errs[what] += t['errors']
                else: t = inproc(*preds[what][:1], model, tiles, k, preds[what][1], start=start)
                wall[what] += t['wall']
        mem = {k: s_.memory() for k, s_ in srv.items()}
    best = max(n / wall['seq'], n / wall['par'])
    return [(labels[k], mem[k]['processes'], f'{model_mb:.0f}', f"{mem[k]['rss']:.0f}", f"{mem[k]['pss']:.0f}",
             f"{mem[k]['pss'] / model_mb:.1f}", len(errs[k]), f'{n / wall[k]:.1f}', f'{best:.1f}',
             f'{100 * n / wall[k] / best:.0f}%') for k in ('old', 'new')]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--workers', type=int, default=2, help='gunicorn workers (MHIST_WORKERS)')
    ap.add_argument('--threads', type=int, default=1, help='ONNX Runtime intra-op threads per model and worker (MHIST_THREADS)')
    ap.add_argument('--concurrency', type=int, default=8, help='client threads of the load test')
    ap.add_argument('--requests', type=int, default=2000, help='requests per load test of a small model')
    ap.add_argument('--requests-big', type=int, default=200, help='requests per load test of ViT-B/16 and the 1.44 GB demo MLP')
    ap.add_argument('--rounds', type=int, default=4, help='load tests: rounds of API, in-process sequential and parallel, alternating')
    ap.add_argument('--seq', type=int, default=50, help='sequential requests per model for ViT-B/16 fp32 vs INT8')
    ap.add_argument('--ready-runs', type=int, default=3, help='fresh gunicorn launches per ready-time row')
    ap.add_argument('--cold-runs', type=int, default=3, help='fresh processes per Lambda cold-start row')
    ap.add_argument('--tiles', type=int, default=8, help='distinct tiles the requests cycle over')
    ap.add_argument('--demo-dir', type=Path, default=ROOT/'reports'/'demo', help='folder of the demo models (make demo)')
    ap.add_argument('--data-dir', type=Path, default=ROOT/'data'/'synth', help='tiles for the requests: DIR/images/*.png')
    ap.add_argument('--work', type=Path, default=Path(tempfile.gettempdir())/'mhist-bench-serve',
                    help='folder for the ViT-B/16 export (reused while it verifies), logs and events')
    ap.add_argument('--quick', action='store_true', help='smoke run: few requests, one launch per row, at most 64 flip tiles, '
                    'no demo rows in the load breakdown and cold start')
    ap.add_argument('--defaults-only', action='store_true', help='only section 0: the old default server against the new one')
    ap.add_argument('--export-vitb', type=Path, help=argparse.SUPPRESS)           # internal: the export child process
    a = ap.parse_args()
    if a.export_vitb: return export_vitb(a.export_vitb)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))      # a killed benchmark still stops its gunicorns (finally)
    if a.quick:
        a.requests, a.requests_big, a.seq, a.ready_runs, a.cold_runs, a.rounds = min(a.requests, 48), min(a.requests_big, 8), min(a.seq, 5), 1, 1, min(a.rounds, 2)
    if min(a.workers, a.threads, a.concurrency, a.requests, a.requests_big, a.seq, a.ready_runs, a.cold_runs, a.tiles, a.rounds) < 1:
        ap.error('every count must be at least 1')
    import onnxruntime as ort, gunicorn
    budget = a.workers * a.threads
    a.work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(a.work/'logs', ignore_errors=True)
    load0 = os.getloadavg()[0]

    print(f'$ {shlex.join([os.path.relpath(sys.executable), *sys.argv])}\n')
    print(f'{cpu_name()}; cpu_count {os.cpu_count()}, usable cores {len(os.sched_getaffinity(0))}, {mem_total_gb():.1f} GB RAM; '
          f'python {platform.python_version()}, onnxruntime {ort.__version__}, gunicorn {gunicorn.__version__}; '
          f'load average {load0:.2f} at start')
    print(f'gunicorn: {a.workers} workers x {a.threads} ORT intra-op threads (budget {budget}); load: '
          f'{a.concurrency} client threads, {a.requests} requests (ViT-B/16 and the demo MLP: {a.requests_big})'
          + ('; --quick' if a.quick else '') + '\n', flush=True)

    tiles, tiles_desc = load_tiles(a.data_dir, a.tiles)
    demo = a.demo_dir
    have_demo = demo.is_dir() and any(demo.glob('manifest_*.json'))
    if not have_demo:
        print(f'NOTE: no demo models in {demo} (no manifest_*.json): run `make demo` (about 10 minutes on 2 cores) to '
              f'measure them too; continuing with ViT-B/16 only.\n', flush=True)
    vitb = ensure_vitb(a.work)
    print(f'Requests cycle over {tiles_desc}. ViT-B/16 export: {a.work/"vitb"} (fp32 '
          f'{(a.work/"vitb"/"model_vitb.onnx").stat().st_size / 1e6:.0f} MB, INT8 '
          f'{(a.work/"vitb"/"model_vitb.int8.onnx").stat().st_size / 1e6:.0f} MB).\n', flush=True)

    load_rows, mem_rows, ready_rows, cold_rows, lat_rows, flip_rows, goals, notes = [], [], [], [], [], [], [], []

    # ---- 0: the old default server against the new one
    rows = compare_defaults(a, vitb['fp32'], 'vitb', tiles, a.requests_big)
    print(f'## 0. Default server, before and after: ViT-B/16 fp32 folder, {a.requests_big} requests at concurrency '
          f'{a.concurrency}, {len(os.sched_getaffinity(0))} cores\n')
    table(['server', 'processes', 'model files MB', 'RSS sum MB', 'PSS sum MB', 'PSS / model bytes', 'errors',
           'API req/s', 'in-proc req/s', 'API / in-proc'], rows)
    print('RSS sum counts a page shared by the master and a worker once per process; PSS divides it among them (the '
          'truer total). in-proc: the better of one caller with all cores as ONNX Runtime threads and one Python thread '
          'per core sharing a Predictor of one ORT thread each, on the same PNG bytes at batch 1.\n', flush=True)
    if a.defaults_only: return

    # ---- 1 + 2: load and memory
    def load_set(label, model_dir, models):
        "One gunicorn for all (model, manifest, n): per model, rounds of API load and in-process calls side by side; memory."
        from mhist_nb.serve import Predictor
        with Server(model_dir, a.workers, a.threads, a.work, label) as srv:
            say(f'{label}: gunicorn starting ({model_dir})')
            t_ready = srv.wait_ready(timeout=300)
            ready_rows.append((f'{label} ({", ".join(sorted(p.stem[9:] for p in Path(model_dir).glob("manifest_*.json")))}), '
                               f'{a.workers} workers, the launch for the load test', f'{t_ready:.2f}', '', '', '', ''))
            for model, manifest, n in models:
                say(f'{label}/{model}: {n} requests at concurrency {a.concurrency} and {n} in-process calls each way, in {a.rounds} rounds')
                preds = dict(seq=(Predictor([manifest], threads=budget), 1), par=(Predictor([manifest], threads=a.threads), a.workers))
                for pr, par in preds.values(): inproc(pr, model, tiles, 2 * par, par)                  # warm-up
                lat, errors, ps, wall, cpu, ref = [], [], {}, dict(api=0., seq=0., par=0.), 0., {}
                sizes = [n // a.rounds + (r < n % a.rounds) for r in range(a.rounds)]
                for r, k in enumerate(sizes):
                    start = sum(sizes[:r])
                    order = ['api', 'seq', 'par'][r % 3:] + ['api', 'seq', 'par'][:r % 3]
                    for what in order:
                        time.sleep(0.1)                               # let the other side's threads go idle
                        if what == 'api':
                            t = load_test(srv.port, model, tiles, k, a.concurrency, warmup=2 if r == 0 else 0, start=start)
                            lat += t['lat']; errors += t['errors']; cpu += t['cpu']
                            for key, v in t['ps'].items(): ps.setdefault(key, set()).update(v)
                        else:
                            pr, par = preds[what]
                            t = inproc(pr, model, tiles, k, par, start=start)
                            if what == 'seq': ref.update(t['ps'])
                        wall[what] += t['wall']
                del preds
                ms = np.asarray([x for x in lat if x is not None]) * 1e3
                rps = {k: n / v for k, v in wall.items()}
                best = max(rps['seq'], rps['par'])
                ratio = rps['api'] / best
                load_rows.append((f'{label}: {model}', n, len(errors), f"{np.percentile(ms, 50):.1f}", f"{np.percentile(ms, 99):.1f}",
                                  f"{rps['api']:.1f}", f"{rps['seq']:.1f}", f"{rps['par']:.1f}", f'{100 * ratio:.0f}%',
                                  f'{max_dp(ps, ref):.1e}', f"{cpu / wall['api']:.2f}"))
                goals.append((f'load {label}: {model}: errors', str(len(errors)), '0', yes(not errors)))
                goals.append((f'load {label}: {model}: API / in-process throughput', f'{100 * ratio:.0f}%', '>= 90%', yes(ratio >= 0.9)))
                for i, st, body in errors[:5]:
                    notes.append(f'{label}/{model} request {i}: {st}: {body.decode(errors="replace")}')
            rss = srv.rss()
            for k, w in enumerate(rss['workers']):
                mem_rows.append((f'{label}: worker {k + 1}', f"{w.get('VmRSS', 0):.0f}", f"{w.get('RssAnon', 0):.0f}"))
            mem_rows.append((f'{label}: master', f"{rss['master'].get('VmRSS', 0):.0f}", f"{rss['master'].get('RssAnon', 0):.0f}"))
            mem_rows.append((f'{label}: all workers + master', f"{sum(w.get('VmRSS', 0) for w in rss['workers']) + rss['master'].get('VmRSS', 0):.0f}", ''))
        for line in srv.problems()[:10]: notes.append(f'{label} gunicorn log: {line[:300]}')

    if have_demo:
        demo_models = [(f, demo/f'manifest_{f}.json', a.requests_big if f == 'mlp' else a.requests)
                       for f in ('vit', 'mlp') if (demo/f'manifest_{f}.json').is_file()]
        load_set('demo', demo, demo_models)
    load_set('ViT-B/16', vitb['fp32'], [('vitb', vitb['fp32']/'manifest_vitb.json', a.requests_big)])

    print('## 1. Load: POST /predict, one PNG tile per request\n')
    table(['server: model', 'requests', 'errors', 'p50 ms', 'p99 ms', 'API req/s', f'in-proc seq x{budget}thr req/s',
           f'in-proc {a.workers}thr x{a.threads} req/s', 'API / in-proc', 'max |dp| vs in-proc', 'client CPU (cores)'], load_rows)
    print('p50/p99: client latency under the load (queueing included); API req/s: requests / wall time; in-proc: `Predictor.predict` '
          'on the same PNG bytes, batch 1 (seq: one caller, workers x threads ORT threads; then workers Python threads, threads '
          'ORT threads each); API / in-proc: over the better of the two; client CPU: CPU time of the load generator (this '
          'process) / wall time, which the workers do not get on a machine this size.\n')
    print('## 2. Memory after the load (MB)\n')
    table(['process', 'VmRSS', 'RssAnon'], mem_rows)

    # ---- 3: ready time
    ready_sets = [('ViT-B/16 fp32 (vitb)', vitb['fp32'], 'vitb', a.workers, True),
                  ('ViT-B/16 fp32 (vitb)', vitb['fp32'], 'vitb', 1, False),
                  ('ViT-B/16 INT8 (vitb.int8)', vitb['int8'], 'vitb.int8', a.workers, False),
                  ('ViT-B/16 fp32 + INT8', vitb['both'], 'vitb', a.workers, False)]
    for label, d, model, workers, goal in ready_sets:
        ts, firsts = [], []
        for k in range(a.ready_runs):
            say(f'ready: {label}, {workers} worker(s), launch {k + 1}/{a.ready_runs}')
            with Server(d, workers, a.threads, a.work, 'ready') as srv:
                ts.append(srv.wait_ready(timeout=120))
                t = time.perf_counter(); st, body = http_call(srv.port, 'POST', f'/predict?model={model}', tiles[0])
                firsts.append((time.perf_counter() - t) * 1e3)
                if st != 200: notes.append(f'ready {label}: first /predict answered {st}: {body[:300]!r}')
        ready_rows.append((f'{label}, {workers} worker{"s" * (workers > 1)}, median of {a.ready_runs}', f'{med(ts):.2f}', f'{min(ts):.2f}', f'{max(ts):.2f}',
                           f'{med(firsts):.0f}', '<= 2 s' if goal else ''))
        if goal: goals.append((f'ready: {label}, median', f'{med(ts):.2f} s', '<= 2 s', yes(med(ts) <= 2)))
    print('## 3. Ready time: Popen to the first 200 from GET /ready (s)\n')
    table(['server', 'median', 'min', 'max', 'first /predict ms', 'goal'], ready_rows)
    bd_rows = []
    bd_sets = [('ViT-B/16 fp32', vitb['fp32']/'manifest_vitb.json'), ('ViT-B/16 INT8', vitb['int8']/'manifest_vitb.int8.json')]
    if have_demo and not a.quick: bd_sets += [(f'demo {p.stem[9:]}', p) for p in sorted(demo.glob('manifest_*.json'))]
    for label, man in bd_sets:
        say(f'load breakdown: {label}')
        bd = [load_breakdown(man, a.threads) for _ in range(a.ready_runs)]
        bd_rows.append((label, *(f"{med([b[k] for b in bd]):.2f}" for k in ('imports', 'sha256', 'session')),
                        f"{med([sum(b.values()) for b in bd]):.2f}"))
    print(f'Where a worker\'s load time goes: one fresh process, alone on the machine, median of {a.ready_runs} (s)\n')
    table(['model', 'import mhist_nb.api', 'read_manifest (sha256)', f'ORT session (x{a.threads} threads)', 'sum'], bd_rows)

    # ---- 4: Lambda cold start
    cold_sets = [('ViT-B/16 fp32', vitb['fp32'], 'vitb', True), ('ViT-B/16 INT8', vitb['int8'], 'vitb.int8', False)]
    if have_demo and not a.quick and (demo/'manifest_vit.json').is_file(): cold_sets.append(('demo folder (all its models)', demo, 'vit', False))
    for label, d, model, goal in cold_sets:
        rs = []
        for k in range(a.cold_runs):
            say(f'Lambda cold start: {label}, {k + 1}/{a.cold_runs}')
            rs.append(cold_start(d, model, tiles[0], budget, a.work))
        bad = [r for r in rs if r['status'] != 200]
        for r in bad[:2]: notes.append(f'Lambda {label}: status {r["status"]}: {str(r["body"])[:300]}')
        tot = med([r['total_s'] for r in rs])
        cold_rows.append((f'{label}, median of {a.cold_runs}', f"{med([r['import_s'] for r in rs]):.2f}", f"{med([r['first_s'] for r in rs]) * 1e3:.0f}",
                          f'{tot:.2f}', f"{med([r['wall_s'] for r in rs]):.2f}", ', '.join(sorted({str(r['status']) for r in rs})),
                          yes(any(r['torch'] for r in rs)), '<= 2 s' if goal else ''))
        if goal:
            goals.append((f'Lambda cold start: {label}, import+load+first call, median', f'{tot:.2f} s', '<= 2 s', yes(tot <= 2 and not bad)))
            goals.append((f'Lambda cold start: {label}: torch imported', yes(any(r['torch'] for r in rs)), 'no', yes(not any(r['torch'] for r in rs))))
    print(f'## 4. Lambda-style cold start: fresh process, import mhist_nb.aws_lambda (loads the models), one handler call '
          f'(MHIST_THREADS={budget})\n')
    table(['models', 'import + load s', 'first call ms', 'total s', 'process wall s', 'status', 'torch imported', 'goal'], cold_rows)

    # ---- 5: ViT-B/16 fp32 vs INT8
    say(f'ViT-B/16 fp32 vs INT8: API (1 worker x{budget} threads) and in process (Predictor x{budget} threads), '
        f'{a.seq} sequential calls each, alternating')
    from mhist_nb.serve import Predictor
    with Server(vitb['both'], 1, budget, a.work, 'vitb-latency') as srv:
        srv.wait_ready(timeout=300)
        pred = Predictor(vitb['both'], threads=budget)
        conn = http.client.HTTPConnection('127.0.0.1', srv.port, timeout=120)
        def api_call(m, c=itertools.count()):
            st, body = http_call(srv.port, 'POST', f'/predict?model={m}', tiles[next(c) % len(tiles)], conn=conn)
            if st != 200: raise RuntimeError(f'POST /predict?model={m} answered {st}: {body[:300]!r}')
            return json.loads(body)['results'][0]['predictions'][m]['timings_ms']['infer']
        def local_call(m, c=itertools.count()):
            return pred.predict([tiles[next(c) % len(tiles)]], models=[m])[0][m]['timings_ms']['infer']
        fns = {('api', m): (lambda m=m: api_call(m)) for m in ('vitb', 'vitb.int8')}
        fns.update({('loc', m): (lambda m=m: local_call(m)) for m in ('vitb', 'vitb.int8')})
        ts, infer = alternate(fns, a.seq)
        conn.close(); del pred
    for line in srv.problems()[:10]: notes.append(f'vitb-latency gunicorn log: {line[:300]}')
    for w, where in (('api', 'API (gunicorn, 1 worker)'), ('loc', 'in process (Predictor)')):
        for m in ('vitb', 'vitb.int8'):
            t, inf = np.asarray(ts[(w, m)]), np.asarray(infer[(w, m)])
            lat_rows.append((f'{where}: {m}', len(t), f'{t.min():.1f}', f'{np.percentile(t, 50):.1f}', f'{np.percentile(t, 95):.1f}',
                             f'{np.median(inf):.1f}', f'{np.median(t - inf):.1f}', ''))
        f32, i8 = np.asarray(ts[(w, 'vitb')]), np.asarray(ts[(w, 'vitb.int8')])
        lat_rows.append((f'{where}: INT8 speed-up over fp32 (min / p50)', '', '', '', '', '', '',
                         f"{f32.min() / i8.min():.2f}x / {np.median(f32) / np.median(i8):.2f}x"))
    print(f'## 5. ViT-B/16 fp32 vs INT8 at batch 1, sequential, {budget} ORT threads (ms)\n')
    table(['where: model', 'calls', 'min', 'p50', 'p95', 'infer p50', 'rest p50', 'speed-up'], lat_rows)
    print('min/p50/p95: latency of the call as the caller sees it; infer: the ONNX Runtime run alone (`timings_ms.infer`, '
          'measured inside the worker for the API); rest: per call, latency - infer (decode, preprocess and, for the API, '
          'HTTP, Flask and JSON), which other load on the machine hardly moves. min is what the code does when nothing else '
          'runs; on a shared machine p50 and p95 also measure the neighbours.\n')

    # ---- 6: INT8 flips
    if have_demo:
        for f in ('mlp', 'vit'):
            say(f'INT8 flips: {f}')
            r = int8_flips(demo, f, budget, 64 if a.quick else None)
            if r is None: notes.append(f'INT8 flips: {f}: manifest_{f}.json, manifest_{f}.int8.json, predictions_{f}_val.csv or run_{f}.json missing in {demo}'); continue
            flip_rows.append((f, r['n'], f"{r['thr'][0]:.4f}", r['flips'], f"{100 * r['share']:.1f}%", f"{r['dp']:.4f}", f"{r['dz']:.4f}",
                              f"{r['logit_std']:.3f}", '' if r['vs_train'] is None else f"{r['vs_train']:.1e}"))
        print('## 6. INT8 call flips on the demo validation tiles (fp32 vs INT8, each at its manifest threshold)\n')
        table(['family', 'tiles', 'threshold', 'flips', 'share', 'max |dp|', 'max |dlogit|', 'logit std (fp32)', 'max |p - training p|'], flip_rows)

    # ---- summary
    print(f'## Summary (load average {os.getloadavg()[0]:.2f} at end, {time.perf_counter() - T_START:.0f} s in all)\n')
    table(['measurement', 'value', 'goal', 'met'], goals)
    if notes:
        print('Notes:\n' + '\n'.join(f'- {n}' for n in notes))
    else:
        print('Notes: no errors, and no tracebacks, worker timeouts or 5xx in the gunicorn logs.')


if __name__ == '__main__': main()
