"""Data: WebDataset shard writer/verifier (`shards`), split manifests (`manifest`), the per-epoch plan
(`plan`) and the streaming loader (`loader`)."""
