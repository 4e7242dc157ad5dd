"""Runs in the cached transformers-4.x venv (tests/consumer_envs.py): loads a bundle with
transformers 4.x, optimum-onnx's ORTModelForCausalLM and onnxruntime-genai, and prints one
JSON line: per job, tool and graph, the logits of the prompt's last position and greedy
tokens (up to and including EOS). Usage: python v4_tools.py '[{"root": ..., "text": ...,
"prompt": [...], "steps": N, "graphs": {"fp32": "model.onnx", ...}, "tools": [...]}, ...]'
(tools: "transformers", "optimum", "genai")."""

import json
import sys

import numpy as np
import torch


def transformers_4(root, prompt, steps, text):
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    encoded = AutoTokenizer.from_pretrained(root)(text)["input_ids"] if text is not None else None
    model = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        last = model(ids).logits[0, -1]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False)
    return {"logits_last": last.tolist(), "tokens": out[0, len(prompt):].tolist(),
            "encoded": encoded, "version": transformers.__version__}


def optimum(root, prompt, steps, file_name):
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(root, subfolder="onnx", file_name=file_name)
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    last = model(input_ids=ids, attention_mask=mask).logits[0, -1].float()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False)
    return {"logits_last": last.tolist(), "tokens": out[0, len(prompt):].tolist()}


def genai(root, prompt, steps, file_name):
    import onnxruntime_genai as og

    config = og.Config(root)
    config.overlay(json.dumps({"model": {"decoder": {"filename": f"onnx/{file_name}"}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + steps, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    last = np.asarray(generator.get_logits(), dtype=np.float32).reshape(-1)
    tokens = []
    while not generator.is_done():  # get_sequence leaves a final EOS out; the token picked does not
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return {"logits_last": last.tolist(), "tokens": tokens}


def run_job(job):
    root, prompt, steps = job["root"], job["prompt"], job["steps"]
    out = {}
    for tool in job["tools"]:
        if tool == "transformers":
            out[tool] = {"fp32": transformers_4(root, prompt, steps, job.get("text"))}
        else:
            run = {"optimum": optimum, "genai": genai}[tool]
            out[tool] = {p: run(root, prompt, steps, f) for p, f in job["graphs"].items()}
    return out


def main():
    print(json.dumps([run_job(job) for job in json.loads(sys.argv[1])]))


if __name__ == "__main__":
    main()
