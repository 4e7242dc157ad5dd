"""deploy: model card, Hub push/pull (checksummed), dataset push, torch.hub entry points, Triton handoff."""
