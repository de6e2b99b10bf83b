# ESM-2 embeddings: one job per shard of each split (scatter), then one gather per split, which
# copies the split's shards into {split}_embeddings.h5, a self-contained HDF5 file. The shards are
# temporary: Snakemake deletes them once their split is gathered (a deleted gathered file reruns
# its split's shards and gather). `snakemake embeddings` computes them (all splits) without training.


rule embeddings:
    input:
        embedding_files(),


rule embed_shard:
    input:
        split=str(layout.split_csv(SPLIT_DIR, "{split}")),
        split_unit=SPLIT_FILES,  # read together: the split is checked as one unit
    output:
        temp(str(layout.shard_path(EMBEDDINGS_DIR, "{split}", "{shard}", NUM_SHARDS))),
    log:
        f"logs/embed/{{split}}-{{shard}}-of-{NUM_SHARDS}.log",
    benchmark:
        f"benchmarks/embed/{{split}}-{{shard}}-of-{NUM_SHARDS}.tsv"
    conda:
        ENV
    threads: 2
    resources:
        gpu=1,
    params:
        config=config_file,
        num_shards=NUM_SHARDS,
        settings=stage_fingerprint(SETTINGS, EMBED),
    shell:
        "OMP_NUM_THREADS={threads} ptm-mamba embed-shard --config {params.config:q} --split {wildcards.split}"
        " --split_file {input.split:q} --shard {wildcards.shard} --num_shards {params.num_shards}"
        " --output {output:q} > {log:q} 2>&1"


# Reads and writes the whole split (a job of its own on a cluster, not a local rule); memory stays
# bounded (blocks of 64 MiB), the disk holds the split twice until the shards are deleted.
rule gather_embeddings:
    input:
        split=str(layout.split_csv(SPLIT_DIR, "{split}")),
        split_unit=SPLIT_FILES,
        shards=lambda wildcards: [
            str(layout.shard_path(EMBEDDINGS_DIR, wildcards.split, i, NUM_SHARDS))
            for i in range(NUM_SHARDS)
        ],
    output:
        str(layout.split_store_path(EMBEDDINGS_DIR, "{split}")),
    log:
        "logs/embed/{split}-gather.log",
    conda:
        ENV
    params:
        config=config_file,
        settings=stage_fingerprint(SETTINGS, EMBED),
    shell:
        "ptm-mamba gather --config {params.config:q} --split {wildcards.split} --split_file {input.split:q}"
        " --shards {input.shards:q} --output {output:q} > {log:q} 2>&1"
