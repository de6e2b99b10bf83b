# Sequence clusters for dataset.split_by: cluster (MMseqs2; ptm_mamba/cluster.py). The split rule reads
# them; they are remade only when the data or dataset.cluster_identity / cluster_coverage change.

from ptm_mamba.stages import CLUSTER


rule cluster:
    input:
        SETTINGS.dataset.dataset_location,
    output:
        CLUSTERS_FILE,
    log:
        "logs/cluster.log",
    conda:
        ENV
    threads: 8
    params:
        config=config_file,
        settings=stage_fingerprint(SETTINGS, CLUSTER),
    shell:
        "ptm-mamba cluster --config {params.config:q} --output {output:q} --threads {threads} > {log:q} 2>&1"
