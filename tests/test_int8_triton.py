"""The Triton int8 kernel's portable path under the interpreter (the PTX vabsdiff4 path needs a GPU).

As tests/test_triton.py: ``TRITON_INTERPRET=1`` must be set before triton is imported, so the ``interp_*``
function runs in a child pytest.
"""
import os
import subprocess
import sys

import pytest
import torch

from l1fx.kernels import int8_reference as R

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_interpreter_int8_linear():
    env = {k: v for k, v in os.environ.items() if k not in ("L1FX_BACKEND", "PYTEST_XDIST_WORKER")}
    env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           "-o", "python_functions=interp_*", __file__]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


def interp_int8_linear_portable_path_is_exact():
    from l1fx.kernels import triton_int8 as T

    g = torch.Generator().manual_seed(0)
    for n, k, m in [(5, 7, 3), (33, 13, 40)]:
        qx = torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=g)
        qw = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g)
        qx[0] = 0
        qw[0] = 255  # saturated pair: 255 * k
        bias = torch.randn(m, generator=g)
        want = R.dequantize(R.linear_codes(qx, qw), 0.02, bias)
        got = T.linear(qx, qw, 0.02, bias, use_ptx=False, block=(16, 16))
        assert torch.equal(got, want)
        assert torch.equal(T.linear(qx, qw, 0.5, None, use_ptx=False, block=(16, 16)),
                           R.dequantize(R.linear_codes(qx, qw), 0.5, None))
