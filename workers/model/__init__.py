"""The model: config, the Llama-family decoder, loaders (HF folder, GGUF), tokenizer and detokenizer."""
