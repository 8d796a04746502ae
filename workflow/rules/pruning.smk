rule score:
    input:
        model=MODEL_DIR,
        calibration=CALIBRATION,
        activations=ACTIVATIONS,
        code=STAGE_SOURCES["score"],
    output:
        SCORES,
    params:
        tracked=tracked_params("score"),
    conda:
        CONDA_ENV
    log:
        "logs/score/{criterion}.log",
    benchmark:
        "logs/benchmarks/score/{criterion}.tsv"
    threads: TORCH_THREADS
    resources:
        gpu=1,
    shell:
        gpu_stage_command(
            "score",
            "--model {input.model} --calibration {input.calibration} --activations {input.activations} "
            "--criterion {wildcards.criterion} --out {output}",
        )
        + " > {log} 2>&1"


rule prune:
    input:
        model=MODEL_DIR,
        scores=SCORES,
        activations=ACTIVATIONS,
        code=STAGE_SOURCES["prune"],
    output:
        directory(PRUNED_DIR),
    params:
        tracked=tracked_params("prune"),
    conda:
        CONDA_ENV
    log:
        "logs/prune/{criterion}/{ratio}.log",
    benchmark:
        "logs/benchmarks/prune/{criterion}/{ratio}.tsv"
    threads: TORCH_THREADS
    shell:
        stage_command(
            "prune",
            "--model {input.model} --scores {input.scores} --activations {input.activations} "
            "--criterion {wildcards.criterion} "
            "--ratio {wildcards.ratio} --out {output}",
        )
        + " > {log} 2>&1"
