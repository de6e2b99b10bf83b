# The split (ptm_mamba/split.py): dataset.split_by random, or cluster (whole clusters of the cluster rule).


rule split:
    input:
        unpack(split_input),
    output:
        **SPLIT_OUTPUTS,
    log:
        "logs/split.log",
    conda:
        ENV
    threads: 2
    params:
        config=config_file,
        outdir=lambda wildcards, output: os.path.dirname(output.mapping),
        clusters=clusters_option,
        settings=stage_fingerprint(SETTINGS, SPLIT),
    shell:
        "ptm-mamba split --config {params.config:q} --output_dir {params.outdir:q} {params.clusters}"
        " --threads {threads} > {log:q} 2>&1"
