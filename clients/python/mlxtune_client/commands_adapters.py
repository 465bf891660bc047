"""The mlxtune CLI's adapter subcommands: export, import and generate."""

from __future__ import annotations

import sys

from google.protobuf import json_format

from mlxtune.peft.v1 import peft_service_pb2 as peft_pb
from mlxtune_client import output
from mlxtune_client.cli import Context, arg, command


@command("export", "download a checkpoint as an MLX adapter, a PEFT adapter or a fused model",
         arg("name", help="checkpoints/<id>"),
         arg("--format", default="mlx", choices=["mlx", "peft", "fused"],
             help="mlx: adapters.safetensors for mlx-lm; peft: adapter_model.safetensors for "
                  "Hugging Face PEFT; fused: a full model with the adapter merged"),
         arg("--out", default=".", help="folder to write the files into"))
def export(ctx: Context) -> None:
    a = ctx.args
    files = ctx.client.export_checkpoint(a.name, a.format, a.out)
    if ctx.out.json_mode:
        ctx.out.json_line({"checkpoint": a.name, "format": a.format,
                           "files": [str(f) for f in files]})
    else:
        for f in files:
            ctx.out.console.print(f"wrote {f}", markup=False)


@command("import", "upload a Hugging Face PEFT adapter folder as a checkpoint of a base model",
         arg("model", help="the base model the adapter was trained on"),
         arg("folder", help="holds adapter_config.json and adapter_model.safetensors"),
         arg("--request-id"))
def import_adapter(ctx: Context) -> None:
    a = ctx.args
    ctx.out.result(ctx.client.import_adapter(a.model, a.folder, request_id=a.request_id),
                   output.checkpoint)


@command("generate", "generate text with a base model and an optional adapter checkpoint",
         arg("prompt", help="the user message (or the raw prompt, with --raw)"),
         arg("--model", default="", help="base model (default: the checkpoint's base)"),
         arg("--checkpoint", default="", help="checkpoints/<id> to apply"),
         arg("--system", help="a system message"),
         arg("--raw", action="store_true", help="send the prompt as is, without the chat template"),
         arg("--max-tokens", type=int), arg("--temperature", type=float),
         arg("--top-p", type=float), arg("--seed", type=int))
def generate(ctx: Context) -> None:
    a = ctx.args
    messages = [] if a.raw else ([("system", a.system)] if a.system else []) + [("user", a.prompt)]
    last = peft_pb.GenerateResponse()
    for piece in ctx.client.generate(
            model=a.model, checkpoint=a.checkpoint, prompt=a.prompt if a.raw else "",
            messages=messages, max_tokens=a.max_tokens, temperature=a.temperature,
            top_p=a.top_p, seed=a.seed):
        last = piece
        if ctx.out.json_mode:
            ctx.out.json_line(json_format.MessageToDict(piece, preserving_proto_field_name=True))
        else:
            sys.stdout.write(piece.text)
            sys.stdout.flush()
    if not ctx.out.json_mode:
        reason = peft_pb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_")
        ctx.out.note(f"\n[{last.generated_tokens} tokens, {last.tokens_per_second:.1f} tok/s, "
                     f"{reason.lower()}]")
