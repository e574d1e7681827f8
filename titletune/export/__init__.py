"""Phase 4, shipping the model: the merged Hugging Face folder and its parity gate (export)."""
