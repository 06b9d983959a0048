# longctx: the one hand-written DAG. dvc.yaml is generated from it (`longctx dvc-export`).
# Every rule runs `longctx <step>`; each passes only its own params sections.
from longctx.workflow import check_params, exit_on_refusal

exit_on_refusal(check_params, "params.yaml")  # before Snakemake reads it: bad YAML in one line
configfile: "params.yaml"

from longctx.workflow import keep_running_on_usr1

keep_running_on_usr1(workflow)  # in a cluster job: SLURM's checkpoint signal is for training


include: "workflow/rules/common.smk"
include: "workflow/rules/corpus.smk"
include: "workflow/rules/retrieval.smk"
include: "workflow/rules/synth.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/eval.smk"


rule all:
    input:
        rules.respond.output.responses,
        rules.long_output.output.long_output,
        expand(rules.train_stage.output.model, k=STAGES),
        rules.report.output.report,
    default_target: True
