# embed scatters into shard jobs (`embed_shard`, one per shards.embed, each a contiguous
# range of corpus rows) that `embed` gathers into data/embeddings; index reads them in a stream.
rule embed_shard:
    input:
        docs=rules.corpus.output.docs,
        files=params_files(config, "embed"),
        code=step_code("embed"),
    output:
        part=directory("data/parts/embed/{shard}"),
    params:
        **sections(config, "embed"),
    wildcard_constraints:
        shard=r"\d+-of-\d+",
    threads: job_threads(workflow, config, "embed_shard", local=1)
    resources:
        **job_resources(config, "embed_shard"),
    log:
        "logs/embed/{shard}.log",
    shell:
        step_command("embed", shard="{wildcards.shard}")


rule embed:
    input:
        parts=expand(rules.embed_shard.output.part, shard=shard_names(config, "embed")),
        code=step_code("gather-embed"),
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
        step_command("gather-embed")


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
