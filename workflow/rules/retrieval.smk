rule embed:
    input:
        docs=rules.corpus.output.docs,
        files=params_files(config, "embed"),
        code=step_code("embed"),
    output:
        embeddings=directory("data/embeddings"),
    params:
        **sections(config, "embed"),
    threads: job_threads(workflow, config, "embed", local=1)
    resources:
        **job_resources(config, "embed"),
    log:
        "logs/embed.log",
    shell:
        step_command("embed")


rule index:
    input:
        embeddings=rules.embed.output.embeddings,
        files=params_files(config, "index", "seed"),
        code=step_code("index"),
    output:
        index=directory("data/index"),
    params:
        **sections(config, "index", "seed"),
    threads: job_threads(workflow, config, "index", local=1)
    resources:
        **job_resources(config, "index"),
    log:
        "logs/index.log",
    shell:
        step_command("index")
