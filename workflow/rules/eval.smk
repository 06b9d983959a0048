# The evaluation half: samples are generated once (the base model's tokenizer serves every
# model), then each model (base, stage-<k>) answers the NIAH grid and the RULER tasks and runs
# lm-eval; `report` gathers every score into one metrics file, plots and an HTML page.
# niah_samples and ruler_samples scatter into shard jobs (`<rule>_shard`, one per
# shards.<rule>, split by task and length) that their own rule gathers into the samples table.
EVAL_MODELS = eval_models(config)
LMEVAL_MODELS = EVAL_MODELS if lmeval_tasks(config) else []  # lmeval.tasks: [] skips lm-eval


rule niah_samples_shard:
    input:
        model=rules.base_model.output.model,
        docs=rules.corpus.output.docs,
        files=params_files(config, "niah", "seed"),
        code=step_code("niah-samples"),
    output:
        part="data/eval/parts/niah_samples/{shard}.parquet",
    params:
        **sections(config, "niah", "seed"),
    wildcard_constraints:
        shard=r"\d+-of-\d+",
    threads: job_threads(workflow, config, "niah_samples_shard", local=1)
    resources:
        **job_resources(config, "niah_samples_shard"),
    log:
        "logs/niah_samples/{shard}.log",
    shell:
        step_command("niah-samples", shard="{wildcards.shard}")


rule niah_samples:
    input:
        parts=expand(rules.niah_samples_shard.output.part,
                     shard=shard_names(config, "niah_samples")),
        files=params_files(config, "niah", "seed"),
        code=step_code("gather-niah-samples"),
    output:
        samples="data/eval/niah.parquet",
    params:
        **sections(config, "niah", "seed"),
    threads: job_threads(workflow, config, "niah_samples", local=1)
    resources:
        **job_resources(config, "niah_samples"),
    log:
        "logs/niah_samples.log",
    shell:
        step_command("gather-niah-samples")


rule ruler_samples_shard:
    input:
        model=rules.base_model.output.model,
        docs=rules.corpus.output.docs,
        files=params_files(config, "ruler", "seed"),
        code=step_code("ruler-samples"),
    output:
        part="data/eval/parts/ruler_samples/{shard}.parquet",
    params:
        **sections(config, "ruler", "seed"),
    wildcard_constraints:
        shard=r"\d+-of-\d+",
    threads: job_threads(workflow, config, "ruler_samples_shard", local=1)
    resources:
        **job_resources(config, "ruler_samples_shard"),
    log:
        "logs/ruler_samples/{shard}.log",
    shell:
        step_command("ruler-samples", shard="{wildcards.shard}")


rule ruler_samples:
    input:
        parts=expand(rules.ruler_samples_shard.output.part,
                     shard=shard_names(config, "ruler_samples")),
        files=params_files(config, "ruler", "seed"),  # what its params name, as in every rule
        code=step_code("gather-ruler-samples"),
    output:
        samples="data/eval/ruler.parquet",
    params:
        **sections(config, "ruler", "seed"),
    threads: job_threads(workflow, config, "ruler_samples", local=1)
    resources:
        **job_resources(config, "ruler_samples"),
    log:
        "logs/ruler_samples.log",
    shell:
        step_command("gather-ruler-samples")


def evaluated_model(wildcards):
    return model_dir(wildcards.model)


rule eval_niah:
    input:
        model=evaluated_model,
        samples=rules.niah_samples.output.samples,
        files=params_files(config, "eval"),
        code=step_code("eval-niah"),
    output:
        results="results/eval/{model}/niah.json",
        table="results/eval/{model}/niah.csv",
    params:
        **sections(config, "eval"),
    wildcard_constraints:
        model=r"base|stage-\d+",
    threads: job_threads(workflow, config, "eval_niah")
    resources:
        **job_resources(config, "eval_niah"),
    log:
        "logs/eval_niah/{model}.log",
    shell:
        step_command("eval-niah", name="{wildcards.model}")


rule eval_ruler:
    input:
        model=evaluated_model,
        samples=rules.ruler_samples.output.samples,
        files=params_files(config, "eval"),
        code=step_code("eval-ruler"),
    output:
        results="results/eval/{model}/ruler.json",
        table="results/eval/{model}/ruler.csv",
    params:
        **sections(config, "eval"),
    wildcard_constraints:
        model=r"base|stage-\d+",
    threads: job_threads(workflow, config, "eval_ruler")
    resources:
        **job_resources(config, "eval_ruler"),
    log:
        "logs/eval_ruler/{model}.log",
    shell:
        step_command("eval-ruler", name="{wildcards.model}")


LMEVAL_RULER = (
    {"ruler": rules.ruler_samples.output.samples}
    if "longctx_ruler" in lmeval_tasks(config) else {}
)


rule eval_lmeval:
    input:
        model=evaluated_model,
        docs=rules.corpus.output.docs,
        **LMEVAL_RULER,
        files=params_files(config, "lmeval", "eval", "seed"),
        code=step_code("eval-lmeval"),
    output:
        results="results/eval/{model}/lmeval.json",
    params:
        **sections(config, "lmeval", "eval", "seed"),
    wildcard_constraints:
        model=r"base|stage-\d+",
    threads: job_threads(workflow, config, "eval_lmeval")
    resources:
        **job_resources(config, "eval_lmeval"),
    log:
        "logs/eval_lmeval/{model}.log",
    shell:
        step_command("eval-lmeval", name="{wildcards.model}",
                     omit=() if LMEVAL_RULER else ("ruler",))


rule report:
    input:
        niah=expand(rules.eval_niah.output.results, model=EVAL_MODELS),
        ruler=expand(rules.eval_ruler.output.results, model=EVAL_MODELS),
        lmeval=expand(rules.eval_lmeval.output.results, model=LMEVAL_MODELS),
        train=expand(rules.train_stage.output.metrics, k=STAGES),
        train_plots=expand(rules.train_stage.output.plots, k=STAGES),
        code=step_code("report"),
    output:
        metrics="results/eval/metrics.json",
        curves="results/eval/ruler_curve.tsv",
        plots=directory("results/plots"),
        report="results/report.html",
    threads: job_threads(workflow, config, "report", local=1)
    resources:
        **job_resources(config, "report"),
    log:
        "logs/report.log",
    shell:
        step_command("report", models=" ".join(EVAL_MODELS),
                     omit=() if LMEVAL_MODELS else ("lmeval",))
