"""Self-speculative decoding (`policy="self_spec"`): the batched engine on the shared runner, its
device programs, its costs, and the one-request reference it equals."""
