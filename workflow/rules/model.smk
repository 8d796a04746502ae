rule prepare_model:
    input:
        code=STAGE_SOURCES["prepare_model"],
    output:
        directory(MODEL_DIR),
    params:
        tracked=tracked_params("prepare_model"),
    conda:
        CONDA_ENV
    log:
        "logs/prepare_model.log",
    benchmark:
        "logs/benchmarks/prepare_model.tsv"
    threads: TORCH_THREADS
    shell:
        stage_command("prepare_model", "--out {output}") + " > {log} 2>&1"
