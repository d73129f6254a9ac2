"""Training loops that wire the building blocks together: SFT (`sft`) and RLVR (`rl`) on ChunkFlow, sharing
optimizer, device and checkpoint/resume code (`state`)."""
