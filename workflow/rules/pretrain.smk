# Pretraining: a fresh decoder on the token files. Runs under torchrun when pretrain.nproc > 1.
#
# Training commands replace the job's shell (exec), so a SIGTERM from SLURM reaches the
# training loop itself, which checkpoints; tee ignores SIGTERM and SIGINT so that the log
# and the terminal still get the loop's last lines.


rule pretrain:
    input:
        train="results/tokens/train.bin",
        val="results/tokens/val.bin",
        meta="results/tokens/meta.json",
        tokenizer=tokenizer_files(),
    output:
        folder=model_folder("pretrain"),
        plot=report("results/pretrain/loss.png", category="Training", caption="../report/loss.rst"),
    params:
        launch=launcher("pretrain"),
        model=json.dumps(config["model"]),
        settings=json.dumps(config["pretrain"]),
        tokens=lambda w, input: folder([input.train, input.val, input.meta]),
        tokenizer=lambda w, input: folder(input.tokenizer),
        out=lambda w, output: folder([*output.folder, output.plot]),
        # Resumable checkpoints: a scratch folder, not an output (Snakemake deletes outputs first).
        ckpt=lambda w, output: os.path.join(folder(output.folder), "_ckpt"),
    threads: workflow.cores
    resources:
        **training_resources("pretrain"),
    log:
        "results/logs/pretrain.log",
    benchmark:
        "results/benchmarks/pretrain.tsv"
    conda:
        "../../envs/zhlm.yaml"
    shell:
        'exec "$ZHLM_PYTHON" -m zhlm.train.launch {params.launch} "$ZHLM_SCRIPTS/pretrain.py"'
        " --tokens {params.tokens:q} --tokenizer {params.tokenizer:q}"
        " --out {params.out:q} --ckpt {params.ckpt:q} --model {params.model:q} --settings {params.settings:q}"
        " 2> >(trap '' TERM INT; exec tee {log} >&2)"
