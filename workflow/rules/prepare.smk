# The dataset CSV from a raw source (dataset.source: a UniProtKB TSV export or the original PTM-Mamba's
# per-site table; ptm_mamba/prepare.py). Without a source, dataset.dataset_location is the CSV itself.

from ptm_mamba.prepare import check_output_path
from ptm_mamba.stages import PREPARE

SOURCE = SETTINGS.dataset.source

if SOURCE is not None:
    try:  # never make a rule whose output is a CSV the prepare stage did not write (datasets/demo.csv)
        check_output_path(SETTINGS.dataset.dataset_location)
    except PipelineError as err:
        refuse(err)

    rule prepare:
        input:
            SOURCE.path,
        output:
            csv=SETTINGS.dataset.dataset_location,
            summary=str(layout.prepared_summary_path(SETTINGS.dataset.dataset_location)),
        log:
            "logs/prepare.log",
        conda:
            ENV
        params:
            format=SOURCE.format,
            settings=stage_fingerprint(SETTINGS, PREPARE),
        shell:
            "ptm-mamba prepare --format {params.format} --input {input:q} --output {output.csv:q} > {log:q} 2>&1"
