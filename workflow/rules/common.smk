# Shared wiring: params validation and the helpers every rule uses.
from snakemake.utils import validate

from longctx.workflow import (check_config, code, eval_models, lmeval_tasks, model_dir,
                               sections, stage_indices)

check_config(config, "params.yaml")
validate(config, "../schemas/params.schema.json", set_default=False)
