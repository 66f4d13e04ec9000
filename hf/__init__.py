"""The Hugging Face layout: config.json, safetensors parameters and tokenizer files, to and from this project's models."""
