# pruneflow: structural pruning + recovery of LLMs as a reproducible DAG.
#   snakemake --cores all --resources gpu=2       (GPU rules declare resources: gpu=1)
# The same stages, commands, params and outputs are declared in dvc.yaml for `dvc repro`.

configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/calibration.smk"
include: "workflow/rules/pruning.smk"
include: "workflow/rules/recovery.smk"
include: "workflow/rules/evaluation.smk"


rule all:
    input:
        REPORT_OUTPUTS,
    default_target: True
