"""DeepSeek-V3 pre-training as the report describes it (section 4.2), for planning: shapes, memory and cost.

671B parameters (37B active), 14.8T tokens at sequence 4096 and batch 15360 (ramped from 3072 over the first
469B tokens), FP8 compute, bf16 AdamW moments. Not meant to run on one machine.

The layout for 2,048 80 GB GPUs without pipeline parallelism (docs/scale.md has the plan, the compiled step's
per-device memory next to it, and the communication): fsdp 8 x expert 64 x tensor 4, one sequence per device
per microbatch (30 microbatches of 512 make the report's 15,360; the batch ramp would need batches that are
multiples of 15,360 here, so it is off), scanned layers with full recomputation, and an expert-parallel
capacity of twice the balanced share (dropless buffers alone would not fit).
"""

from deepseek_jax.training.config import REPORT_STEPS, default_config


def get_config():
  c = default_config()
  c.model.preset = "deepseek-v3"
  c.data.tokenizer = "bpe"
  c.precision = "fp8"
  c.seq_len = 4096
  c.batch_size = 15360
  c.steps = int(round(REPORT_STEPS))          # 14.8T / (15360 x 4096) = 235,245
  c.optimizer.lr = 2.2e-4
  c.optimizer.mu_dtype = "bfloat16"
  c.model.scan_layers = True
  c.model.remat_policy = "full"
  c.model.moe_capacity_factor = 2.0
  c.grad_accum = 30                           # microbatches of 512 sequences: one per fsdp x expert device
  c.batch_ramp.enabled = False
  c.mesh.data = 1
  c.mesh.fsdp = 8
  c.mesh.tensor = 4
  c.mesh.expert = 64                          # 64-way expert parallelism (section 3.1)
  c.log_every = 100
  c.checkpoint_every = 1000
  c.eval_every = 5000
  return c
