"""Progressive context-extension training (docs/architecture.md section 1, step 6): loop.py
trains one stage top to bottom; preflight.py checks it before the model loads;
distributed.py sets up Accelerate (DDP, FSDP2, DeepSpeed) and shards the data; checkpoint.py
decides when to save and resumes; metrics.py reports each step; rope.py schedules each
stage's length and RoPE base; data.py packs samples into sequences that train as the samples
would alone; loss.py is the chunked cross-entropy of long sequences; launch.py runs several
processes."""
