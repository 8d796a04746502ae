rule calibrate:
    input:
        model=MODEL_DIR,
        source=config["calibration"]["source"],
        code=STAGE_SOURCES["calibrate"],
    output:
        CALIBRATION,
    params:
        tracked=tracked_params("calibrate"),
    conda:
        CONDA_ENV
    log:
        "logs/calibrate.log",
    benchmark:
        "logs/benchmarks/calibrate.tsv"
    shell:
        stage_command("calibrate", "--model {input.model} --out {output}") + " > {log} 2>&1"


rule cache_activations:
    input:
        model=MODEL_DIR,
        calibration=CALIBRATION,
        code=STAGE_SOURCES["cache_activations"],
    output:
        ACTIVATIONS,
    params:
        tracked=tracked_params("cache_activations"),
    conda:
        CONDA_ENV
    log:
        "logs/cache_activations.log",
    benchmark:
        "logs/benchmarks/cache_activations.tsv"
    threads: TORCH_THREADS
    resources:
        gpu=1,
    shell:
        gpu_stage_command("cache_activations", "--model {input.model} --calibration {input.calibration} --out {output}")
        + " > {log} 2>&1"
