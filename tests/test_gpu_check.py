"""`make gpu-check` on this CPU-only machine: it says there is nothing to check and succeeds; and tools/gpu_check.py
with `--device cpu` runs its whole CUDA code path on the CPU (the GPU tests themselves, the benchmark, the summary
table and its JSON), so that what a GPU box runs has run before it gets there."""
import ast, json, subprocess, sys
from pathlib import Path

import pytest, torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason='on a GPU machine make gpu-check runs for real')


def test_make_gpu_check_without_a_gpu():
    r = subprocess.run(['make', '--no-print-directory', 'gpu-check', f'GPU_PY={sys.executable}'], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and 'no CUDA GPU is visible' in r.stdout and 'nothing to check' in r.stdout, r.stdout + r.stderr


def gpu_tests() -> list[str]:
    "The test functions of tests/test_gpu.py (parametrised ones once)."
    tree = ast.parse((ROOT/'tests'/'test_gpu.py').read_text())
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith('test_')]


def test_gpu_check_on_the_cpu(tmp_path):
    "Every step on the CPU, with an impossible benchmark floor: the tests pass, the floor fails, the exit code says so."
    r = subprocess.run([sys.executable, 'tools/gpu_check.py', '--device', 'cpu', '--out', str(tmp_path), '--floor', '100'],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((tmp_path/'summary.json').read_text())
    rows = {x['check']: x for x in s['rows']}
    assert s['ok'] is False and s['steps'] == ['tests', 'ddp', 'benchmark', 'pipeline']
    ran = {c.removeprefix('test: ').split('[')[0] for c in rows if c.startswith('test: ')}
    assert ran == set(gpu_tests()), ran ^ set(gpu_tests())                    # no test lost between pytest and the table
    tests = [x for c, x in rows.items() if c.startswith('test: ')]
    assert [x['check'] for x in tests if x['status'] != 'pass'] == ['test: test_nccl_two_ranks_equal_one_process']
    assert 'max |loss difference|' in rows['test: test_compile_matches_eager']['detail']
    assert rows['test: test_autocast_engaged[bf16]']['detail'].startswith('amp bf16: Linear outputs in')
    assert rows['benchmark: device path >= floor']['status'] == 'fail'
    assert len([c for c in rows if c.startswith('benchmark: ')]) == 5            # 4 paths (no compile on the CPU) + floor
    assert rows['ddp benchmark']['status'] == 'skip' and rows['smoke pipeline']['status'] == 'skip'
    md = (tmp_path/'summary.md').read_text()
    assert 'FAILED' in md and all(line.count(' | ') == 3 for line in md.splitlines() if line.startswith('| '))   # 4 cells
    assert md in r.stdout


def test_failing_and_skipped_tests_reach_the_table(tmp_path):
    "A real pytest JUnit report of a passing, a failing and a skipped test becomes three rows with those statuses."
    import importlib.util
    spec = importlib.util.spec_from_file_location('gpu_check', ROOT/'tools'/'gpu_check.py')
    gc = importlib.util.module_from_spec(spec); spec.loader.exec_module(gc)
    (tmp_path/'test_x.py').write_text('import pytest\n'
                                      'def test_ok(): print("figure 1.5")\n'
                                      'def test_bad(): assert 1 == 2, "the loss drifted"\n'
                                      '@pytest.mark.skip(reason="needs 2 GPUs")\ndef test_skip(): pass\n')
    subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-o', 'junit_logging=system-out',
                    '--junitxml', str(tmp_path/'r.xml'), str(tmp_path/'test_x.py')], cwd=tmp_path, capture_output=True, timeout=120)
    rows = {r['check']: r for r in gc.junit_rows(tmp_path/'r.xml')}
    assert rows['test: test_ok']['status'] == 'pass' and rows['test: test_ok']['detail'] == 'figure 1.5'
    assert rows['test: test_bad']['status'] == 'fail' and 'the loss drifted' in rows['test: test_bad']['detail']
    assert rows['test: test_skip'] == dict(check='test: test_skip', status='skip', seconds=0.0, detail='needs 2 GPUs')
    assert 'FAIL' in gc.table(list(rows.values()))
