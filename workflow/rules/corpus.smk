rule base_model:
    input:
        files=params_files(config, "base_model"),
        code=step_code("base-model"),
    output:
        model=directory("models/base"),
    params:
        **sections(config, "base_model"),
    threads: job_threads(workflow, config, "base_model", local=1)
    resources:
        **job_resources(config, "base_model"),
    log:
        "logs/base_model.log",
    shell:
        step_command("base-model")


rule corpus:
    input:
        tokenizer=rules.base_model.output.model,
        files=params_files(config, "corpus"),
        code=step_code("corpus"),
    output:
        docs="data/corpus/docs.parquet",
        metrics="data/corpus/stats.json",
    params:
        **sections(config, "corpus"),
    threads: job_threads(workflow, config, "corpus", local=1)
    resources:
        **job_resources(config, "corpus"),
    log:
        "logs/corpus.log",
    shell:
        step_command("corpus")
