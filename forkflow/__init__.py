"""forkflow: RLVR for Qwen3 on high-entropy forking tokens, trained with ChunkFlow."""
