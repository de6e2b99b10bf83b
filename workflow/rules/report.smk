# Report: the run at a glance, training curves, test accuracy per PTM type and data tables of the run,
# shown by
#   snakemake --report report.html
# (figures and tables from ptm_mamba/report.py; captions in workflow/report/). Snakemake's report shows
# PNG and HTML items inline and offers TSV and YAML items as downloads, so every table is written twice:
# as an HTML page to read in the report and as a TSV to download.

# The report folder's files by key (layout.report_files): a figure's PNG, a table's TSV, its _html page.
REPORT_FILE = {
    key: str(path)
    for key, path in layout.report_files(layout.report_dir(RUN_NAME)).items()
}


rule plots:
    input:
        metrics=RUN_FILE[layout.METRICS_FILE],
        provenance=RUN_FILE[layout.PROVENANCE_FILE],
        config=RUN_FILE[layout.CONFIG_FILE],
        summary=SPLIT_OUTPUTS["summary"],
        embeddings=embedding_files(),
    output:
        # Only when the embeddings are precomputed (else training runs ESM-2 on the fly or not at all).
        **(
            {
                "embeddings": report(
                    REPORT_FILE["embeddings"],
                    caption="../report/embedding_stats.rst",
                    category="Data",
                ),
                "embeddings_html": report(
                    REPORT_FILE["embeddings_html"],
                    caption="../report/embedding_stats_html.rst",
                    category="Data",
                ),
            }
            if PRECOMPUTED
            else {}
        ),
        # the first category of the report ("At a glance" sorts before the others)
        run_summary_html=report(
            REPORT_FILE["run_summary_html"],
            caption="../report/run_summary.rst",
            category="At a glance",
        ),
        # the same rows, for the report's front page (workflow/report/workflow.rst)
        run_summary=REPORT_FILE["run_summary"],
        loss=report(
            REPORT_FILE["loss"], caption="../report/loss.rst", category="Training"
        ),
        accuracy=report(
            REPORT_FILE["accuracy"],
            caption="../report/accuracy.rst",
            category="Training",
        ),
        learning_rate=report(
            REPORT_FILE["learning_rate"],
            caption="../report/learning_rate.rst",
            category="Training",
        ),
        throughput=report(
            REPORT_FILE["throughput"],
            caption="../report/throughput.rst",
            category="Training",
        ),
        test_ptm_accuracy=report(
            REPORT_FILE["test_ptm_accuracy"],
            caption="../report/test_ptm_accuracy.rst",
            category="Test",
        ),
        test_results=report(
            REPORT_FILE["test_results"],
            caption="../report/test_results.rst",
            category="Test",
        ),
        test_results_html=report(
            REPORT_FILE["test_results_html"],
            caption="../report/test_results_html.rst",
            category="Test",
        ),
        splits=report(
            REPORT_FILE["splits"], caption="../report/splits.rst", category="Data"
        ),
        splits_html=report(
            REPORT_FILE["splits_html"],
            caption="../report/splits_html.rst",
            category="Data",
        ),
        provenance=report(
            REPORT_FILE["provenance"],
            caption="../report/provenance.rst",
            category="Configuration",
        ),
        provenance_html=report(
            REPORT_FILE["provenance_html"],
            caption="../report/provenance_html.rst",
            category="Configuration",
        ),
        # the run's config.yaml (train's report item, a download) as a page to read
        config_html=report(
            REPORT_FILE["config_html"],
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
