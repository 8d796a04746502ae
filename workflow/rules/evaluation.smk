ZEROSHOT_FILES = {
    "boolq": "boolq.jsonl",
    "piqa": "piqa.jsonl",
    "winogrande": "winogrande.jsonl",
    "arc_easy": "arc_easy.jsonl",
    "arc_challenge": "arc_challenge.jsonl",
    "openbookqa": "openbook_qa.jsonl",
    "lambada": "lambada_openai.jsonl",
}
EVAL_DATA = ["data/raw/wikitext-2-raw/test.txt", "data/raw/ptb", "data/raw/zeroshot"]


rule evaluate_dense:
    input:
        model=MODEL_DIR,
        data=EVAL_DATA,
        code=STAGE_SOURCES["evaluate"],
    output:
        DENSE_METRICS,
    params:
        tracked=tracked_params("evaluate"),
    conda:
        CONDA_ENV
    log:
        "logs/evaluate/dense.log",
    benchmark:
        "logs/benchmarks/evaluate/dense.tsv"
    threads: TORCH_THREADS
    resources:
        gpu=1,
    shell:
        gpu_stage_command("evaluate", "--model {input.model} --model-id dense --data-dir data/raw --out {output}")
        + " > {log} 2>&1"


rule evaluate_pruned:
    input:
        model=PRUNED_DIR,
        data=EVAL_DATA,
        code=STAGE_SOURCES["evaluate"],
    output:
        "reports/metrics/pruned/{criterion}/{ratio}.json",
    params:
        tracked=tracked_params("evaluate"),
    conda:
        CONDA_ENV
    log:
        "logs/evaluate/pruned/{criterion}/{ratio}.log",
    benchmark:
        "logs/benchmarks/evaluate/pruned/{criterion}/{ratio}.tsv"
    threads: TORCH_THREADS
    resources:
        gpu=1,
    shell:
        gpu_stage_command(
            "evaluate",
            "--model {input.model} --model-id pruned/{wildcards.criterion}/{wildcards.ratio} "
            "--data-dir data/raw --out {output}",
        )
        + " > {log} 2>&1"


rule evaluate_recovered:
    input:
        model=RECOVERED_DIR,
        data=EVAL_DATA,
        code=STAGE_SOURCES["evaluate"],
    output:
        "reports/metrics/recovered/{criterion}/{ratio}.json",
    params:
        tracked=tracked_params("evaluate"),
    conda:
        CONDA_ENV
    log:
        "logs/evaluate/recovered/{criterion}/{ratio}.log",
    benchmark:
        "logs/benchmarks/evaluate/recovered/{criterion}/{ratio}.tsv"
    threads: TORCH_THREADS
    resources:
        gpu=1,
    shell:
        gpu_stage_command(
            "evaluate",
            "--model {input.model} --model-id recovered/{wildcards.criterion}/{wildcards.ratio} "
            "--data-dir data/raw --out {output}",
        )
        + " > {log} 2>&1"


rule report:
    input:
        dense=DENSE_METRICS,
        pruned=expand("reports/metrics/pruned/{criterion}/{ratio}.json", criterion=GRID.criteria, ratio=RATIOS),
        recovered=expand(
            "reports/metrics/recovered/{criterion}/{ratio}.json", criterion=GRID.recovered_criteria, ratio=RATIOS
        ),
        code=STAGE_SOURCES["report"],
    output:
        markdown="reports/results.md",
        csv="reports/results.csv",
        plots=directory("reports/plots"),
    params:
        tracked=tracked_params("report"),
    conda:
        CONDA_ENV
    log:
        "logs/report.log",
    benchmark:
        "logs/benchmarks/report.tsv"
    shell:
        stage_command(
            "report",
            "--metrics-dir reports/metrics --out {output.markdown} --csv {output.csv} --plots-dir {output.plots}",
        )
        + " > {log} 2>&1"
