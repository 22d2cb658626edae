import os, shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def mhist(*args, check=False, **kw):
    "Run the installed `mhist` console script; return the CompletedProcess."
    exe = shutil.which('mhist', path=str(BIN)) or shutil.which('mhist')
    assert exe, 'the mhist console script is not installed (pip install -e .)'
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, check=check, **kw)


@pytest.fixture(scope='session')
def synth_dir(tmp_path_factory):
    "A small synthetic MHIST-layout dataset shared by the tests (read-only by convention)."
    from mhist_nb.synth import synth
    return synth(tmp_path_factory.mktemp('data')/'synth', scale=0.02, seed=0)
