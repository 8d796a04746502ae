rule recover:
    input:
        model=PRUNED_DIR,
        data=config["recover"]["data"],
        code=STAGE_SOURCES["recover"],
    output:
        directory(RECOVERED_DIR),
    params:
        tracked=tracked_params("recover"),
    conda:
        CONDA_ENV
    log:
        "logs/recover/{criterion}/{ratio}.log",
    benchmark:
        "logs/benchmarks/recover/{criterion}/{ratio}.tsv"
    threads: TORCH_THREADS
    resources:
        gpu=1,
    shell:
        gpu_stage_command("recover", "--model {input.model} --out {output}") + " > {log} 2>&1"
