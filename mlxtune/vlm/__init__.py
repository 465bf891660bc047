"""Vision-language models: mlx-vlm's model classes and processors behind the
same services, adapters and training loop as text models."""
