"""A bundle opened by the tools users already run, none written here (issue 10): transformers
4.x (as optimum-onnx pins it), optimum's ORTModelForCausalLM, onnxruntime-genai,
transformers.js in Node loading from the test Hub server, and `hf download` + AutoModel.

For a tiny Llama (preset), GPT-2 and Qwen2 (rope_theta 1e6, which transformers 4.x reads
wrong without the legacy field) each tool's greedy tokens must equal transformers 5's for
the fp32 and fp16 graphs, and its fp32 prompt logits must be within float32 rounding; int8
is compared with torch for the report only (random weights make int8 near-ties meaningless,
DESIGN.md §6) but must decode as exportline's own ONNX Runtime loop does. Run with -s for
the table.
The tools live in a cache outside the repository (tests/consumer_envs.py).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from exportline.exporters.core.bundle import Bundle
from exportline.exporters.core.consumer_files import present_graphs
from exportline.exporters.core.layout import GRAPHS
from exportline.exporters.core.pipeline import run_pipeline
from exportline.exporters.core.presets import config_dir, load_preset
from exportline.exporters.sources import resolve_source
from exportline.exporters.sources.preset.source import PresetSource
from exportline.exporters.stages import parse_stages

from consumer_envs import JS_VERSIONS, node_dir, v4_python
from deploy_bundle import exportline_cmd
from hub_server import HubServer

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent / "consumers"
STEPS = 16
TEXT = "The standard library modules are documented"
VOCAB = 512
_DECODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
_LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500_000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=64)
# Name → (model_type, HF config of a tiny model written with save_pretrained); None: the tiny preset.
MODELS: dict[str, tuple[str, dict] | None] = {
    "llama": None,
    "gpt2": ("gpt2", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256)),
    "qwen2": ("qwen2", dict(_DECODER, rope_theta=1_000_000.0)),  # 4.x falls back to 10000 without the legacy field
    "mistral": ("mistral", dict(_DECODER, rope_theta=1_000_000.0, sliding_window=256)),
    "phi3": ("phi3", dict(_DECODER)),
    "llama-rope3": ("llama", dict(_DECODER, rope_parameters=_LLAMA3_ROPE)),  # 4.x reads it from rope_scaling
}
BUNDLED = ("llama", "gpt2", "qwen2")  # every consumer runs on these (issue 10)
# fp32 graphs and torch differ by float32 rounding only (measured ≤ 1e-5 on these models).
FP32_MAX_ABS = 1e-4
ROWS: list[str] = []


def _write_tokenizer(folder: Path) -> None:
    """A byte-level BPE trained with `tokenizers` and saved the way transformers 5 saves one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(config_dir() / "corpus.txt")], trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(folder)


def _write_hf_folder(folder: Path, name: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    _write_tokenizer(folder)
    torch.manual_seed(0)
    model_type, kwargs = MODELS[name]
    config = AutoConfig.for_model(model_type, bos_token_id=1, eos_token_id=2, pad_token_id=3, **kwargs)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # non-trivial norms and biases, so a misread field shows in the logits
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)


def _build(root: Path, arch: str, stages: list[str]) -> Path:
    if MODELS[arch] is None:
        source = PresetSource(load_preset("tiny"))
    else:
        _write_hf_folder(root.parent / f"{arch}-src", arch)
        source = resolve_source(str(root.parent / f"{arch}-src"))
    run_pipeline(Bundle(root), source, stages=parse_stages(",".join(stages)))
    return root


def _reference(root: Path) -> dict:
    """transformers 5, fp32, from the bundle root: prompt ids, last-position logits, greedy tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(root)(TEXT)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        last = model(ids).logits[0, -1].numpy()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, do_sample=False)
    return {"prompt": prompt, "logits_last": last, "tokens": out[0, len(prompt):].tolist()}


def _own_onnxruntime_tokens(root: Path, prompt: list[int]) -> dict[str, list[int]]:
    """Greedy tokens of each graph run by exportline's own ONNX Runtime loop (verify/generate.py):
    what a consumer must reproduce for the int8 graph, whose tokens may differ from torch."""
    from transformers import AutoConfig

    from exportline.exporters.core.shapes import KVLayout
    from exportline.verify.generate import generate
    from exportline.verify.runtime.onnx_runner import OnnxRuntimeRunner

    config = AutoConfig.from_pretrained(root)
    out = {}
    for precision, graph in present_graphs(root).items():
        with OnnxRuntimeRunner(root / graph) as runner:
            out[precision] = generate(runner, [prompt], layout=KVLayout.from_config(config), max_new_tokens=STEPS,
                                      eos_token_id=config.eos_token_id).tokens[0]
    return out


@pytest.fixture(scope="module", params=BUNDLED)
def bundle(request, tmp_path_factory):
    root = _build(tmp_path_factory.mktemp(f"consumer-{request.param}") / request.param, request.param,
                  ["hf", "onnx", "fp16", "int8"])
    assert set(present_graphs(root)) == set(GRAPHS), "the int8 stage did not run (tokenizer missing?)"
    ref = _reference(root)
    ref["graph_tokens"] = _own_onnxruntime_tokens(root, ref["prompt"])
    assert ref["graph_tokens"]["fp32"] == ref["tokens"]  # our own loop agrees with transformers' generate
    return request.param, root, ref


def _record(tool: str, arch: str, precision: str, ref: dict, got: dict) -> tuple[float, bool]:
    delta = float(np.max(np.abs(np.asarray(got["logits_last"], dtype=np.float64) - ref["logits_last"])))
    same = list(got["tokens"]) == list(ref["tokens"])
    ROWS.append(f"{tool:<22} {arch:<6} {precision:<5} max|Δlogit| {delta:.2e}  tokens identical: {'y' if same else 'n'}")
    print(ROWS[-1])
    return delta, same


def _check(tool: str, arch: str, ref: dict, results: dict) -> None:
    """fp32 and fp16: tokens identical to transformers 5; fp32 logits within float32 rounding."""
    assert set(results) >= {"fp32"}, results.keys()
    failures = []
    for precision, got in results.items():
        delta, same = _record(tool, arch, precision, ref, got)
        if precision in ("fp32", "fp16") and not same:
            failures.append(f"{precision}: tokens {got['tokens']} != {ref['tokens']}")
        if precision == "fp32" and delta > FP32_MAX_ABS:
            failures.append(f"fp32: max|Δlogit| {delta:.2e} > {FP32_MAX_ABS}")
        if precision == "int8" and list(got["tokens"]) != ref["graph_tokens"]["int8"]:
            # vs torch the int8 numbers are reported only; the graph itself must run as in ONNX Runtime
            failures.append(f"int8: tokens {got['tokens']} != onnxruntime's {ref['graph_tokens']['int8']}")
    assert not failures, f"{tool} on {arch}: " + "; ".join(failures)


def _v4_tools(jobs: list[dict]) -> list[dict]:
    proc = subprocess.run([str(v4_python()), str(HERE / "v4_tools.py"), json.dumps(jobs)], capture_output=True,
                          text=True, timeout=600, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def v4_results(bundle):
    arch, root, ref = bundle
    graphs = {p: Path(g.path).name for p, g in GRAPHS.items()}
    job = {"root": str(root), "text": TEXT, "prompt": ref["prompt"], "steps": STEPS, "graphs": graphs,
           "tools": ["transformers", "optimum", "genai"]}
    return _v4_tools([job])[0]


def test_transformers4_loads_the_same_model(bundle, v4_results):
    arch, root, ref = bundle
    got = v4_results["transformers"]["fp32"]
    assert got["version"].startswith("4.")
    assert got["encoded"] == ref["prompt"]  # tokenizer_config.json loads in 4.x, same ids
    _check(f"transformers {got['version']}", arch, ref, {"fp32": got})


def test_optimum_ort_model(bundle, v4_results):
    arch, _, ref = bundle
    _check("optimum ORTModel", arch, ref, v4_results["optimum"])


def test_onnxruntime_genai(bundle, v4_results):
    arch, _, ref = bundle
    _check("onnxruntime-genai", arch, ref, v4_results["genai"])


@pytest.fixture(scope="module")
def pushed(bundle, tmp_path_factory):
    """The bundle pushed with `exportline push` to a Hub-compatible server that stays up."""
    arch, root, ref = bundle
    token = "hf_" + secrets.token_hex(20)
    home = tmp_path_factory.mktemp("hf_home")
    with HubServer({token: "tester"}) as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
        env.update(HF_ENDPOINT=server.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(home), HF_TOKEN=token,
                   HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1")
        repo = f"org/{arch}"
        proc = subprocess.run([*exportline_cmd(), "push", str(root), "--repo-id", repo], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        yield server, repo, env


@pytest.mark.parametrize("version", JS_VERSIONS)
def test_transformers_js_from_the_hub(bundle, pushed, tmp_path, version):
    arch, _, ref = bundle
    server, repo, _ = pushed
    folder = node_dir(version)
    script = folder / "exportline_consumer.mjs"  # beside node_modules, so the import resolves there
    shutil.copyfile(HERE / "transformers_js.mjs", script)
    args = {"host": server.url, "repo": repo, "cache_dir": str(tmp_path / "js-cache"), "prompt": ref["prompt"],
            "steps": STEPS, "dtypes": ["fp32", "fp16", "int8", None]}
    proc = subprocess.run(["node", str(script), json.dumps(args)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    served = {p for p in server.state.repo(repo).resolve("main").files}
    assert {"onnx/model.onnx_data", "onnx/model_fp16.onnx_data"} <= served  # what it had to fetch
    default = out["results"].pop("default")  # no dtype given: transformers.js_config's choice, the fp32 graph
    assert default == out["results"]["fp32"]
    _check(f"transformers.js {out['version']}", arch, ref, out["results"])


def test_hf_download_then_automodel(bundle, pushed, tmp_path):
    arch, _, ref = bundle
    _, repo, env = pushed
    hf = Path(exportline_cmd()[0]).with_name("hf")
    dest = tmp_path / "downloaded"
    proc = subprocess.run([str(hf), "download", repo, "--local-dir", str(dest)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = _reference(dest)
    assert got["prompt"] == ref["prompt"]
    _check("hf download+AutoModel", arch, ref, {"fp32": got})


# -- item 1 of issue 10 on every architecture (+ a rope_scaling model): 4.x reads what 5.x reads --
def test_transformers4_reads_every_architecture_like_5(tmp_path):
    roots = {arch: _build(tmp_path / arch, arch, ["hf"]) for arch in MODELS}
    refs = {arch: _reference(root) for arch, root in roots.items()}
    jobs = [{"root": str(root), "text": TEXT, "prompt": refs[arch]["prompt"], "steps": STEPS, "graphs": {},
             "tools": ["transformers"]} for arch, root in roots.items()]
    for arch, out in zip(roots, _v4_tools(jobs)):
        config = json.loads((roots[arch] / "config.json").read_text())
        assert config["architectures"], arch
        got = out["transformers"]["fp32"]
        assert got["encoded"] == refs[arch]["prompt"], arch
        _check(f"transformers {got['version']}", arch, refs[arch], {"fp32": got})


def test_onnxruntime_genai_runs_the_other_architectures(tmp_path):
    """Mistral and Phi-3 (the bundles above cover Llama, GPT-2, Qwen2): genai_config.json as
    written runs their fp32 and fp16 graphs with transformers' greedy tokens."""
    names = [name for name in MODELS if name not in BUNDLED and MODELS[name][0] in ("mistral", "phi3")]
    roots = {name: _build(tmp_path / name, name, ["hf", "onnx", "fp16"]) for name in names}
    refs = {name: _reference(root) for name, root in roots.items()}
    graphs = {p: Path(GRAPHS[p].path).name for p in ("fp32", "fp16")}
    jobs = [{"root": str(root), "prompt": refs[name]["prompt"], "steps": STEPS, "graphs": graphs, "tools": ["genai"]}
            for name, root in roots.items()]
    for name, out in zip(roots, _v4_tools(jobs)):
        _check("onnxruntime-genai", name, refs[name], out["genai"])
