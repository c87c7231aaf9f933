"""Models: loading local Hugging Face models and adapters (the default SmolLM2), tiny test models,
and the fine-tuning helper that makes the models the studies attribute."""
