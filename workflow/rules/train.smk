# Training: accelerate launch of the ptm-mamba train command, one process per GPU.


rule train:
    input:
        splits=expand(f"{SPLIT_DIR}/{{split}}.csv", split=SPLITS),
        embeddings=embedding_files(),
    output:
        config=f"{RUN_DIR}/config.yaml",
        mapping=f"{RUN_DIR}/split_mapping.json",
        metrics=f"{RUN_DIR}/metrics.json",
        best=f"{RUN_DIR}/best.ckpt",
        last=f"{RUN_DIR}/last.ckpt",
    params:
        config=RESOLVED_CONFIG,
        split_dir=lambda wildcards, input: os.path.dirname(input.splits[0]),
        run_name=RUN_NAME,
        launch=LAUNCH,
        settings=fingerprint(config, *config),
    threads: 2
    resources:
        gpu=NUM_PROCESSES,
    log:
        f"logs/train/{RUN_NAME}.log",
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} {params.launch} -m ptm_mamba train --config {params.config}"
        " --split_dir {params.split_dir} --run_name {params.run_name} --no_progress > {log} 2>&1"
