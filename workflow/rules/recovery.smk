rule recover:
    input:
        unpack(PIPELINE.inputs("recover")),
    output:
        **PIPELINE.outputs("recover"),
    conda:
        CONDA_ENV
    log:
        PIPELINE.log("recover"),
    benchmark:
        PIPELINE.benchmark("recover")
    threads: TORCH_THREADS
    resources:
        **PIPELINE.resources("recover"),
    retries: PIPELINE.retries("recover")
    shell:
        PIPELINE.shell("recover")
