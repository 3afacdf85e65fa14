"""Training across workers: data parallel (DDP, FSDP2), pipeline model parallel, async parameter server."""
