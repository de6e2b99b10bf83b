# Training: accelerate launch of the ptm-mamba train command, one process per GPU, on one machine or
# (training.num_machines > 1) on several nodes of one SLURM job (ptm_mamba/launch.py).


rule train:
    input:
        splits=SPLIT_FILES,
        embeddings=lambda wildcards: embedding_files(wildcards.run),
    output:
        # the run's config, shown in the report as it is
        config=report(
            run_file("{run}", layout.CONFIG_FILE),
            caption="../report/config.rst",
            category="Configuration",
        ),
        mapping=run_file("{run}", layout.SPLIT_MAPPING),
        metrics=run_file("{run}", layout.METRICS_FILE),
        best=run_file("{run}", layout.BEST_CKPT),
        last=run_file("{run}", layout.LAST_CKPT),
        provenance=run_file("{run}", layout.PROVENANCE_FILE),
    log:
        train_log("{run}"),
    benchmark:
        "benchmarks/train/{run}.tsv"
    conda:
        ENV
    threads: 2
    resources:
        **{key: train_resource(key) for key in TRAIN_RESOURCES[RUN_NAME]},
    params:
        config=config_file,
        split_dir=lambda wildcards, input: os.path.dirname(input.splits[0]),
        run_name=lambda wildcards: wildcards.run,
        # how to start, not what results: a param function of `input` is no rerun trigger
        launch=lambda wildcards, input: LAUNCH[wildcards.run],
        # the run's settings (the top level, with a sweep's overrides of the run)
        settings=lambda wildcards: TRAIN_FINGERPRINT[wildcards.run],
    # the launcher shows training on the terminal (the SLURM job's output) and writes it to the log, and
    # every segment of a resumed run to logs/train/{run}.segments.log
    shell:
        "OMP_NUM_THREADS={threads} {params.launch} -m ptm_mamba train --config {params.config:q}"
        " --split_dir {params.split_dir:q} --run_name {params.run_name:q} --no_progress"
