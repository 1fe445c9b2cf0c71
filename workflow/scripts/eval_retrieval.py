"""Score the final model's answers to held-out questions with and without retrieval."""
from zhlm.eval.retrieval import evaluate_retrieval, source_documents
from zhlm.inference import load
from zhlm.io import read_parquets, setup_logging, write_json

log = setup_logging(snakemake.log[0])
p, inputs = snakemake.params, snakemake.input
lm = load(p.model_dir, p.eval_settings["device"])
result = evaluate_retrieval(
    lm.model, lm.tokenizer, source_documents(inputs.docs), read_parquets(inputs.tasks).to_pylist(),
    task=p.settings["task"], top_k=p.settings["top_k"], max_items=p.eval_settings["max_task_items"],
    max_new_tokens=p.eval_settings["max_new_tokens"], batch_size=p.eval_settings["batch_size"])
write_json({"model": p.model_dir, "source": p.settings["docs"], **result}, snakemake.output[0])
log.info("retrieval: recall@1 %s, char F1 without %s, with %s", result["recall@1"], result["char_f1"]["without"],
         result["char_f1"]["with"])
