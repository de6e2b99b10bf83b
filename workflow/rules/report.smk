# Report: the run at a glance, training curves, test accuracy per PTM type and data tables of the run,
# shown by
#   snakemake --report report.html
# (figures and tables from ptm_mamba/report.py; captions in workflow/report/). Snakemake's report shows
# PNG and HTML items inline and offers TSV and YAML items as downloads, so every table is written twice:
# as an HTML page to read in the report and as a TSV to download.

REPORT_DIR = str(layout.report_dir(RUN_NAME))


rule plots:
    input:
        metrics=f"{RUN_DIR}/metrics.json",
        provenance=f"{RUN_DIR}/provenance.json",
        config=f"{RUN_DIR}/config.yaml",
        summary=SPLIT_OUTPUTS["summary"],
        embeddings=embedding_files(),
    output:
        # Only when the embeddings are precomputed (else training runs ESM-2 on the fly or not at all).
        **(
            {
                "embeddings": report(
                    f"{REPORT_DIR}/embeddings.tsv",
                    caption="../report/embedding_stats.rst",
                    category="Data",
                ),
                "embeddings_html": report(
                    f"{REPORT_DIR}/embeddings.html",
                    caption="../report/embedding_stats_html.rst",
                    category="Data",
                ),
            }
            if PRECOMPUTED
            else {}
        ),
        # the first category of the report ("At a glance" sorts before the others)
        run_summary=report(
            f"{REPORT_DIR}/run_summary.html",
            caption="../report/run_summary.rst",
            category="At a glance",
        ),
        # the same rows, for the report's front page (workflow/report/workflow.rst)
        run_summary_tsv=f"{REPORT_DIR}/run_summary.tsv",
        loss=report(
            f"{REPORT_DIR}/loss.png", caption="../report/loss.rst", category="Training"
        ),
        accuracy=report(
            f"{REPORT_DIR}/accuracy.png",
            caption="../report/accuracy.rst",
            category="Training",
        ),
        learning_rate=report(
            f"{REPORT_DIR}/learning_rate.png",
            caption="../report/learning_rate.rst",
            category="Training",
        ),
        throughput=report(
            f"{REPORT_DIR}/throughput.png",
            caption="../report/throughput.rst",
            category="Training",
        ),
        test_ptm_accuracy=report(
            f"{REPORT_DIR}/test_ptm_accuracy.png",
            caption="../report/test_ptm_accuracy.rst",
            category="Test",
        ),
        test_results=report(
            f"{REPORT_DIR}/test_results.tsv",
            caption="../report/test_results.rst",
            category="Test",
        ),
        test_results_html=report(
            f"{REPORT_DIR}/test_results.html",
            caption="../report/test_results_html.rst",
            category="Test",
        ),
        splits=report(
            f"{REPORT_DIR}/splits.tsv", caption="../report/splits.rst", category="Data"
        ),
        splits_html=report(
            f"{REPORT_DIR}/splits.html",
            caption="../report/splits_html.rst",
            category="Data",
        ),
        provenance=report(
            f"{REPORT_DIR}/provenance.tsv",
            caption="../report/provenance.rst",
            category="Configuration",
        ),
        provenance_html=report(
            f"{REPORT_DIR}/provenance.html",
            caption="../report/provenance_html.rst",
            category="Configuration",
        ),
        # the run's config.yaml (train's report item, a download) as a page to read
        config_html=report(
            f"{REPORT_DIR}/config.html",
            caption="../report/config_html.rst",
            category="Configuration",
        ),
    log:
        f"logs/report/{RUN_NAME}-plots.log",
    conda:
        ENV
    params:
        outdir=lambda wildcards, output: os.path.dirname(output.loss),
        embeddings=lambda wildcards, input: (
            "--embeddings " + " ".join(shlex.quote(path) for path in input.embeddings)
            if input.embeddings
            else ""
        ),
    shell:
        "ptm-mamba plots --metrics {input.metrics:q} --summary {input.summary:q} {params.embeddings}"
        " --provenance {input.provenance:q} --config {input.config:q} --output_dir {params.outdir:q}"
        " > {log:q} 2>&1"
