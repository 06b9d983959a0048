# The synthesis half: the short model writes instructions, reads what the retriever finds
# through query-focused summaries, and answers. LLM steps take every core (one at a time).
rule instructions:
    input:
        docs=rules.corpus.output.docs,
        model=rules.base_model.output.model,
        files=params_files(config, "instructions", "llm", "seed"),
        code=step_code("instructions"),
    output:
        instructions="data/synth/instructions.parquet",
        metrics="data/synth/instructions.json",
    params:
        **sections(config, "instructions", "llm", "seed"),
    threads: workflow.cores
    shell:
        "longctx instructions --docs {input.docs} --model {input.model} "
        "--out {output.instructions} --stats {output.metrics}"


rule retrieve:
    input:
        instructions=rules.instructions.output.instructions,
        index=rules.index.output.index,
        embeddings=rules.embed.output.embeddings,
        files=params_files(config, "retrieve"),
        code=step_code("retrieve"),
    output:
        retrieved="data/synth/retrieved.parquet",
        metrics="data/synth/retrieved.json",
    params:
        **sections(config, "retrieve"),
    shell:
        "longctx retrieve --instructions {input.instructions} --index {input.index} "
        "--embeddings {input.embeddings} --out {output.retrieved} --stats {output.metrics}"


rule summarize:
    input:
        instructions=rules.instructions.output.instructions,
        retrieved=rules.retrieve.output.retrieved,
        docs=rules.corpus.output.docs,
        model=rules.base_model.output.model,
        files=params_files(config, "summarize", "llm", "seed"),
        code=step_code("summarize"),
    output:
        summaries="data/synth/summaries.parquet",
        metrics="data/synth/summaries.json",
    params:
        **sections(config, "summarize", "llm", "seed"),
    threads: workflow.cores
    shell:
        "longctx summarize --instructions {input.instructions} --retrieved {input.retrieved} "
        "--docs {input.docs} --model {input.model} --out {output.summaries} "
        "--stats {output.metrics}"


rule respond:
    input:
        instructions=rules.instructions.output.instructions,
        summaries=rules.summarize.output.summaries,
        model=rules.base_model.output.model,
        files=params_files(config, "respond", "llm", "seed"),
        code=step_code("respond"),
    output:
        responses="data/synth/responses.parquet",
        metrics="data/synth/responses.json",
    params:
        **sections(config, "respond", "llm", "seed"),
    threads: workflow.cores
    shell:
        "longctx respond --instructions {input.instructions} --summaries {input.summaries} "
        "--model {input.model} --out {output.responses} --stats {output.metrics}"


rule long_output:
    input:
        docs=rules.corpus.output.docs,
        model=rules.base_model.output.model,
        files=params_files(config, "long_output", "llm", "seed"),
        code=step_code("long-output"),
    output:
        long_output="data/synth/long_output.parquet",
        metrics="data/synth/long_output.json",
    params:
        **sections(config, "long_output", "llm", "seed"),
    threads: workflow.cores
    shell:
        "longctx long-output --docs {input.docs} --model {input.model} "
        "--out {output.long_output} --stats {output.metrics}"
