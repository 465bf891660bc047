"""Python client of mlxtune's PEFT and trainer services.

    from mlxtune_client import MlxtuneClient

    with MlxtuneClient("localhost:50051", "localhost:50052") as client:
        checkpoint = client.prepare("my-model", rank=8).checkpoint
        dataset = client.upload_dataset("train.jsonl")
        for event in client.train(checkpoint.name, dataset.name, config={"max_steps": 50}):
            print(event)
"""

from mlxtune_client.client import (
    DEFAULT_PEFT_ADDRESS,
    DEFAULT_TRAINER_ADDRESS,
    MlxtuneClient,
)
from mlxtune_client.errors import FieldViolation, MlxtuneClientError
from mlxtune_client.retry import Backoff
from mlxtune_client.watch import EventStream

__all__ = [
    "DEFAULT_PEFT_ADDRESS",
    "DEFAULT_TRAINER_ADDRESS",
    "Backoff",
    "EventStream",
    "FieldViolation",
    "MlxtuneClient",
    "MlxtuneClientError",
]
