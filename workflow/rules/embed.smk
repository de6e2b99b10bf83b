# ESM-2 embeddings: one job per shard of each split (scatter), then one gather per split.
# `snakemake embeddings` computes them (all splits) without training.


rule embeddings:
    input:
        shard_files(),
        embedding_files(),


rule embed_shard:
    input:
        split=f"{SPLIT_DIR}/{{split}}.csv",
        split_unit=SPLIT_FILES,  # read together: the split is checked as one unit
    output:
        f"{EMBEDDINGS_DIR}/shards/{{split}}/{{shard}}-of-{NUM_SHARDS}.h5",
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
        settings=stage_fingerprint(config, EMBED),
    shell:
        "OMP_NUM_THREADS={threads} ptm-mamba embed-shard --config {params.config:q} --split {wildcards.split}"
        " --split_file {input.split:q} --shard {wildcards.shard} --num_shards {params.num_shards}"
        " --output {output:q} > {log:q} 2>&1"


rule gather_embeddings:
    input:
        split=f"{SPLIT_DIR}/{{split}}.csv",
        split_unit=SPLIT_FILES,
        shards=expand(
            f"{EMBEDDINGS_DIR}/shards/{{{{split}}}}/{{shard}}-of-{NUM_SHARDS}.h5",
            shard=range(NUM_SHARDS),
        ),
    output:
        f"{EMBEDDINGS_DIR}/{{split}}_embeddings.h5",
    log:
        "logs/embed/{split}-gather.log",
    conda:
        ENV
    params:
        config=config_file,
        settings=stage_fingerprint(config, EMBED),
    shell:
        "ptm-mamba gather --config {params.config:q} --split {wildcards.split} --split_file {input.split:q}"
        " --shards {input.shards:q} --output {output:q} > {log:q} 2>&1"
