rule base_model:
    input:
        code=code("base_model.py", "assets.py"),
    output:
        model=directory("models/base"),
    params:
        **sections(config, "base_model"),
    shell:
        "longctx base-model --out {output.model}"


rule corpus:
    input:
        tokenizer=rules.base_model.output.model,
        code=code("corpus.py", "tokens.py", "assets.py"),
    output:
        docs="data/corpus/docs.parquet",
        metrics="data/corpus/stats.json",
    params:
        **sections(config, "corpus"),
    shell:
        "longctx corpus --tokenizer {input.tokenizer} --out {output.docs} --stats {output.metrics}"
