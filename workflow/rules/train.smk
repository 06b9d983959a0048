# The training half: per stage, pack the synthesized data to the stage's length, then train
# from the previous stage's weights. One pack and one train_stage job per entry of
# stages.schedule (the DAG follows the params: `longctx profile` regenerates dvc.yaml).
STAGES = stage_indices(config)


def initial_weights(wildcards):
    k = int(wildcards.k)
    return rules.base_model.output.model if k == 0 else f"models/stage-{k - 1}"


rule pack:
    input:
        model=rules.base_model.output.model,
        docs=rules.corpus.output.docs,
        instructions=rules.instructions.output.instructions,
        retrieved=rules.retrieve.output.retrieved,
        summaries=rules.summarize.output.summaries,
        responses=rules.respond.output.responses,
        long_output=rules.long_output.output.long_output,
        index=rules.index.output.index,
        embeddings=rules.embed.output.embeddings,
        files=params_files(config, "pack", "stages", "seed"),
        code=step_code("pack"),
    output:
        sequences="data/pack/stage-{k}/sequences.parquet",
        metrics="data/pack/stage-{k}/stats.json",
    params:
        **sections(config, "pack", "stages", "seed"),
    wildcard_constraints:
        k=r"\d+",
    threads: job_threads(workflow, config, "pack", local=1)
    resources:
        **job_resources(config, "pack"),
    log:
        "logs/pack/stage-{k}.log",
    shell:
        step_command("pack", stage="{wildcards.k}")


rule train_stage:
    input:
        base=rules.base_model.output.model,
        init=initial_weights,
        sequences=rules.pack.output.sequences,
        files=params_files(config, "train", "stages", "seed"),
        code=step_code("train"),
    output:
        model=directory("models/stage-{k}"),
        metrics="results/train/stage-{k}/metrics.json",
        plots=directory("results/train/stage-{k}/plots"),
    params:
        **sections(config, "train", "stages", "seed"),
    wildcard_constraints:
        k=r"\d+",
    threads: job_threads(workflow, config, "train_stage")
    resources:
        **job_resources(config, "train_stage"),
    log:
        "logs/train_stage/stage-{k}.log",
    shell:
        step_command("train", stage="{wildcards.k}",
                     live="results/train/stage-{wildcards.k}",
                     checkpoints="checkpoints/stage-{wildcards.k}")
