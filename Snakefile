# PTM-Mamba training pipeline: [prepare ->] [cluster ->] split -> embed (ESM-2, sharded) -> train.
#   snakemake --cores all                      # run on this machine
#   snakemake --profile profiles/slurm         # run on a SLURM cluster
#   snakemake --report report.html             # HTML report of the last run
# Settings: config/config.yaml (schema: workflow/schemas/config.schema.yaml).

from snakemake.utils import min_version

min_version("8.20")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/cluster.smk"
include: "workflow/rules/split.smk"
include: "workflow/rules/embed.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/predict.smk"


# Light rules run where Snakemake runs, not as cluster jobs.
localrules:
    all,
    embeddings,
    gather_embeddings,
    plots,
    predictions,


rule all:
    default_target: True
    input:
        all_targets(),
