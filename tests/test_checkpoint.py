"""``save_checkpoint`` / ``load_checkpoint`` (issue 13): atomic saves, bit-exact resume, clear errors."""
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from l1fx import checkpoint as ckpt_module
from l1fx.checkpoint import load_checkpoint, save_checkpoint
from l1fx.errors import CheckpointError
from l1fx.nn import L1Conv1d
from l1fx.train import DLC, MGS, TrainingWrapper

REPO = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    """ℓ1 layers, BatchNorm, dropout (so resuming needs the RNG too) and a dense head."""

    def __init__(self):
        super().__init__()
        self.conv1 = L1Conv1d(3, 8, 1)
        self.bn1 = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.3)
        self.conv2 = L1Conv1d(8, 8, 1)
        self.bn2 = nn.BatchNorm1d(8)
        self.head = nn.Conv1d(8, 4, 1)

    def forward(self, x):
        x = self.drop(torch.relu(self.bn1(self.conv1(x))))
        return self.head(torch.relu(self.bn2(self.conv2(x))))


TOTAL = 6


def build(seed=0):
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    return model, opt, TrainingWrapper(model, opt, total_steps=TOTAL, mgs=MGS(warmup_steps=1), dlc=DLC(hold=0.2))


def train(model, wrapper, steps):
    """Each batch is drawn from the global generators (torch, NumPy, Python), as a data pipeline does."""
    for _ in range(steps):
        x = torch.randn(4, 3, 16) + torch.from_numpy(np.random.rand(4, 3, 16).astype(np.float32))
        x = x * random.uniform(0.5, 2.0)
        y = torch.randint(0, 4, (4, 16))
        wrapper.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        wrapper.step()


def seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_resume_is_bit_exact_with_model_optimizer_wrapper_and_rng(tmp_path):
    model_a, opt_a, wrapper_a = build()
    seed_all(1)
    train(model_a, wrapper_a, TOTAL)

    model_b, opt_b, wrapper_b = build()
    seed_all(1)
    train(model_b, wrapper_b, 2)
    path = save_checkpoint(tmp_path / "run" / "last.pt", model=model_b, optimizer=opt_b, wrapper=wrapper_b,
                           epoch=2, note="after two steps")

    seed_all(99)  # a restarted process: other seeds, fresh objects with other weights
    model_c, opt_c, wrapper_c = build(seed=7)
    extra = load_checkpoint(path, model=model_c, optimizer=opt_c, wrapper=wrapper_c, rng=True)
    assert extra == {"epoch": 2, "note": "after two steps"}
    assert wrapper_c.step_count == 2 and model_c.conv1.mgs_mix == model_b.conv1.mgs_mix
    train(model_c, wrapper_c, TOTAL - 2)

    for (name, a), c in zip(model_a.state_dict().items(), model_c.state_dict().values()):
        assert torch.equal(a, c), name
    assert wrapper_a.state_dict() == wrapper_c.state_dict()
    assert model_a.conv2.mgs_mix == model_c.conv2.mgs_mix
    assert opt_a.param_groups[0]["lr"] == opt_c.param_groups[0]["lr"]
    for pa, pc in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(opt_a.state[pa]["momentum_buffer"], opt_c.state[pc]["momentum_buffer"])


def test_load_leaves_the_global_rng_alone_unless_asked(tmp_path):
    model, opt, wrapper = build()
    path = save_checkpoint(tmp_path / "c.pt", model=model)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    load_checkpoint(path, model=model)
    assert torch.equal(torch.get_rng_state(), state)


# A save that blocks while pickling an extra value, so the parent can kill it in the middle of the write.
KILLED_SAVE = """
import sys, time, torch
from l1fx.checkpoint import save_checkpoint
class Slow:
    def __reduce__(self):
        print("saving", flush=True)
        time.sleep(60)
        return (int, (0,))
path = sys.argv[1]
save_checkpoint(path, model=torch.nn.Linear(64, 64), step=2, big=torch.randn(1 << 18), slow=Slow())
"""


def test_process_killed_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "last.pt"
    torch.manual_seed(0)
    old = nn.Linear(64, 64)
    save_checkpoint(path, model=old, step=1)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(path)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "saving":
        proc.kill()
        pytest.fail(f"the save did not start: {line!r} {proc.communicate()[1]}")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)

    # The previous checkpoint is whole; the killed writer's temp file is hidden next to it.
    fresh = nn.Linear(64, 64)
    assert load_checkpoint(path, model=fresh) == {"step": 1}
    assert torch.equal(fresh.weight, old.weight)
    temps = [p for p in tmp_path.iterdir() if p != path]
    assert len(temps) == 1 and temps[0].name.startswith(".last.pt.l1fx-tmp-")
    # The next save to the same path removes it.
    save_checkpoint(path, model=fresh, step=3)
    assert sorted(tmp_path.iterdir()) == [path] and load_checkpoint(path)["step"] == 3


def test_failing_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    model = nn.Linear(3, 3)
    save_checkpoint(path, model=model, step=1)
    before = path.read_bytes()

    def disk_full(obj, f):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_module.torch, "save", disk_full)
    with pytest.raises(CheckpointError, match=rf"^{path}: cannot save the checkpoint \(OSError: .*No space left"):
        save_checkpoint(path, model=model, step=2)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]
    assert load_checkpoint(path, model=model) == {"step": 1}


def test_load_errors_name_the_path_and_change_nothing(tmp_path):
    model, opt, wrapper = build()
    good = save_checkpoint(tmp_path / "good.pt", model=model, optimizer=opt, wrapper=wrapper)

    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'nope.pt'}: no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.pt", model=model)
    plain = tmp_path / "plain.pt"
    torch.save({"model": model.state_dict()}, plain)
    with pytest.raises(CheckpointError, match=f"^{plain}: not an l1fx checkpoint"):
        load_checkpoint(plain, model=model)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:200])  # what torch.save leaves when killed over an existing file
    with pytest.raises(CheckpointError, match=f"^{cut}: cannot be read"):
        load_checkpoint(cut, model=model)
    only_model = save_checkpoint(tmp_path / "m.pt", model=model)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(only_model, model=model, optimizer=opt)

    # Mismatches are found before anything is loaded: the objects stay as they were.
    other, other_opt, other_wrapper = build(seed=3)
    snapshot = {k: v.clone() for k, v in other.state_dict().items()}
    other.head = nn.Conv1d(8, 5, 1)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.05, momentum=0.9)
    with pytest.raises(CheckpointError, match=r"head.weight: shape \(4, 8, 1\) in the checkpoint, \(5, 8, 1\)"):
        load_checkpoint(good, model=other, optimizer=other_opt)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in snapshot.items() if not k.startswith("head"))
    assert other_opt.state_dict()["state"] == {}
    short = TrainingWrapper(model, opt, total_steps=TOTAL + 1)
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=f"^{good}: .*total_steps={TOTAL}"):
        load_checkpoint(good, model=model, optimizer=opt, wrapper=short)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in model_before.items())

    with pytest.raises(CheckpointError, match="model= must be a torch.nn.modules.module.Module"):
        save_checkpoint(tmp_path / "x.pt", model=opt)


class Config:  # an extra value that is not plain data
    def __init__(self, depth):
        self.depth = depth


def test_extra_objects_need_weights_only_false(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", config=Config(3))
    with pytest.raises(CheckpointError, match="weights_only=False"):
        load_checkpoint(path)
    assert load_checkpoint(path, weights_only=False)["config"].depth == 3


class Versioned(nn.Module):
    """A model whose ``set_extra_state`` refuses another version: load_state_dict fails after the checks."""

    def __init__(self, version):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.bn = nn.BatchNorm1d(2)
        self.version = version

    def get_extra_state(self):
        return {"version": self.version}

    def set_extra_state(self, state):
        if state["version"] != self.version:
            raise ValueError("incompatible version")


@pytest.mark.parametrize("rng", [False, True])
def test_a_load_that_fails_late_leaves_every_object_as_it_was(tmp_path, rng):
    torch.manual_seed(0)
    a = Versioned(1)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    a.lin(torch.randn(3, 2)).sum().backward()
    opt_a.step()
    path = save_checkpoint(tmp_path / "c.pt", model=a, optimizer=opt_a)

    b = Versioned(2)
    b.bn.running_mean.fill_(7.0)  # extra state is set after the tensors: these must come back too
    opt_b = torch.optim.SGD(b.parameters(), lr=0.5, momentum=0.5)
    model_before = {k: v.clone() for k, v in b.state_dict().items() if isinstance(v, torch.Tensor)}
    rng_before = torch.get_rng_state()
    torch.rand(3)  # the file's RNG state is not the current one
    rng_mid = torch.get_rng_state()
    with pytest.raises(CheckpointError, match=f"^{path}: the model state cannot be loaded .*ValueError: "
                                              "incompatible version.*nothing was changed"):
        load_checkpoint(path, model=b, optimizer=opt_b, rng=rng)
    assert opt_b.param_groups[0]["lr"] == 0.5 and opt_b.param_groups[0]["momentum"] == 0.5
    assert opt_b.state_dict()["state"] == {}
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in model_before.items())
    assert torch.equal(torch.get_rng_state(), rng_mid) and not torch.equal(rng_mid, rng_before)


def test_an_optimizer_that_fails_to_load_puts_the_model_back(tmp_path, monkeypatch):
    model, opt, _ = build()
    path = save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt)
    other, other_opt, _ = build(seed=5)
    before = {k: v.clone() for k, v in other.state_dict().items()}

    def broken(state):
        raise KeyError("param_groups")

    monkeypatch.setattr(other_opt, "load_state_dict", broken)
    with pytest.raises(CheckpointError, match=f"^{path}: the optimizer state cannot be loaded"):
        load_checkpoint(path, model=other, optimizer=other_opt)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
