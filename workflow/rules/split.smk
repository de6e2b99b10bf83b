
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
        outdir=lambda wildcards, output: os.path.dirname(output.mapping),
        settings=stage_fingerprint(config, SPLIT),
    log:
        "logs/split.log",
    conda:
        ENV
    shell:
        "ptm-mamba split --config {CONFIG_FILE:q} --output_dir {params.outdir:q} > {log:q} 2>&1"
