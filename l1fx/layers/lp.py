"""The ``"lp"`` replacement variant: ``l1fx.convert(model, p=...)`` makes ℓp layers.

Registered per kind with :func:`register_replacement` (``("lp", "linear")`` ...),
like the built-in ``"l1"`` variant, so the rewrite pass asks the registry for
``build_replacement(module, "lp", p=p)``. ``p = 1`` builds the ℓ1 layer itself
(:class:`l1fx.nn.L1Linear` ...: the same op, kernels and state_dict); any other
``p`` the ℓp class of the kind (:data:`LP_MODULES`), whose functional form is
:data:`LP_FUNCTIONS` (used for converted ``F.linear``/``F.conv*d`` calls).

Importing this module also registers the FLOP formula of the ℓp custom ops
(2 per "MAC", as for ℓ1; what each "MAC" costs is the energy report's business,
:mod:`l1fx.energy`).
"""
from __future__ import annotations

import math

from torch import nn

from . import l1_flops, register_replacement, resolve, spec_for_module

VARIANT = "lp"
KINDS = ("linear", "conv1d", "conv2d", "conv3d")
LP_MODULES = {"linear": "l1fx.nn.LpLinear", "conv1d": "l1fx.nn.LpConv1d", "conv2d": "l1fx.nn.LpConv2d",
              "conv3d": "l1fx.nn.LpConv3d"}
LP_FUNCTIONS = {"linear": "l1fx.functional.lp_linear", "conv1d": "l1fx.functional.lp_conv1d",
                "conv2d": "l1fx.functional.lp_conv2d", "conv3d": "l1fx.functional.lp_conv3d"}
LP_OPS = ("l1fx::lp_linear", "l1fx::lp_conv")


@register_replacement(VARIANT, *KINDS)
def lp_replacement(module: nn.Module, *, p: float = 1.0, share_parameters: bool = False) -> nn.Module:
    """The ℓp layer of a dense ``module`` (the ℓ1 layer for ``p = 1``), weights copied or shared."""
    from l1fx.kernels.lp import check_p

    p = check_p(p, "lp replacement")
    spec = spec_for_module(module)
    if p == 1.0:
        return spec.l1_class.from_dense(module, share_parameters=share_parameters)
    return resolve(LP_MODULES[spec.name]).from_dense(module, share_parameters=share_parameters, p=p)


def _register_flops() -> None:
    import torch
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    from .. import ops_lp  # noqa: F401  (defines torch.ops.l1fx.lp_*)

    for name in LP_OPS:
        packet = getattr(torch.ops.l1fx, name.partition("::")[2])
        if packet not in flop_registry:
            register_flop_formula(packet)(l1_flops)


_register_flops()


# ---------------------------------------------------------------- operation counts (l1fx.energy)
# A general power |d|^p = exp2(p log2 |d|) is priced as what the kernels evaluate: a degree-8
# log2 and a degree-7 exp2 polynomial by Horner's rule, about 17 multiplies and 17 additions
# (exponent/mantissa bit operations and the rounding not counted). Documented in docs/energy.md.
POW_MUL, POW_ADD = 17, 17


def ops_per_element(p: float) -> tuple[int, int]:
    """(multiplies, additions) of one reduction element ``k`` of an ℓp output, as the kernels compute it.

    p = 1: subtract, accumulate |d| (0, 2) - the only multiplication-free case; p = 2: subtract, square,
    accumulate (1, 2); p = inf: subtract, compare (priced as an addition) (0, 2); integer p = n: the
    power as n - 1 products (n - 1, 2); any other p: a max pass (subtract,
    compare) and a scaled pass (subtract, multiply by 1/max, a power, accumulate)
    (1 + POW_MUL, 4 + POW_ADD). The per-output root and bias are not counted (as FlopCounterMode
    does not count a bias).
    """
    if p == 1.0 or math.isinf(p):
        return 0, 2
    if p == int(p):
        return int(p) - 1, 2
    return 1 + POW_MUL, 4 + POW_ADD


def p_of_call(packet, args: tuple) -> float:
    """The ``p`` of a call of an ℓp op (raw arguments: ``p`` is the second last), 1 for any other op."""
    if getattr(packet, "_qualified_op_name", None) in LP_OPS or str(packet) in LP_OPS:
        return float(args[-2])
    return 1.0
