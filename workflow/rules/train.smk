# Training: accelerate launch of the ptm-mamba train command, one process per GPU, on one machine or
# (training.num_machines > 1) on several nodes of one SLURM job (ptm_mamba/launch.py).


rule train:
    input:
        splits=SPLIT_FILES,
        embeddings=embedding_files(),
    output:
        # the run's config, shown in the report as it is
        config=report(
            RUN_FILE[layout.CONFIG_FILE],
            caption="../report/config.rst",
            category="Configuration",
        ),
        mapping=RUN_FILE[layout.SPLIT_MAPPING],
        metrics=RUN_FILE[layout.METRICS_FILE],
        best=RUN_FILE[layout.BEST_CKPT],
        last=RUN_FILE[layout.LAST_CKPT],
        provenance=RUN_FILE[layout.PROVENANCE_FILE],
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
        settings=stage_fingerprint(SETTINGS, TRAIN),
    # the launcher shows training on the terminal (the SLURM job's output) and writes it to the log, and
    # every segment of a resumed run to logs/train/{run_name}.segments.log
    shell:
        "OMP_NUM_THREADS={threads} {params.launch} -m ptm_mamba train --config {params.config:q}"
        " --split_dir {params.split_dir:q} --run_name {params.run_name:q} --no_progress"
