rule embed:
    input:
        docs=rules.corpus.output.docs,
        code=code("retrieval/embed.py", "assets.py"),
    output:
        embeddings=directory("data/embeddings"),
    params:
        **sections(config, "embed"),
    shell:
        "longctx embed --docs {input.docs} --out {output.embeddings}"


rule index:
    input:
        embeddings=rules.embed.output.embeddings,
        code=code("retrieval/index.py"),
    output:
        index=directory("data/index"),
    params:
        **sections(config, "index", "seed"),
    shell:
        "longctx index --embeddings {input.embeddings} --out {output.index}"
