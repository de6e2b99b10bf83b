# Training: accelerate launch of the ptm-mamba train command, one process per GPU, on one machine or
# (training.num_machines > 1) on several nodes of one SLURM job (ptm_mamba/launch.py).


rule train:
    input:
        splits=SPLIT_FILES,
        embeddings=embedding_files(),
    output:
        # the run's config, shown in the report as it is
        config=report(
            f"{RUN_DIR}/config.yaml",
            caption="../report/config.rst",
            category="Configuration",
        ),
        mapping=f"{RUN_DIR}/split_mapping.json",
        metrics=f"{RUN_DIR}/metrics.json",
        best=f"{RUN_DIR}/best.ckpt",
        last=f"{RUN_DIR}/last.ckpt",
        provenance=f"{RUN_DIR}/provenance.json",
    log:
        TRAIN_LOG,
    benchmark:
        f"benchmarks/train/{RUN_NAME}.tsv"
    conda:
        ENV
    threads: 2
    resources:
        **TRAIN_RESOURCES,
    params:
        config=config_file,
        split_dir=lambda wildcards, input: os.path.dirname(input.splits[0]),
        run_name=RUN_NAME,
        # how to start, not what results: a param function of `input` is no rerun trigger
        launch=lambda wildcards, input: LAUNCH,
        settings=stage_fingerprint(config, TRAIN),
    # the launcher shows training on the terminal (the SLURM job's output) and writes it to the log, and
    # every segment of a resumed run to logs/train/{run_name}.segments.log
    shell:
        "OMP_NUM_THREADS={threads} {params.launch} -m ptm_mamba train --config {params.config:q}"
        " --split_dir {params.split_dir:q} --run_name {params.run_name:q} --no_progress"
