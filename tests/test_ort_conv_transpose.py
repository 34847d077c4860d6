"""l1fx.L1ConvTranspose in the native custom-op library (kernels/csrc/ort_ops.cpp): the cpu backend's kernel,
so the same numbers as PyTorch's cpu path; checked against a float64 brute force at offsets up to 1e6."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from l1fx.export import export_onnx
from l1fx.kernels import conv_transpose as reference
from l1fx.kernels import cpu_transpose, ort_build
from l1fx.nn import L1ConvTranspose1d, L1ConvTranspose2d, L1ConvTranspose3d
from l1fx.ort_runtime import OrtFallbackWarning, ort_session

pytestmark = pytest.mark.slow  # builds the custom-op library


@pytest.fixture(scope="module")
def native():
    if ort_build.find_headers() is None:
        pytest.skip("no onnxruntime headers here")
    ort_build.library_path()


CASES = [  # (class, in, out, kernel, stride, padding, output_padding, groups, dilation, spatial)
    (L1ConvTranspose3d, 8, 4, 2, 2, 0, 0, 1, 1, (3, 4, 2)),
    (L1ConvTranspose3d, 4, 6, 3, 2, 1, 1, 2, 1, (3, 3, 3)),
    (L1ConvTranspose2d, 3, 20, (2, 3), (1, 2), (0, 1), (0, 1), 1, (2, 1), (5, 4)),
    (L1ConvTranspose1d, 6, 33, 3, 3, 1, 2, 3, 2, (7,)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].__name__}-{c[1]}-{c[2]}-g{c[7]}")
@pytest.mark.parametrize("offset,spread", [(0.0, 1.0), (1e4, 3.0), (-1e6, 1e6)])
def test_native_conv_transpose_matches_the_cpu_kernel_and_float64(native, case, offset, spread, tmp_path):
    cls, c, m, k, s, p, op, g, d, spatial = case
    torch.manual_seed(0)
    layer = cls(c, m, k, stride=s, padding=p, output_padding=op, groups=g, dilation=d).eval()
    with torch.no_grad():
        layer.weight.mul_(spread).add_(offset)
        layer.bias.mul_(spread)
    x = torch.rand(2, c, *spatial, dtype=torch.float64).mul(2 * spread).sub(spread).add(offset).float()
    path = tmp_path / "t.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(layer, (x,), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OrtFallbackWarning)
        sess = ort_session(path, paths=("native",), intra_op_num_threads=2)
    args = (layer.stride, layer.padding, layer.output_padding, layer.groups, layer.dilation)
    for batch in (2, 3):
        xb = x if batch == 2 else torch.cat([x, x[:1] + 0.5], 0)
        got = sess.run(None, {sess.get_inputs()[0].name: xb.numpy()})[0]
        cpu = cpu_transpose.conv_transpose_forward(xb, layer.weight.detach(), layer.bias.detach(), *args).numpy()
        np.testing.assert_array_equal(got, cpu)  # one kernel, one order of the sums
        exact = reference.conv_transpose_forward(xb.double(), layer.weight.detach().double(),
                                                 layer.bias.detach().double(), *args)
        # each output is b - sum of at most C/g * taps terms |fl(x - w)|: within (terms + 2) eps of its magnitudes
        terms = (c // g) * int(np.prod(layer.kernel_size))
        scale = reference.conv_transpose_forward(xb.double(), layer.weight.detach().double(), None, *args).abs() \
            + layer.bias.detach().double().abs().view(1, -1, *[1] * len(spatial))
        err = (torch.from_numpy(got).double() - exact).abs()
        assert torch.all(err <= (terms + 2) * 2.0 ** -23 * scale), float((err / scale).max())


def test_nan_and_inf_land_where_the_formula_puts_them(native, tmp_path):
    torch.manual_seed(1)
    layer = L1ConvTranspose3d(2, 3, 2, stride=2).eval()
    x = torch.randn(1, 2, 2, 2, 2)
    path = tmp_path / "t.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(layer, (x,), path)
    sess = ort_session(path, paths=("native",))
    x[0, 0, 1, 0, 1] = float("nan")
    x[0, 1, 0, 0, 0] = float("inf")
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    want = cpu_transpose.conv_transpose_forward(x, layer.weight.detach(), layer.bias.detach(), layer.stride,
                                                layer.padding, layer.output_padding, 1, layer.dilation).numpy()
    np.testing.assert_array_equal(got, want)  # assert_array_equal treats NaN == NaN, position by position
    assert np.isnan(got).sum() == 3 * 8 and np.isneginf(got).sum() == 3 * 8


def test_unet_session_runs_the_native_op(native, tmp_path):
    """A U-Net with a ConvTranspose3d converts, exports and runs natively, equal to the eager model."""
    import l1fx

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Conv3d(2, 8, 3, stride=2, padding=1)
            self.up = nn.ConvTranspose3d(8, 4, 2, stride=2)
            self.head = nn.Conv3d(6, 3, 1)

        def forward(self, x):
            return self.head(torch.cat([torch.relu(self.up(torch.relu(self.down(x)))), x], 1))

    torch.manual_seed(0)
    x = torch.randn(2, 2, 8, 8, 8)
    model = l1fx.convert(UNet().eval(), 1.0, example_inputs=(x,), normalize=None).eval()
    path = tmp_path / "u.onnx"
    export_onnx(model, (x,), path)
    sess = ort_session(path)
    assert sess.l1fx_path == "native"
    with torch.no_grad():
        want = model(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
