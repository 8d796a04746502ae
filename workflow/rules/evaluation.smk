rule evaluate_dense:
    input:
        unpack(PIPELINE.inputs("evaluate_dense")),
    output:
        **PIPELINE.outputs("evaluate_dense"),
    conda:
        CONDA_ENV
    log:
        PIPELINE.log("evaluate_dense"),
    benchmark:
        PIPELINE.benchmark("evaluate_dense")
    threads: TORCH_THREADS
    resources:
        **PIPELINE.resources("evaluate_dense"),
    shell:
        PIPELINE.shell("evaluate_dense")


rule evaluate_pruned:
    input:
        unpack(PIPELINE.inputs("evaluate_pruned")),
    output:
        **PIPELINE.outputs("evaluate_pruned"),
    conda:
        CONDA_ENV
    log:
        PIPELINE.log("evaluate_pruned"),
    benchmark:
        PIPELINE.benchmark("evaluate_pruned")
    threads: TORCH_THREADS
    resources:
        **PIPELINE.resources("evaluate_pruned"),
    shell:
        PIPELINE.shell("evaluate_pruned")


rule evaluate_recovered:
    input:
        unpack(PIPELINE.inputs("evaluate_recovered")),
    output:
        **PIPELINE.outputs("evaluate_recovered"),
    conda:
        CONDA_ENV
    log:
        PIPELINE.log("evaluate_recovered"),
    benchmark:
        PIPELINE.benchmark("evaluate_recovered")
    threads: TORCH_THREADS
    resources:
        **PIPELINE.resources("evaluate_recovered"),
    shell:
        PIPELINE.shell("evaluate_recovered")


rule evaluate_servable:
    input:
        unpack(PIPELINE.inputs("evaluate_servable")),
    output:
        **PIPELINE.outputs("evaluate_servable"),
    conda:
        CONDA_ENV
    log:
        PIPELINE.log("evaluate_servable"),
    benchmark:
        PIPELINE.benchmark("evaluate_servable")
    threads: TORCH_THREADS
    resources:
        **PIPELINE.resources("evaluate_servable"),
    shell:
        PIPELINE.shell("evaluate_servable")


rule report:
    input:
        unpack(PIPELINE.inputs("report")),
    output:
        **PIPELINE.outputs("report"),
    conda:
        CONDA_ENV
    log:
        PIPELINE.log("report"),
    benchmark:
        PIPELINE.benchmark("report")
    resources:
        **PIPELINE.resources("report"),
    shell:
        PIPELINE.shell("report")
