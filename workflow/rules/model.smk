rule prepare_model:
    input:
        unpack(PIPELINE.inputs("prepare_model")),
    output:
        **PIPELINE.outputs("prepare_model"),
    conda:
        CONDA_ENV
    log:
        PIPELINE.log("prepare_model"),
    benchmark:
        PIPELINE.benchmark("prepare_model")
    threads: TORCH_THREADS
    resources:
        **PIPELINE.resources("prepare_model"),
    shell:
        PIPELINE.shell("prepare_model")
