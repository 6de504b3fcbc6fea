"""Data: WebDataset shard writer/verifier (`shards`) and the streaming loader (`loader`)."""
