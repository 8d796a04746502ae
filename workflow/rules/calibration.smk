rule calibrate:
    input:
        unpack(PIPELINE.inputs("calibrate")),
    output:
        **PIPELINE.outputs("calibrate"),
    conda:
        CONDA_ENV
    log:
        PIPELINE.log("calibrate"),
    benchmark:
        PIPELINE.benchmark("calibrate")
    resources:
        **PIPELINE.resources("calibrate"),
    shell:
        PIPELINE.shell("calibrate")


rule cache_activations:
    input:
        unpack(PIPELINE.inputs("cache_activations")),
    output:
        **PIPELINE.outputs("cache_activations"),
    conda:
        CONDA_ENV
    log:
        PIPELINE.log("cache_activations"),
    benchmark:
        PIPELINE.benchmark("cache_activations")
    threads: TORCH_THREADS
    resources:
        **PIPELINE.resources("cache_activations"),
    shell:
        PIPELINE.shell("cache_activations")
