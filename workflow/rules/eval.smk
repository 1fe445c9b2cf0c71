# Eval: each stage's model on held-out data, then one report.


rule eval_stage:
    input:
        unpack(eval_inputs),
    output:
        "results/eval/{stage}.json",
    wildcard_constraints:
        stage="pretrain|sft|dpo",
    params:
        model_dir=lambda w, input: os.path.dirname(input.model[0]),
        choice_heldout_only={s: SOURCES[s]["heldout_only"] for s in sources_of("choice")},
        holdout=config["split"]["holdout"],
        seq_len=config["pretrain"]["seq_len"],
        settings=config["eval"],
        # DPO's reference (the SFT model) and the DPO settings the pairs are scored with.
        reference_dir=lambda w, input: folder(input.reference) if input.get("reference") else None,
        dpo_settings=lambda w: {k: config["dpo"][k] for k in ("beta", "seq_len")} if w.stage != "pretrain" else {},
    threads: workflow.cores
    resources:
        gpu=gpus("eval"),
    log:
        "results/logs/eval/{stage}.log",
    benchmark:
        "results/benchmarks/eval/{stage}.tsv"
    conda:
        "../../envs/zhlm.yaml"
    script:
        "../scripts/eval.py"


# The final model answers held-out questions with and without passages of a source's texts in its
# prompt (zhlm.eval.retrieval), where the config names the source (retrieval.docs).
if config["retrieval"]["docs"]:

    rule eval_retrieval:
        input:
            model=model_folder("dpo"),
            docs=clean_shards(config["retrieval"]["docs"]),
            tasks=split_files("sft", "eval"),
        output:
            "results/eval/retrieval.json",
        params:
            model_dir=lambda w, input: folder(input.model),
            settings=config["retrieval"],
            eval_settings={k: config["eval"][k] for k in ("max_task_items", "max_new_tokens", "batch_size", "device")},
        threads: workflow.cores
        resources:
            gpu=gpus("eval"),
        log:
            "results/logs/eval/retrieval.log",
        benchmark:
            "results/benchmarks/eval/retrieval.tsv"
        conda:
            "../../envs/zhlm.yaml"
        script:
            "../scripts/eval_retrieval.py"


rule report:
    input:
        results=expand("results/eval/{stage}.json", stage=["pretrain", "sft", "dpo"]),
        plots=expand("results/{stage}/loss.png", stage=["pretrain", "sft", "dpo"]),
        retrieval=["results/eval/retrieval.json"] if config["retrieval"]["docs"] else [],
    output:
        md=report("results/eval/report.md", category="Eval", caption="../report/eval.rst"),
        summary="results/eval/summary.json",
    log:
        "results/logs/eval/report.log",
    benchmark:
        "results/benchmarks/eval/report.tsv"
    conda:
        "../../envs/zhlm.yaml"
    script:
        "../scripts/report.py"
