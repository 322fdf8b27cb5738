"""Policy models: the character tokenizer, the tiny default model, the RLModule wrapper."""
