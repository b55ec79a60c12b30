"""The decode benchmark runs its four contenders on a tiny model, which write the same cache."""

import types

from experiments.benchmarks import decode


def test_decode_suite_reports_every_contender():
  flags = types.SimpleNamespace(preset="tiny", batch=2, seq_len=32, runs=1)
  out = decode.run(flags)
  assert out["suite"] == "decode" and out["cache_len"] == 32 and out["cache_bytes"] > 0
  assert set(out["results"]) == {"absorbed", "naive", "absorbed_scan", "absorbed_scan_tuple"}
  assert out["results"]["absorbed"]["vs_absorbed"] == 1.0
  assert all(r["tokens_per_s"] > 0 for r in out["results"].values())
  for name, r in out["results"].items():
    assert r["max_abs_diff_vs_absorbed"] < 1e-4, name
