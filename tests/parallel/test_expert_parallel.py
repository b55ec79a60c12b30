"""Expert parallelism (shard_map + all-to-all) equals the single-device dense reference, forward and grads."""

import pytest


@pytest.mark.slow
def test_expert_parallel_layer_matches_dense(script):
  r = script("ep_worker")
  # The routing really is imbalanced: every token sends at least one of its K=3 rows to device 0's experts,
  # more rows than a balanced share, and nothing may be dropped.
  assert r["share_device0"] > 0.6
  layouts = [k for k in r if k.count("/") == 2]
  assert len(layouts) == 6
  for k in layouts:
    assert r[k]["fwd"] < 1e-5, (k, r[k])
    assert r[k]["grad"] < 1e-5, (k, r[k])
  # FP8 under expert parallelism computes the single-device FP8 recipe: forward, dgrad and the routing-weight
  # gradient to fp32 rounding; dw_down's token tiles group the rows per device, a different (equally valid)
  # tiling of the same recipe, so it agrees to the E4M3 rounding (which is ~6% of y here).
  for k in ("fp8/data2_fsdp2_expert2", "fp8/expert8_replicated"):
    assert r[k]["quantization"] > 1e-2, (k, r[k])
    assert r[k]["fwd"] < 1e-5 and r[k]["dx"] < 1e-5 and r[k]["dw"] < 1e-5, (k, r[k])
    assert r[k]["dw_down"] < 5e-2, (k, r[k])
  assert r["routed_experts_uses_all_to_all"]
  assert r["routed_experts_split"] < 1e-5
  assert r["routed_experts_replicated"] < 1e-5
  assert r["blocked_refused"]
  # Capacity: the dropped fraction and the output match the numpy account of which rows fit.
  assert r["capacity_dropped_expected"] > 0.2
  assert abs(r["capacity_dropped"] - r["capacity_dropped_expected"]) < 1e-7
  assert r["capacity_fwd"] < 1e-5
