# The evaluate stage (ptm_mamba/evaluate.py): PTM-site prediction on the test split with each run's
# best.ckpt, by linear probes on its final hidden states, on its ESM-2 alone and on a one-hot window;
# AUROC and AUPRC with bootstrap intervals per PTM type (config `evaluate:`). Part of the default target;
#   snakemake --cores all evaluate
# alone writes results/evaluate/{run}/ptm_sites.{tsv,json,png} (and ptm_sites.html, the report's page).

from ptm_mamba.stages import EVALUATE

# A run's evaluation files by name (layout.evaluation_outputs), as patterns of {run}.
EVALUATION_FILE = {
    name: str(path)
    for name, path in layout.evaluation_outputs(layout.evaluation_dir("{run}")).items()
}
TSV, JSON, PNG = layout.EVALUATION_FILES
# In the report: with several runs, a subcategory per run.
EVALUATION_REPORT = dict(
    category="Evaluation", subcategory="{run}" if len(RUNS) > 1 else None
)


rule evaluate:
    input:
        [
            str(path)
            for run in RUNS
            for path in layout.evaluation_outputs(layout.evaluation_dir(run)).values()
        ],


rule evaluate_run:
    input:
        **({"clusters": CLUSTERS_FILE} if BY_CLUSTER else {}),
        checkpoint=run_file("{run}", layout.BEST_CKPT),
        mapping=run_file("{run}", layout.SPLIT_MAPPING),
        splits=SPLIT_FILES,
    output:
        tsv=report(
            EVALUATION_FILE[TSV],
            caption="../report/ptm_sites_tsv.rst",
            **EVALUATION_REPORT,
        ),
        json=EVALUATION_FILE[JSON],
        png=report(
            EVALUATION_FILE[PNG],
            caption="../report/ptm_sites.rst",
            **EVALUATION_REPORT,
        ),
        html=report(
            EVALUATION_FILE[layout.EVALUATION_PAGE],
            caption="../report/ptm_sites_html.rst",
            **EVALUATION_REPORT,
        ),
    log:
        "logs/evaluate/{run}.log",
    benchmark:
        "benchmarks/evaluate/{run}.tsv"
    conda:
        ENV
    threads: 2
    params:
        config=config_file,
        run_name=lambda wildcards: wildcards.run,
        split_dir=lambda wildcards, input: os.path.dirname(input.splits[0]),
        clusters=clusters_option,
        outdir=lambda wildcards, output: os.path.dirname(output.tsv),
        # the run's settings (the top level, with a sweep's overrides of the run)
        settings=lambda wildcards: stage_fingerprint(
            RUN_SETTINGS[wildcards.run], EVALUATE
        ),
    shell:
        "OMP_NUM_THREADS={threads} ptm-mamba evaluate --config {params.config:q} --run_name {params.run_name:q}"
        " --split_dir {params.split_dir:q} {params.clusters} --output_dir {params.outdir:q} --no_progress"
        " > {log:q} 2>&1"
