# Training: accelerate launch of the ptm-mamba train command, one process per GPU.


rule train:
    input:
        splits=SPLIT_FILES,
        embeddings=embedding_files(),
    output:
        config=f"{RUN_DIR}/config.yaml",
        mapping=f"{RUN_DIR}/split_mapping.json",
        metrics=f"{RUN_DIR}/metrics.json",
        best=f"{RUN_DIR}/best.ckpt",
        last=f"{RUN_DIR}/last.ckpt",
    params:
        split_dir=lambda wildcards, input: os.path.dirname(input.splits[0]),
        run_name=RUN_NAME,
        launch=LAUNCH,
        settings=stage_fingerprint(config, TRAIN),
    threads: 2
    resources:
        gpu=NUM_PROCESSES,
    log:
        f"logs/train/{RUN_NAME}.log",
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} {params.launch} -m ptm_mamba train --config {CONFIG_FILE:q}"
        " --split_dir {params.split_dir:q} --run_name {params.run_name:q} --no_progress > {log:q} 2>&1"
