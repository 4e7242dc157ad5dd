"""Test models for the fp16/int8 tests: a tiny Llama trained for seconds on configs/corpus.txt.

int8 perplexity is meaningless on random weights (DESIGN.md §8), so the accuracy test
trains one: BPE tokenizer of the tiny preset (trained on the corpus), ~160k parameters,
a few hundred AdamW steps on the calibration chunks only; the held-out chunks of
exporters/calibration.py are never seen in training or calibration.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=False,
)


def write_tokenizer(dest: Path):
    from transformers import AutoTokenizer

    from exportline.exporters.sources.tokenizer import train_bpe

    train_bpe(TINY["vocab_size"], dest, model_max_length=TINY["max_position_embeddings"])
    return AutoTokenizer.from_pretrained(dest)


def train_tiny_llama(
    dest: Path, *, steps: int = 500, batch: int = 16, window: int = 64, lr: float = 1e-2, seed: int = 0
) -> dict:
    """Train and save an HF folder (config, safetensors, tokenizer) at `dest`; returns facts
    including the training loss and the torch perplexity on the held-out chunks."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from exportline.exporters.precision.calibration import split_text
    from exportline.exporters.sources.tokenizer import default_corpus

    dest.mkdir(parents=True, exist_ok=True)
    tok = write_tokenizer(dest)
    split = split_text(default_corpus(), tok, max_positions=TINY["max_position_embeddings"])
    data = torch.tensor(split.calibration, dtype=torch.long)
    torch.manual_seed(seed)
    config = LlamaConfig(**TINY, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    start, loss = time.perf_counter(), float("nan")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds waiting (10x slower on a busy machine)
    model.train()
    for _ in range(steps):  # random `window`-token slices of calibration chunks
        rows = data[torch.randint(0, len(data), (batch,), generator=gen)]
        offset = int(torch.randint(0, data.shape[1] - window + 1, (1,), generator=gen))
        rows = rows[:, offset : offset + window]
        out = model(input_ids=rows, labels=rows)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss = out.loss.item()
    torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(dest)
    facts = {
        "steps": steps, "train_seconds": round(time.perf_counter() - start, 1), "final_train_loss": loss,
        "parameters": sum(p.numel() for p in model.parameters()),
        "heldout_ppl_torch": heldout_ppl(model, split.heldout),
    }
    (dest / "training.json").write_text(json.dumps(facts, indent=2))
    return facts


def heldout_ppl(model, chunks) -> float:
    import math

    import torch

    with torch.inference_mode():
        ids = torch.tensor(chunks[:16], dtype=torch.long)
        return math.exp(float(model(input_ids=ids, labels=ids).loss))


class FolderSource:
    """An HF folder the test already wrote at the bundle root (the sources helper adds the
    real HF-folder source; until then the tests run stages onnx,fp16,int8 on it)."""

    def __init__(self, name: str, tag: str):
        self.name, self.tag = name, tag

    def describe(self) -> dict:
        return {"kind": "hf-folder (test)", "labels": []}

    def fingerprint(self) -> str:
        return self.tag


def export_bundle(root: Path, source, stages: list[str], **options):
    from exportline.exporters.core.bundle import Bundle
    from exportline.exporters.core.pipeline import ExportOptions, run_pipeline
    from exportline.exporters.stages import STAGES

    return run_pipeline(Bundle(root), source, stages=[STAGES[s] for s in stages], options=ExportOptions(**options))


def stage_info(root: Path, stage: str) -> dict:
    return json.loads((root / "manifest.json").read_text())["stages"][stage]


def write_tiny_gpt2(dest: Path) -> None:
    """A random GPT-2 (fused LayerNormalization, Gemm weights) with non-trivial norm
    parameters, so a SmoothQuant fold into scale/bias that went wrong would show."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(dest)


class WholeGraphReader:
    """The whole fp32 graph in ONE onnxruntime session over KVCalibrationFeeds.plan() — the
    reference the int8 stage's segmented statistics are tested against, and an onnxruntime
    CalibrationDataReader (get_next), so its own calibrators can be run on the same feeds.
    `observe=(names, callback)`: the model has these extra outputs, whose values for every
    feed go to `callback`; `level`: onnxruntime GraphOptimizationLevel (None: its default)."""

    def __init__(self, model_path, chunks, layout, *, observe=None, level=None):
        from exportline.exporters.precision.kv_calibration import KVCalibrationFeeds

        self.model_path, self.layout, self.observe, self.level = model_path, layout, observe, level
        self.plan = KVCalibrationFeeds(chunks, layout)
        self.feeds = 0
        self._it = None

    def get_next(self):
        if self._it is None:
            self._it = self._generate()
        return next(self._it, None)

    def drain(self) -> None:
        for _ in self._generate():
            pass

    def _generate(self):
        import onnxruntime as ort

        from exportline.exporters.precision.segmented_stats import Recurrent

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.level is not None:
            opts.graph_optimization_level = self.level
        session = ort.InferenceSession(str(self.model_path), opts, providers=["CPUExecutionProvider"])
        presents = self.layout.present_names()
        observed, callback = self.observe or ([], None)
        feeds, past = self.plan.plan(), {}
        for k, planned in enumerate(feeds):
            feed = {n: past[n] if isinstance(v, Recurrent) else v for n, v in planned.items()}
            self.feeds += 1
            yield feed
            following = feeds[k + 1] if k + 1 < len(feeds) else None
            recurs = following is not None and any(isinstance(v, Recurrent) for v in following.values())
            if recurs or callback:  # the next step's past, and what is observed
                values = session.run(presents + observed, feed)
                past = dict(zip(self.layout.past_names(), values))
                if callback:
                    callback(values[len(presents):])
