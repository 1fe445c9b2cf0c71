# Export: the final model as one GGUF file for llama.cpp, ollama and LM Studio, with an ollama
# Modelfile beside it (`ollama create zhlm -f results/dpo/Modelfile`).


rule export_gguf:
    input:
        model_folder("dpo"),
    output:
        gguf="results/dpo/model.gguf",
        modelfile="results/dpo/Modelfile",
    params:
        model_dir=lambda w, input: folder(input),
        dtype=config["export"]["dtype"],
    log:
        "results/logs/export_gguf.log",
    benchmark:
        "results/benchmarks/export_gguf.tsv"
    conda:
        "../../envs/zhlm.yaml"
    script:
        "../scripts/export_gguf.py"
