"""The megakernel ladder's CUDA sources (issue #25) compile for sm_90a with nvcc wherever nvcc exists (the GPU
runs compile them with NVRTC; this catches a broken source before a GPU session spends time on it)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "megakernel")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
@pytest.mark.parametrize("script,n", [("ladder.py", 2), ("rung3a.py", 8)])
def test_megakernel_sources_compile_with_nvcc(script, n, tmp_path):
    out = tmp_path / "dry.json"
    p = subprocess.run([sys.executable, os.path.join(HERE, script), "--dry-run", "--compile-check", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    nvcc = {k: v for k, v in json.loads(out.read_text())["compile_check"].items() if k.startswith("nvcc")}
    assert len(nvcc) == n and all(isinstance(v, dict) and v["rc"] == 0 for v in nvcc.values()), nvcc
