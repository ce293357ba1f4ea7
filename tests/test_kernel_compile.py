"""The decode step's Triton kernels compile for sm_90 (H100 / H200) on a machine without a GPU (tests/aot_sm90.py):
CPU runs use Triton's interpreter, which accepts code the GPU compiler rejects (e.g. a dot of bf16 with fp32)."""
import importlib.util
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _can_compile() -> str:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"this Triton has no ahead-of-time compile API ({e})"
    return ""


@pytest.mark.skipif(bool(_can_compile()), reason=_can_compile() or "-")
def test_step_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, os.path.join(HERE, "aot_sm90.py")], capture_output=True, text=True,
                       timeout=600, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln[:4] in ("OK  ", "FAIL")]
    assert p.returncode == 0 and len(lines) >= 31, p.stdout[-3000:] + p.stderr[-3000:]
