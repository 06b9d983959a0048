# The synthesis half: the short model writes instructions, reads what the retriever finds
# through query-focused summaries, and answers. LLM steps take every core (one at a time).
# instructions, summarize, respond and long_output scatter into shard jobs (`<rule>_shard`,
# one per shards.<step>) that their own rule gathers into the table later steps read: the
# shard jobs run the LLM (its cores and GPUs), the gather is a light CPU job (but for
# instructions, whose gather runs the later rounds).
rule instructions_shard:
    input:
        docs=rules.corpus.output.docs,
        model=rules.base_model.output.model,
        files=params_files(config, "instructions", "llm", "seed"),
        code=step_code("instructions"),
    output:
        part="data/synth/parts/instructions/{shard}.parquet",
    params:
        **sections(config, "instructions", "llm", "seed"),
    wildcard_constraints:
        shard=r"\d+-of-\d+",
    threads: job_threads(workflow, config, "instructions_shard")
    resources:
        **job_resources(config, "instructions_shard"),
    log:
        "logs/instructions/{shard}.log",
    shell:
        step_command("instructions", shard="{wildcards.shard}")


# the gather runs the LLM too: the rounds after the first top up what the filters dropped
rule instructions:
    input:
        parts=expand(rules.instructions_shard.output.part,
                     shard=shard_names(config, "instructions")),
        docs=rules.corpus.output.docs,
        model=rules.base_model.output.model,
        files=params_files(config, "instructions", "llm", "seed"),
        code=step_code("gather-instructions"),
    output:
        instructions="data/synth/instructions.parquet",
        metrics="data/synth/instructions.json",
    params:
        **sections(config, "instructions", "llm", "seed"),
    threads: job_threads(workflow, config, "instructions")
    resources:
        **job_resources(config, "instructions"),
    log:
        "logs/instructions.log",
    shell:
        step_command("gather-instructions")


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
    threads: job_threads(workflow, config, "retrieve", local=1)
    resources:
        **job_resources(config, "retrieve"),
    log:
        "logs/retrieve.log",
    shell:
        step_command("retrieve")


rule summarize_shard:
    input:
        instructions=rules.instructions.output.instructions,
        retrieved=rules.retrieve.output.retrieved,
        docs=rules.corpus.output.docs,
        model=rules.base_model.output.model,
        files=params_files(config, "summarize", "llm", "seed"),
        code=step_code("summarize"),
    output:
        part="data/synth/parts/summarize/{shard}.parquet",
    params:
        **sections(config, "summarize", "llm", "seed"),
    wildcard_constraints:
        shard=r"\d+-of-\d+",
    threads: job_threads(workflow, config, "summarize_shard")
    resources:
        **job_resources(config, "summarize_shard"),
    log:
        "logs/summarize/{shard}.log",
    shell:
        step_command("summarize", shard="{wildcards.shard}")


rule summarize:
    input:
        instructions=rules.instructions.output.instructions,
        parts=expand(rules.summarize_shard.output.part, shard=shard_names(config, "summarize")),
        code=step_code("gather-summarize"),
    output:
        summaries="data/synth/summaries.parquet",
        metrics="data/synth/summaries.json",
    params:
        **sections(config, "summarize", "llm", "seed"),
    threads: job_threads(workflow, config, "summarize", local=1)
    resources:
        **job_resources(config, "summarize"),
    log:
        "logs/summarize.log",
    shell:
        step_command("gather-summarize")


rule respond_shard:
    input:
        instructions=rules.instructions.output.instructions,
        summaries=rules.summarize.output.summaries,
        model=rules.base_model.output.model,
        files=params_files(config, "respond", "llm", "seed"),
        code=step_code("respond"),
    output:
        part="data/synth/parts/respond/{shard}.parquet",
    params:
        **sections(config, "respond", "llm", "seed"),
    wildcard_constraints:
        shard=r"\d+-of-\d+",
    threads: job_threads(workflow, config, "respond_shard")
    resources:
        **job_resources(config, "respond_shard"),
    log:
        "logs/respond/{shard}.log",
    shell:
        step_command("respond", shard="{wildcards.shard}")


rule respond:
    input:
        instructions=rules.instructions.output.instructions,
        parts=expand(rules.respond_shard.output.part, shard=shard_names(config, "respond")),
        code=step_code("gather-respond"),
    output:
        responses="data/synth/responses.parquet",
        metrics="data/synth/responses.json",
    params:
        **sections(config, "respond", "llm", "seed"),
    threads: job_threads(workflow, config, "respond", local=1)
    resources:
        **job_resources(config, "respond"),
    log:
        "logs/respond.log",
    shell:
        step_command("gather-respond")


rule long_output_shard:
    input:
        docs=rules.corpus.output.docs,
        model=rules.base_model.output.model,
        files=params_files(config, "long_output", "llm", "seed"),
        code=step_code("long-output"),
    output:
        part="data/synth/parts/long_output/{shard}.parquet",
    params:
        **sections(config, "long_output", "llm", "seed"),
    wildcard_constraints:
        shard=r"\d+-of-\d+",
    threads: job_threads(workflow, config, "long_output_shard")
    resources:
        **job_resources(config, "long_output_shard"),
    log:
        "logs/long_output/{shard}.log",
    shell:
        step_command("long-output", shard="{wildcards.shard}")


rule long_output:
    input:
        parts=expand(rules.long_output_shard.output.part,
                     shard=shard_names(config, "long_output")),
        code=step_code("gather-long-output"),
    output:
        long_output="data/synth/long_output.parquet",
        metrics="data/synth/long_output.json",
    params:
        **sections(config, "long_output", "llm", "seed"),
    threads: job_threads(workflow, config, "long_output", local=1)
    resources:
        **job_resources(config, "long_output"),
    log:
        "logs/long_output.log",
    shell:
        step_command("gather-long-output")
