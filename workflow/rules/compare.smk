# A sweep's runs side by side (config `runs:`; a target of `all` only then): the metrics of each run,
# mean ± sd over the runs that differ only by seed, and the loss curves overlaid, with, where the
# workflow has the evaluate stage, each run's AUROC per PTM type and feature set. ptm_mamba/compare.py.

COMPARE_FILE = {key: str(path) for key, path in layout.compare_outputs().items()}


rule compare:
    input:
        metrics=[run_file(run, layout.METRICS_FILE) for run in RUNS],
        # each run's evaluation (ptm_sites.json), where the workflow has the evaluate stage
        evaluations=lambda wildcards: (
            [str(layout.evaluation_files(run)["ptm_sites.json"]) for run in RUNS]
            if hasattr(rules, "evaluate")
            else []
        ),
    output:
        tsv=report(
            COMPARE_FILE["compare.tsv"],
            caption="../report/compare.rst",
            category="Compare",
        ),
        html=report(
            COMPARE_FILE[layout.COMPARE_PAGE],
            caption="../report/compare_html.rst",
            category="Compare",
        ),
        curves=report(
            COMPARE_FILE["curves.png"],
            caption="../report/compare_curves.rst",
            category="Compare",
        ),
        json=COMPARE_FILE["compare.json"],
    log:
        "logs/report/compare.log",
    conda:
        ENV
    params:
        config=config_file,
        outdir=lambda wildcards, output: os.path.dirname(output.tsv),
        evaluations=lambda wildcards, input: (
            "--evaluations" if input.evaluations else ""
        ),
    shell:
        "ptm-mamba compare --config {params.config:q} --output_dir {params.outdir:q} {params.evaluations}"
        " > {log:q} 2>&1"
