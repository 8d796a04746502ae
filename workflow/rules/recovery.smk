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
        gpu=1,
    shell:
        PIPELINE.shell("recover")
