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
  assert r["routed_experts_uses_all_to_all"]
  assert r["routed_experts_split"] < 1e-5
  assert r["routed_experts_replicated"] < 1e-5
  # Capacity: the dropped fraction and the output match the numpy account of which rows fit.
  assert r["capacity_dropped_expected"] > 0.2
  assert abs(r["capacity_dropped"] - r["capacity_dropped_expected"]) < 1e-7
  assert r["capacity_fwd"] < 1e-5
