rule split:
    input:
        config["dataset"]["dataset_location"],
    output:
        train=f"{SPLIT_DIR}/train.csv",
        val=f"{SPLIT_DIR}/val.csv",
        test=f"{SPLIT_DIR}/test.csv",
        mapping=f"{SPLIT_DIR}/split_mapping.json",
        summary=f"{SPLIT_DIR}/summary.json",
    params:
        config=RESOLVED_CONFIG,
        outdir=lambda wildcards, output: os.path.dirname(output.mapping),
        settings=fingerprint(config, "dataset"),
    log:
        "logs/split.log",
    conda:
        ENV
    shell:
        "ptm-mamba split --config {params.config} --output_dir {params.outdir} > {log} 2>&1"
