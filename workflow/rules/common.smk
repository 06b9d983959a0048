# Shared wiring: the params checks and the helpers every rule uses. longctx's own check ran
# first (Snakefile) and refused, in one line, what every step would refuse (bad YAML, keys and
# values, cross-field rules, files the params name that are missing); here Snakemake's config
# must be the file itself. The JSON schema in workflow/schemas/ is generated from the same
# models, for editors.
from longctx.workflow import (check_no_overrides, eval_models, exit_on_refusal, job_resources,
                               job_threads, lmeval_tasks, model_dir, params_files, sections,
                               shard_names, stage_indices, step_code, step_command)

exit_on_refusal(check_no_overrides, config, "params.yaml")
