"""From prepared requests to generated text: the batching queue and the transformers runtime."""
