# Shared wiring: the params check and the helpers every rule uses. longctx's own check runs
# before anything else and refuses, in one line, what every step would refuse (bad keys and
# values, cross-field rules, files the params name that are missing); the JSON schema in
# workflow/schemas/ is generated from the same models, for editors.
from longctx.workflow import (eval_models, lmeval_tasks, model_dir, params_files, sections,
                               stage_indices, step_code, stop_on_bad_params)

stop_on_bad_params(config, "params.yaml")
