# PTM-Mamba training pipeline: [prepare ->] [cluster ->] split -> embed (ESM-2, sharded) -> train.
#   snakemake --cores all                      # run on this machine
#   snakemake --profile profiles/slurm         # run on a SLURM cluster
#   snakemake --report report.html             # HTML report of the last run
# Settings: config/config.yaml (schema: workflow/schemas/config.schema.yaml).

import time

from snakemake.utils import min_version

from ptm_mamba import summary
from ptm_mamba.compare import summary as sweep_summary

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
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/compare.smk"


# When the workflow ends: how the run did and where its outputs are, or each failed job's one-line error.
WORKFLOW_STARTED = time.time()


onsuccess:
    if SWEEP:  # each run and each seed group, from the compare step
        print(sweep_summary(COMPARE_FILE["compare.json"]))
    else:
        print(summary.run_summary(RUN_DIR, layout.report_dir(RUN_NAME)))


onerror:
    for line in summary.failed_job_errors("logs", WORKFLOW_STARTED):
        print(line, file=sys.stderr)


# Light rules run where Snakemake runs, not as cluster jobs.
localrules:
    all,
    embeddings,
    plots,
    predictions,
    evaluate,
    compare,


rule all:
    default_target: True
    input:
        all_targets(),
