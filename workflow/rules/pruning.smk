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
        **PIPELINE.resources("score"),
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
    resources:
        **PIPELINE.resources("prune"),
    shell:
        PIPELINE.shell("prune")


rule prune_servable:
    input:
        unpack(PIPELINE.inputs("prune_servable")),
    output:
        **PIPELINE.outputs("prune_servable"),
    conda:
        CONDA_ENV
    log:
        PIPELINE.log("prune_servable"),
    benchmark:
        PIPELINE.benchmark("prune_servable")
    threads: TORCH_THREADS
    resources:
        **PIPELINE.resources("prune_servable"),
    shell:
        PIPELINE.shell("prune_servable")


rule export_gguf:
    input:
        unpack(PIPELINE.inputs("export_gguf")),
    output:
        **PIPELINE.outputs("export_gguf"),
    conda:
        CONDA_ENV
    log:
        PIPELINE.log("export_gguf"),
    benchmark:
        PIPELINE.benchmark("export_gguf")
    resources:
        **PIPELINE.resources("export_gguf"),
    shell:
        PIPELINE.shell("export_gguf")
