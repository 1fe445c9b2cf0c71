# Fine-tune: a model folder (finetune.init: results/dpo, or any path) trained further, as SFT is,
# on sft sources of its own (finetune.sources, split as the kind "finetune"), tokenised with the
# folder's own tokenizer; with `lora`, merge_lora (align.smk) merges its adapter. Then the folder
# before and after on the finetune's held-out rows (beside jieba's tagger for entities) and on
# every other eval: what the finetune bought and what it cost.
# The training command execs and tee ignores SIGTERM, as in pretrain.smk.


rule tokenize_finetune:
    input:
        train=split_files("finetune", "train"),
        eval=split_files("finetune", "eval"),
        tokenizer=finetune_init_files(["tokenizer.json"])[0],
    output:
        conversation_files("results/tokens/finetune", "train", "eval", by_id=("eval",)),
    params:
        out=lambda w, output: folder(output),
        batch_size=config["binarize"]["batch_size"],
    log:
        "results/logs/tokens/tokenize_finetune.log",
    benchmark:
        "results/benchmarks/tokens/tokenize_finetune.tsv"
    conda:
        "../../envs/zhlm.yaml"
    script:
        "../scripts/tokenize_sft.py"


rule finetune:
    input:
        init=finetune_init_files(),
        tokens=rules.tokenize_finetune.output,
        # Pretraining text that pretrain_mix mixes in, as SFT's (config_errors: only for a folder of this run).
        pretrain_tokens=rules.sft.input.pretrain_tokens if config["finetune"]["pretrain_mix"] else [],
        # The sft stage's conversations that sft_mix mixes in, so the model keeps its tasks.
        sft_tokens=rules.tokenize_sft.output if config["finetune"]["sft_mix"] else [],
    output:
        folder=trained_files("finetune"),
        plot=report(f"{trained_dir('finetune')}/loss.png", category="Training", caption="../report/loss.rst"),
    params:
        launch=launcher("finetune"),
        settings=json.dumps(finetune_settings(config["finetune"])),
        init=lambda w, input: folder(input.init),
        tokens=lambda w, input: folder(input.tokens),
        mixed_in=lambda w, input: folder_options(pretrain_tokens=input.pretrain_tokens, sft_tokens=input.sft_tokens),
        out=lambda w, output: folder([*output.folder, output.plot]),
        ckpt=lambda w, output: os.path.join(folder(output.folder), "_ckpt"),
    threads: workflow.cores
    resources:
        **training_resources("finetune"),
    log:
        "results/logs/finetune.log",
    benchmark:
        "results/benchmarks/finetune.tsv"
    conda:
        "../../envs/zhlm.yaml"
    shell:
        'exec "$ZHLM_PYTHON" -m zhlm.train.launch {params.launch} "$ZHLM_SCRIPTS/sft.py"'
        " --init {params.init:q} --tokenizer {params.init:q}"
        " --tokens {params.tokens:q} {params.mixed_in} --out {params.out:q}"
        " --ckpt {params.ckpt:q} --settings {params.settings:q}"
        " 2> >(trap '' TERM INT; exec tee {log} >&2)"


rule eval_finetune:
    input:
        init=finetune_init_files(),
        model=model_folder("finetune"),
        finetune_tasks=split_files("finetune", "eval"),
        tasks=split_files("sft", "eval"),
        val=split_files("pretrain", "val"),
        choice=[f"results/clean/{s}.parquet" for s in sources_of("choice")],
    output:
        "results/eval/finetune.json",
    params:
        init_dir=lambda w, input: folder(input.init),
        model_dir=lambda w, input: folder(input.model),
        choice_heldout_only={s: SOURCES[s]["heldout_only"] for s in sources_of("choice")},
        holdout=config["split"]["holdout"],
        seq_len=config["pretrain"]["seq_len"],
        settings=config["eval"],
    threads: workflow.cores
    resources:
        gpu=gpus("eval"),
    log:
        "results/logs/eval/finetune.log",
    benchmark:
        "results/benchmarks/eval/finetune.tsv"
    conda:
        "../../envs/zhlm.yaml"
    script:
        "../scripts/eval_finetune.py"


rule report_finetune:
    input:
        results="results/eval/finetune.json",
        plot="results/finetune/loss.png",
    output:
        md=report("results/eval/finetune.md", category="Eval", caption="../report/eval.rst"),
    log:
        "results/logs/eval/report_finetune.log",
    benchmark:
        "results/benchmarks/eval/report_finetune.tsv"
    conda:
        "../../envs/zhlm.yaml"
    script:
        "../scripts/report_finetune.py"
