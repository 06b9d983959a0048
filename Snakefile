# longctx: the one hand-written DAG. dvc.yaml is generated from it (`longctx dvc-export`).
# Every rule runs `longctx <step>`; each passes only its own params sections.
configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/corpus.smk"
include: "workflow/rules/retrieval.smk"


rule all:
    input:
        rules.index.output.index,
    default_target: True
