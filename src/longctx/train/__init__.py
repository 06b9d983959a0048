"""Progressive context-extension training (DESIGN.md section 1, step 6): rope.py schedules
each stage's length and RoPE base; data.py packs samples into sequences that train as the
samples would alone; loss.py is the chunked cross-entropy of long sequences."""
