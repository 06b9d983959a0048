"""The synthesis half of the DAG (docs/architecture.md section 1, steps 1-5): instructions,
retrieve, summarize, respond, long_output. Prompts live in prompts.py, table I/O in tables.py."""
