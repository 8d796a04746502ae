rule score:
    input:
        unpack(PIPELINE.inputs("score")),
    output:
        **PIPELINE.outputs("score"),
    conda:
        CONDA_ENV
    log:
        PIPELINE.log("score"),
    benchmark:
        PIPELINE.benchmark("score")
    threads: TORCH_THREADS
    resources:
        gpu=1,
    shell:
        PIPELINE.shell("score")


rule prune:
    input:
        unpack(PIPELINE.inputs("prune")),
    output:
        **PIPELINE.outputs("prune"),
    conda:
        CONDA_ENV
    log:
        PIPELINE.log("prune"),
    benchmark:
        PIPELINE.benchmark("prune")
    threads: TORCH_THREADS
    shell:
        PIPELINE.shell("prune")
