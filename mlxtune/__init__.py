"""mlxtune: LoRA / DoRA / full fine-tuning on MLX as a pair of gRPC services.

The package holds the plain-Python core both services use; the gRPC layers
live in ``services/`` and the code generated from ``protos/`` in
``mlxtune/{common,peft,trainer}/v1`` (made by ``make proto``).
"""

__version__ = "0.1.0"
