"""The bundle's hubconf.py: torch.hub.load(DIR, "model", source="local") returns the bundle's model."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from exportline.deploy.prepare import prepare_bundle


def test_torch_hub_load_returns_the_bundle_weights(deploy_bundle):
    prepare_bundle(deploy_bundle)
    model = torch.hub.load(str(deploy_bundle), "model", source="local", trust_repo=True)
    tokenizer = torch.hub.load(str(deploy_bundle), "tokenizer", source="local", trust_repo=True)
    saved = load_file(deploy_bundle / "model.safetensors")
    state = model.state_dict()
    assert saved and all(torch.equal(state[k], v) for k, v in saved.items())
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer("hello").input_ids
    hubconf = (deploy_bundle / "hubconf.py").read_text()
    assert 'dependencies = ["torch", "transformers"]' in hubconf
