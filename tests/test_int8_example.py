"""examples/int8_part_segmentation.py end to end on its quick preset (it imports part_segmentation's helpers,
so a change of their signatures must not break it silently again)."""
import json
import math

import example_loader


def test_int8_example_quick_trains_quantises_and_times(tmp_path):
    module = example_loader.load_example("int8_part_segmentation.py")
    out = module.main(["--quick", "--threads", "1", "--speed-batch", "2", "--speed-points", "128", "--reps", "1",
                       "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "int8_results.json").read_text())
    assert saved["steps"] == out["steps"] > 0
    for key in ("fp32_l1", "int8_l1"):
        assert 0 <= saved[key]["instance_miou"] <= 100
    assert abs(saved["int8_l1"]["accuracy"] - saved["fp32_l1"]["accuracy"]) < 10  # the int8 model is the same net
    assert set(saved["forward_seconds"]) == {"dense fp32", "l1 fp32", "l1 int8"}
    assert all(math.isfinite(v) and v > 0 for v in saved["forward_seconds"].values())
