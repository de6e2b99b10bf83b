# The split (ptm_mamba/split.py): dataset.split_by random, or cluster (whole clusters of the cluster rule).


rule split:
    input:
        unpack(split_input),
    output:
        train=f"{SPLIT_DIR}/train.csv",
        val=f"{SPLIT_DIR}/val.csv",
        test=f"{SPLIT_DIR}/test.csv",
        mapping=f"{SPLIT_DIR}/split_mapping.json",
        summary=f"{SPLIT_DIR}/summary.json",
    log:
        "logs/split.log",
    conda:
        ENV
    threads: 2
    params:
        config=config_file,
        outdir=lambda wildcards, output: os.path.dirname(output.mapping),
        clusters=clusters_option,
        settings=stage_fingerprint(config, SPLIT),
    shell:
        "ptm-mamba split --config {params.config:q} --output_dir {params.outdir:q} {params.clusters}"
        " --threads {threads} > {log:q} 2>&1"
