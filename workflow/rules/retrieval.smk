rule embed:
    input:
        docs=rules.corpus.output.docs,
        files=params_files(config, "embed"),
        code=step_code("embed"),
    output:
        embeddings=directory("data/embeddings"),
    params:
        **sections(config, "embed"),
    shell:
        "longctx embed --docs {input.docs} --out {output.embeddings}"


rule index:
    input:
        embeddings=rules.embed.output.embeddings,
        files=params_files(config, "index", "seed"),
        code=step_code("index"),
    output:
        index=directory("data/index"),
    params:
        **sections(config, "index", "seed"),
    shell:
        "longctx index --embeddings {input.embeddings} --out {output.index}"
