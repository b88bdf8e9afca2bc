"""Adapters and models: builds the chat dataset, fine-tunes (Q)LoRA adapters with
transformers + peft, evaluates and publishes them to every worker, exports GGUF for
llama.cpp and the phone, and builds the small demo model for tests and `make run`."""
