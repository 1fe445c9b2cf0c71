# Alignment: SFT on the instruction data, DPO rollouts from the SFT model, then DPO.
# Training commands exec and tee ignores SIGTERM, as in pretrain.smk.


rule sft:
    input:
        init=model_folder("pretrain"),
        tokenizer=tokenizer_files(),
        train=split_files("sft", "train"),
        val=split_files("sft", "eval"),
    output:
        folder=model_folder("sft"),
        plot=report("results/sft/loss.png", category="Training", caption="../report/loss.rst"),
    params:
        launch=launcher("sft"),
        settings=json.dumps(config["sft"]),
        init=lambda w, input: folder(input.init),
        tokenizer=lambda w, input: folder(input.tokenizer),
        out=lambda w, output: folder([*output.folder, output.plot]),
        ckpt=lambda w, output: os.path.join(folder(output.folder), "_ckpt"),
        script=script_path("sft.py"),
    threads: workflow.cores
    resources:
        **training_resources("sft"),
    log:
        "results/logs/sft.log",
    benchmark:
        "results/benchmarks/sft.tsv"
    conda:
        "../../envs/zhlm.yaml"
    shell:
        "exec {params.launch} {params.script} --init {params.init:q} --tokenizer {params.tokenizer:q}"
        " --train {input.train:q} --val {input.val:q} --out {params.out:q} --ckpt {params.ckpt:q}"
        " --settings {params.settings:q}"
        " 2> >(trap '' TERM INT; exec tee {log} >&2)"


rule rollouts:
    input:
        model=model_folder("sft"),
        prompts=split_files("sft", "dpo_prompts"),
    output:
        pairs="results/rollouts/pairs.parquet",
        stats="results/rollouts/stats.json",
    params:
        model_dir=lambda w, input: os.path.dirname(input.model[0]),
        settings=config["rollouts"],
    threads: workflow.cores
    resources:
        gpu=gpus("rollouts"),
    log:
        "results/logs/rollouts.log",
    benchmark:
        "results/benchmarks/rollouts.tsv"
    conda:
        "../../envs/zhlm.yaml"
    script:
        "../scripts/rollouts.py"


rule dpo:
    input:
        sft=model_folder("sft"),
        tokenizer=tokenizer_files(),
        pairs=["results/rollouts/pairs.parquet"] + (split_files("dpo", "train") if sources_of("dpo") else []),
        eval_pairs=split_files("dpo", "eval") if sources_of("dpo") else [],
    output:
        folder=model_folder("dpo"),
        plot=report("results/dpo/loss.png", category="Training", caption="../report/loss.rst"),
    params:
        launch=launcher("dpo"),
        settings=json.dumps(config["dpo"]),
        sft=lambda w, input: folder(input.sft),
        tokenizer=lambda w, input: folder(input.tokenizer),
        out=lambda w, output: folder([*output.folder, output.plot]),
        ckpt=lambda w, output: os.path.join(folder(output.folder), "_ckpt"),
        script=script_path("dpo.py"),
    threads: workflow.cores
    resources:
        **training_resources("dpo"),
    log:
        "results/logs/dpo.log",
    benchmark:
        "results/benchmarks/dpo.tsv"
    conda:
        "../../envs/zhlm.yaml"
    shell:
        "exec {params.launch} {params.script} --sft {params.sft:q} --tokenizer {params.tokenizer:q}"
        " --pairs {input.pairs:q} --eval-pairs {input.eval_pairs:q} --out {params.out:q} --ckpt {params.ckpt:q}"
        " --settings {params.settings:q}"
        " 2> >(trap '' TERM INT; exec tee {log} >&2)"
