"""Garment pose (GarmentNets): Chamfer distance and metrics, the garment generator, the pipeline, the example."""
import json
import math

import numpy as np
import pytest
import torch
import torch.fx
from torch import nn

import l1fx
from l1fx.errors import UsageError
from l1fx.garments import (canonical_mesh, collate, garment_fields, generate_garments, hang,
                           make_garment, render_partial, winding_number)
from l1fx.metrics import chamfer_distance, mesh_chamfer_distance, nearest_distances, nocs_error, sample_surface
from l1fx.models import GarmentNets, extract_mesh, scatter_to_grid, warp_points
from l1fx.models_garment import garment_losses, nocs_bin_targets, nocs_cross_entropy, nocs_from_logits
from l1fx.nn import L1Module
from l1fx.report import compare
from l1fx.train import TrainingWrapper

import example_loader  # tests/example_loader.py

SMALL = dict(npoint=(32, 8), radius=(0.15, 0.3), nsample=(8, 8), sa_mlps=((8, 16), (16, 32)), fp_mlps=((16,), (16,)),
             features=8, unet=(4, 8))


# ---------------------------------------------------------------- Chamfer distance
def brute_chamfer(a, b):
    """The documented definition, one pair at a time in float64."""
    out = []
    for x, y in zip(a.double(), b.double()):
        d = torch.tensor([[math.dist(p.tolist(), q.tolist()) for q in y] for p in x], dtype=torch.float64)
        out.append(0.5 * (d.min(1)[0].mean() + d.min(0)[0].mean()))
    return torch.stack(out)


@pytest.mark.parametrize("chunk", [1, 7, 16, 37, 1024])  # 37 = N: one chunk; 7, 16 leave a partial last chunk
def test_chamfer_matches_brute_force(chunk):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 37, 3, generator=g, dtype=torch.float64), torch.randn(3, 53, 3, generator=g,
                                                                                 dtype=torch.float64) * 2
    torch.testing.assert_close(chamfer_distance(a, b, chunk=chunk), brute_chamfer(a, b), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chamfer_distance(a, b, chunk), chamfer_distance(b, a, chunk))  # symmetric
    # far from 0: the distance is computed from differences, not |a|^2 + |b|^2 - 2ab (which cancels)
    torch.testing.assert_close(chamfer_distance(a + 1e6, b + 1e6, chunk), brute_chamfer(a, b), rtol=1e-9, atol=1e-9)


def test_chamfer_definition_single_points_and_empty_sets():
    p, q = torch.tensor([[[0.0, 0.0, 0.0]]]), torch.tensor([[[3.0, 4.0, 0.0]]])
    assert chamfer_distance(p, q).item() == pytest.approx(5.0)  # not squared: a length
    grid = torch.cartesian_prod(*[torch.arange(4.0)] * 3)[None]  # spacing 1
    shift = torch.tensor([0.2, 0.0, 0.0])
    assert chamfer_distance(grid, grid + shift).item() == pytest.approx(0.2)  # a small shift is its length
    assert chamfer_distance(grid, grid).item() == 0.0
    for a, b in ((torch.zeros(2, 0, 3), torch.zeros(2, 5, 3)), (torch.zeros(2, 5, 3), torch.zeros(2, 0, 3))):
        with pytest.raises(UsageError, match="empty point set"):
            chamfer_distance(a, b)
    with pytest.raises(UsageError, match="same batch size"):
        chamfer_distance(torch.zeros(2, 4, 3), torch.zeros(3, 4, 3))
    with pytest.raises(UsageError, match=r"\[B, N, D\]"):
        chamfer_distance(torch.zeros(4, 3), torch.zeros(4, 3))
    assert nearest_distances(p, torch.cat([q, p], 1)).item() == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_chamfer_on_gpu_matches_cpu():
    a, b = torch.rand(2, 3000, 3), torch.rand(2, 2100, 3)
    torch.testing.assert_close(chamfer_distance(a.cuda(), b.cuda(), chunk=512).cpu(), chamfer_distance(a, b))


def test_mesh_chamfer_and_nocs_error():
    square = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=float)
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    pts = sample_surface(square, faces, 500, np.random.default_rng(0))
    assert np.all(pts[:, 2] == 0) and pts[:, :2].min() >= 0 and pts[:, :2].max() <= 1
    assert abs(pts[:, 0].mean() - 0.5) < 0.05  # uniform by area
    lifted = square + [0, 0, 0.3]
    assert mesh_chamfer_distance(square, faces, lifted, faces, count=1000) == pytest.approx(0.3, abs=0.03)
    with pytest.raises(UsageError, match="zero area"):
        sample_surface(np.zeros((3, 3)), np.array([[0, 1, 2]]), 5)
    pred, true = torch.zeros(1, 3, 2), torch.tensor([[[3.0, 0.0], [4.0, 0.0], [0.0, 1.0]]])
    assert nocs_error(pred, true).item() == pytest.approx((5.0 + 1.0) / 2)


# ---------------------------------------------------------------- generator
def cube(side=1.0):
    v = np.array([[x, y, z] for x in (0, side) for y in (0, side) for z in (0, side)], dtype=float)
    f = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                  [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])
    return v, f


def test_winding_number_is_occupancy_of_a_closed_mesh_and_smooth_for_a_tube():
    v, f = cube()
    w = winding_number(v, f, np.array([[0.5, 0.5, 0.5], [0.1, 0.9, 0.2], [1.5, 0.5, 0.5], [-3, 2, 9]]))
    np.testing.assert_allclose(np.abs(w), [1, 1, 0, 0], atol=1e-5)
    verts, faces = canonical_mesh("skirt", np.random.default_rng(0))  # one open tube, oriented outwards
    w = winding_number(verts, faces, np.array([[0.0, -0.05, 0.0], [2.0, 0.0, 0.0]]))
    assert w[0] > 0.6 and abs(w[1]) < 0.01


def test_generator_is_deterministic_and_its_invariants_hold():
    a = generate_garments(1, ("shirt", "pants"), seed=3, num_points=64, grid=8)
    b = generate_garments(1, ("shirt", "pants"), seed=3, num_points=64, grid=8)
    c = generate_garments(1, ("shirt", "pants"), seed=4, num_points=64, grid=8)
    for x, y, z in zip(a, b, c):
        for field in ("canonical", "world", "faces", "points", "nocs", "winding", "warp"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field))
        assert not np.array_equal(x.points, z.points)
    g = a[0]
    assert g.points.shape == g.nocs.shape == (64, 3) and g.winding.shape == (8, 8, 8) and g.warp.shape == (3, 8, 8, 8)
    assert 0 <= g.canonical.min() and g.canonical.max() <= 1 and 0 <= g.nocs.min() and g.nocs.max() <= 1
    np.testing.assert_array_equal(g.world[g.grasp], 0)  # held at the origin
    assert g.world[:, 1].mean() < 0  # hanging below the grasp point
    assert 0.1 < g.visible_fraction < 0.8  # a partial view
    with pytest.raises(UsageError, match="unknown garment category 'sock'"):
        generate_garments(1, ("sock",))


def test_grasps_share_one_instance_and_the_yaw_stays_within_its_jitter():
    from l1fx.garments import make_garments
    gs = generate_garments(2, ("shirt",), seed=0, num_points=32, grid=4, grasps=3)
    assert len(gs) == 6
    for first, rest in ((gs[0], gs[1:3]), (gs[3], gs[4:6])):  # instance by instance
        for g in rest:
            np.testing.assert_array_equal(g.canonical, first.canonical)
            np.testing.assert_array_equal(g.winding, first.winding)  # computed once per instance
            assert g.grasp != first.grasp or not np.array_equal(g.world, first.world)
    assert not np.array_equal(gs[0].canonical, gs[3].canonical)
    # the hanging yaw: the same draws with and without jitter differ by one turn about the vertical
    verts, _ = canonical_mesh("top", np.random.default_rng(1))
    angles = []
    for seed in range(50):
        r = np.random.default_rng(seed)
        a, b = hang(verts, 0, r, yaw_jitter=0.0), hang(verts, 0, np.random.default_rng(seed), yaw_jitter=0.3)
        # same draws, so b is a turned about the vertical: compare the horizontal directions of one far vertex
        k = int(np.argmax(np.linalg.norm(a[:, [0, 2]], axis=1)))
        angles.append(np.arctan2(a[k, 2], a[k, 0]) - np.arctan2(b[k, 2], b[k, 0]))
    angles = np.angle(np.exp(1j * np.array(angles)))
    assert np.abs(angles).max() <= 0.3 + 1e-9 and np.abs(angles).max() > 0.1
    with pytest.raises(UsageError, match="yaw_jitter"):
        generate_garments(1, ("top",), yaw_jitter=-1.0)
    with pytest.raises(UsageError, match="grasps"):
        generate_garments(1, ("top",), grasps=0)
    assert len(make_garments("top", np.random.default_rng(0), num_points=8, grid=4, grasps=2)) == 2


def test_each_seen_point_and_its_nocs_are_the_same_surface_point():
    g = make_garment("jumpsuit", np.random.default_rng(5), num_points=40, grid=4)
    can, world = g.canonical[g.faces].astype(np.float64), g.world[g.faces].astype(np.float64)  # [F, 3, 3]
    for p_nocs, p_world in zip(g.nocs.astype(np.float64), g.points.astype(np.float64)):
        # barycentrics of the NOCS point in every canonical triangle; its triangle reproduces the seen point
        e1, e2, d = can[:, 1] - can[:, 0], can[:, 2] - can[:, 0], p_nocs - can[:, 0]
        gram = np.stack([np.stack([(e1 * e1).sum(1), (e1 * e2).sum(1)], 1),
                         np.stack([(e1 * e2).sum(1), (e2 * e2).sum(1)], 1)], 1)
        uv = np.linalg.solve(gram + 1e-18, np.stack([(d * e1).sum(1), (d * e2).sum(1)], 1)[..., None])[..., 0]
        residual = np.linalg.norm(can[:, 0] + uv[:, :1] * e1 + uv[:, 1:] * e2 - p_nocs, axis=1)
        inside = (uv >= -1e-4).all(1) & (uv.sum(1) <= 1 + 1e-4) & (residual < 1e-5)
        assert inside.any()
        k = np.flatnonzero(inside)[0]
        w = world[k]
        np.testing.assert_allclose(w[0] + uv[k, 0] * (w[1] - w[0]) + uv[k, 1] * (w[2] - w[0]), p_world, atol=1e-5)


def test_partial_view_sees_the_camera_side_only():
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    ring = np.c_[0.2 * np.cos(t), np.zeros(64), 0.2 * np.sin(t)]
    verts = np.concatenate([ring + [0, y, 0] for y in np.linspace(0, -0.6, 10)])
    faces = np.array([(s * 64 + k, s * 64 + (k + 1) % 64, (s + 1) * 64 + (k + 1) % 64) for s in range(9)
                      for k in range(64)] + [(s * 64 + k, (s + 1) * 64 + (k + 1) % 64, (s + 1) * 64 + k)
                                             for s in range(9) for k in range(64)])
    pts, can, visible = render_partial(verts, verts, faces, 300, np.random.default_rng(0))
    assert pts[:, 2].min() > -0.05 and (pts[:, 2] > 0).mean() > 0.9  # the front half of the cylinder (+z)
    assert 0.3 < visible < 0.7
    np.testing.assert_array_equal(pts, can)  # identity correspondence here


def test_warp_field_is_the_nearest_surface_point_and_hang_keeps_the_grasp():
    rng = np.random.default_rng(0)
    verts, faces = canonical_mesh("top", rng)
    _, warp = garment_fields("top", verts, verts, faces, 8, rng)  # identity hanging: warp = nearest surface point
    from l1fx.garments import from_nocs, grid_centres
    centres = from_nocs("top", grid_centres(8))
    dense = sample_surface(verts, faces, 20000, np.random.default_rng(1))
    dist = np.linalg.norm(centres[:, None] - dense[None], axis=-1).min(1)
    np.testing.assert_allclose(np.linalg.norm(warp.reshape(3, -1).T - centres, axis=1), dist, atol=0.02)
    world = hang(verts, 7, np.random.default_rng(2))
    assert np.abs(world[7]).max() < 1e-12
    r0, r1 = np.linalg.norm(verts - verts[7], axis=1), np.linalg.norm(world, axis=1)
    assert np.abs(r1 - r0).max() < 0.05  # sag keeps distances to the grasp; folds move points by <= 4 cm


# ---------------------------------------------------------------- pipeline
def test_scatter_extract_and_warp_helpers():
    feats = torch.tensor([[[1.0, 3.0, 5.0]]])
    nocs = torch.tensor([[[0.1, 0.2, 0.9], [0.1, 0.2, 0.9], [0.1, 0.2, 0.9]]])  # points 0, 1 share a voxel
    vol = scatter_to_grid(feats, nocs, 2)
    assert vol.shape == (1, 2, 2, 2, 2)
    assert vol[0, 0, 0, 0, 0] == 2.0 and vol[0, 0, 1, 1, 1] == 5.0 and vol[0, 1].sum() == 2
    c = (torch.arange(8.0) + 0.5) / 8
    ball = ((torch.stack(torch.meshgrid(c, c, c, indexing="ij")) - 0.5) ** 2).sum(0).sqrt()
    verts, faces = extract_mesh((ball < 0.3).float().numpy())
    assert faces.shape[1] == 3 and np.abs(np.linalg.norm(verts - 0.5, axis=1) - 0.3).max() < 0.1
    assert extract_mesh(np.zeros((8, 8, 8))) is None
    identity = torch.stack(torch.meshgrid(c, c, c, indexing="ij"))  # warp = the voxel centre itself
    q = torch.rand(50, 3) * (c[-1] - c[0]) + c[0]
    torch.testing.assert_close(warp_points(identity, q), q)


def test_pipeline_traces_converts_without_inner_products_and_trains():
    torch.manual_seed(0)
    garments = generate_garments(1, ("skirt", "shirt"), seed=0, num_points=64, grid=8)
    pts, nocs, winding, warp, _ = collate(garments)
    model = GarmentNets(grid=8, **SMALL).eval()
    out = model(pts)
    assert [o.shape for o in out] == [(2, 3, 64), (2, 1, 8, 8, 8), (2, 3, 8, 8, 8)]
    for got, want in zip(torch.fx.symbolic_trace(model)(pts), out):
        torch.testing.assert_close(got, want)
    assert any(isinstance(m, nn.ConvTranspose3d) for m in model.modules())
    l1 = l1fx.convert(model.train(), ratio=1.0, init="data", example_inputs=(pts,))
    dense_layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose3d)
    assert sum(isinstance(m, L1Module) for m in l1.modules()) == sum(isinstance(m, dense_layers)
                                                                     for m in model.modules())
    assert not [n for n, m in l1.named_modules() if isinstance(m, dense_layers) and not isinstance(m, L1Module)]
    assert all(r.status == "converted" for r in l1fx.summary(l1).rows)
    assert compare(model, l1, (pts[:1],)).converted.total["mul"] == 0  # no multiply left on any weight
    opt = torch.optim.SGD(l1.parameters(), lr=0.01, momentum=0.9)
    wrapper = TrainingWrapper(l1, opt, total_steps=2)
    loss = sum(garment_losses(l1(pts), nocs, winding, warp).values())
    loss.backward()
    wrapper.step()
    assert math.isfinite(loss.item())
    with pytest.raises(ValueError, match="divisible"):
        GarmentNets(grid=6, unet=(4, 8, 16))


def test_nocs_bins_targets_and_read_outs():
    nocs = torch.tensor([[[0.0, 0.124, 0.125, 0.999, 1.0]]]).expand(1, 3, 5)
    assert nocs_bin_targets(nocs, 8)[0, 0].tolist() == [0, 0, 1, 7, 7]  # bin k covers [k/K, (k+1)/K); 1 -> last
    logits = torch.full((1, 3, 4, 2), -1e4)
    logits[0, :, 2, 0] = 0.0  # point 0: all mass on bin 2
    logits[0, :, 1, 1] = logits[0, :, 3, 1] = 0.0  # point 1: half on bin 1, half on bin 3
    logits[0, :, 3, 1] += 1e-3  # ... bin 3 slightly ahead for the argmax
    argmax, expectation = nocs_from_logits(logits, "argmax"), nocs_from_logits(logits, "expectation")
    torch.testing.assert_close(argmax[0, :, 0], torch.full((3,), 2.5 / 4))  # the bin's centre
    torch.testing.assert_close(argmax[0, :, 1], torch.full((3,), 3.5 / 4))
    torch.testing.assert_close(expectation[0, :, 0], torch.full((3,), 2.5 / 4))
    torch.testing.assert_close(expectation[0, :, 1], torch.full((3,), 2.5 / 4), atol=1e-3, rtol=0)  # between
    with pytest.raises(ValueError, match="read-out"):
        nocs_from_logits(logits, "mean")
    with pytest.raises(ValueError, match="nocs_bins"):
        GarmentNets(grid=8, nocs_bins=1, **SMALL)
    # cross-entropy of confident right logits is ~0, of uniform logits log K
    right = torch.full((1, 3, 8, 5), -50.0).scatter(2, nocs_bin_targets(nocs, 8)[:, :, None], 50.0)
    assert nocs_cross_entropy(right, nocs).item() < 1e-6
    assert nocs_cross_entropy(torch.zeros(1, 3, 8, 5), nocs).item() == pytest.approx(math.log(8))


@pytest.mark.parametrize("readout", ["argmax", "expectation"])
def test_binned_pipeline_traces_converts_without_inner_products_and_trains(readout):
    torch.manual_seed(0)
    garments = generate_garments(1, ("skirt", "shirt"), seed=0, num_points=64, grid=8)
    pts, nocs, winding, warp, _ = collate(garments)
    model = GarmentNets(grid=8, nocs_bins=16, nocs_readout=readout, **SMALL).eval()
    out = model(pts)
    assert [o.shape for o in out] == [(2, 3, 64), (2, 1, 8, 8, 8), (2, 3, 8, 8, 8), (2, 3, 16, 64)]
    torch.testing.assert_close(out[0], nocs_from_logits(out[3], readout))
    for got, want in zip(torch.fx.symbolic_trace(model)(pts), out):
        torch.testing.assert_close(got, want)
    l1 = l1fx.convert(model.train(), ratio=1.0, init="data", example_inputs=(pts,))
    dense_layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose3d)
    assert not [n for n, m in l1.named_modules() if isinstance(m, dense_layers) and not isinstance(m, L1Module)]
    assert all(r.status == "converted" for r in l1fx.summary(l1).rows)
    assert compare(model, l1, (pts[:1],)).converted.total["mul"] == 0  # no multiply left on any weight
    parts = garment_losses(l1(pts), nocs, winding, warp)
    assert set(parts) == {"nocs", "winding", "warp", "nocs_ce"}
    assert parts["nocs"].requires_grad == (readout == "expectation")  # the argmax read-out has no gradient
    wrapper = TrainingWrapper(l1, torch.optim.SGD(l1.parameters(), lr=0.01, momentum=0.9), total_steps=2)
    head = dict(l1.named_parameters())["nocs_head.weight"]
    (parts["nocs_ce"] + parts["winding"] + parts["warp"]).backward()
    assert head.grad is not None and head.grad.abs().sum() > 0  # the cross-entropy reaches the NOCS head
    wrapper.step()


# ---------------------------------------------------------------- the example
def load_example():
    return example_loader.load_example("garment_pose.py", "garment_pose_example")


def test_garment_example_end_to_end(tmp_path):
    example = load_example()
    threads = torch.get_num_threads()
    results = example.main(["--smoke", "--out", str(tmp_path), "--threads", "1"])
    assert torch.get_num_threads() == threads  # restored
    assert [r["variant"] for r in results] == list(example.VARIANTS)
    for r in results:
        assert r["finite"] and r["steps"] >= 1 and set(r["per_category"]) == {"skirt", "shirt"}
        assert all(s["task_cd"] > 0 and s["canonical_cd"] > 0 and s["nocs_cm"] > 0 for s in r["per_category"].values())
        assert (r["l1_layers"] == 0) == (r["variant"] == "garmentnets")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert "--smoke" in saved["command"] and 0.3 < saved["energy"]["ratio"] < 0.5
    floor = saved["references"]["grid floor"]
    assert all(floor[c]["nocs_cm"] == 0 for c in floor)  # the reference uses the true NOCS
    for name in ("curves.png", "garments.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "results.md").read_text()
    assert "| l1-garmentnets |" in md and "| *grid floor* |" in md and "| *seen points* |" in md
    merged = example.main(["--merge", str(tmp_path), str(tmp_path), "--out", str(tmp_path / "m"), "--no-plots"])
    assert len(merged) == 2 * len(results) and "| l1-garmentnets |" in (tmp_path / "m" / "results.md").read_text()


def test_garment_example_data_folder_is_generated_once_and_shared(tmp_path, monkeypatch):
    example = load_example()
    calls = []
    real = example.generate_garments
    monkeypatch.setattr(example, "generate_garments", lambda *a, **k: calls.append(k) or real(*a, **k))
    common = ["--smoke", "--variants", "", "--data", str(tmp_path / "data"), "--no-plots"]
    example.main(common + ["--out", str(tmp_path / "a")])
    assert len(calls) == 2 and calls[0]["grasps"] == 1 and calls[0]["yaw_jitter"] == example.YAW_JITTER
    cached = sorted(p.name for p in (tmp_path / "data").glob("*.pkl"))
    assert cached == [f"garments-v2-skirt+shirt-tr2x1-te1-p128-g8-y{example.YAW_JITTER!r}.pkl"]
    example.main(common + ["--out", str(tmp_path / "b")])  # another run, the same data: not generated again
    assert len(calls) == 2 and not list((tmp_path / "b").glob("*.pkl"))
    example.main(common + ["--out", str(tmp_path / "c"), "--yaw-jitter", "0.5", "--grasps", "2"])
    assert len(calls) == 4 and calls[2]["grasps"] == 2 and calls[2]["yaw_jitter"] == 0.5  # other settings: new data
    assert len(list((tmp_path / "data").glob("*.pkl"))) == 2


def test_example_tables_report_mean_and_std_over_seeds():
    example = load_example()
    cat = {"task_cd": 0.0, "canonical_cd": 0.0, "nocs_cm": 0.0, "no_mesh": 0.0}
    fake = [{"variant": v, "seed": s, "per_category": {"skirt": dict(cat, task_cd=t)}}
            for v, vals in (("garmentnets", (2.0, 4.0)), ("l1-garmentnets", (1.5, 1.5))) for s, t in enumerate(vals)]
    refs = {"grid floor": {"skirt": dict(cat, task_cd=0.5)}, "seen points": {"skirt": dict(cat, task_cd=3.0)}}
    md = example.markdown_tables(fake, refs, {"dense_uJ": 10.0, "l1_uJ": 4.0, "ratio": 0.4}, 2)
    assert "| garmentnets | 3.00 ± 1.41 | 3.00 ± 1.41 |" in md
    assert "| l1-garmentnets | 1.50 ± 0.00 | 1.50 ± 0.00 |" in md
    assert "| *grid floor* | 0.50 | 0.50 |" in md
    with pytest.raises(SystemExit):
        example.parse_args(["--quick", "--smoke"])
    with pytest.raises(SystemExit):
        example.parse_args(["--variants", "l1-foo"])


def test_stage_one_probe_with_bins_reports_both_read_outs(tmp_path):
    example = load_example()
    runs = example.main(["--smoke", "--stage-one", "--variants", "garmentnets", "--nocs-bins", "8", "--out",
                         str(tmp_path), "--no-plots"])
    (run,) = runs
    assert set(run["per_category"]) == {"argmax", "expectation"} and run["steps"] >= 1
    for errors in (*run["per_category"].values(), run["category_mean"]):
        assert set(errors) == {"skirt", "shirt"} and all(0 < e < 200 for e in errors.values())
    assert "| *category mean* |" in (tmp_path / "stage_one.md").read_text()
    with pytest.raises(SystemExit):
        example.parse_args(["--stage-one", "--variants", "l1-garmentnets"])
    with pytest.raises(SystemExit):
        example.parse_args(["--nocs-bins", "1"])
    args = example.parse_args(["--nocs-bins", "64"])
    assert args.loss_weights["nocs"] == 0 and args.loss_weights["nocs_ce"] == 1  # bins: cross-entropy only
    assert example.parse_args([]).loss_weights["nocs"] == 10 and example.parse_args([]).model_kwargs["nocs_bins"] == 0
