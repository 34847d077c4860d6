"""examples/part_segmentation.py's module-swap fallback (used where l1fx.convert is missing) picks layers as
convert does: the layer registry's kinds, and ``ratio`` rounded with halves up (not Python's banker's round)."""

import torch
from torch import nn

from l1fx.nn import L1ConvTranspose1d, L1Linear, L1Module

import example_loader  # tests/example_loader.py


def load_example():
    return example_loader.load_example("part_segmentation.py", "part_segmentation_fallback")


class Wide(nn.Linear):
    """A subclass of a registered kind: convert takes it, so the fallback does too."""


def test_fallback_swap_rounds_halves_up_and_uses_the_registry(monkeypatch):
    example = load_example()
    monkeypatch.setattr(example, "_convert", None)  # as in a checkout without l1fx.convert
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), Wide(4, 4), nn.ConvTranspose1d(4, 4, 1), nn.Conv1d(4, 4, 1),
                          L1Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    # 6 dense layers of a kind with an l1 layer (the transposed conv too, not the L1Linear): 0.5 * 6 = 3
    out = example.to_l1(model, 0.5)
    assert [isinstance(m, L1Module) for m in out] == [True, True, True, False, True, False, False]
    assert type(out[2]) is L1ConvTranspose1d and out[4] is not model[4]  # a deep copy
    assert not any(isinstance(m, L1Module) for m in list(model)[:4])  # the original is left alone
    torch.testing.assert_close(out[0].weight, model[0].weight)  # weights copied
    assert sum(isinstance(m, L1Module) for m in example.to_l1(model, 1.0)) == 7
    assert sum(isinstance(m, L1Module) for m in example.to_l1(model, 0.0)) == 1
