"""Phase 2, fine-tuning: the SFTConfig and LoRA (sft), batching, attention kernels, resuming,
early stopping, the loss log, the torchrun launch and throughput (stage train)."""
