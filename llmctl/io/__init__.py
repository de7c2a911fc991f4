"""Files on disk: safetensors weights, Hugging Face folders and ids, config.json mapping."""
