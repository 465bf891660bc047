"""PeftService over gRPC: converts messages; the core does the work."""

from __future__ import annotations

from mlxtune.errors import InvalidArgument
from mlxtune.peft.v1 import peft_service_pb2 as pb
from mlxtune.peft.v1 import peft_service_pb2_grpc
from mlxtune.serving import map_errors_in
from mlxtune.serving.file_chunks import chunk_size_or_default, file_chunks
from services.peft_service import convert
from services.peft_service.adapter_files import PEFT_FILES
from services.peft_service.core import PeftCore

SERVICE_NAME = "mlxtune.peft.v1.PeftService"


@map_errors_in
class PeftServicer(peft_service_pb2_grpc.PeftServiceServicer):
    def __init__(self, core: PeftCore) -> None:
        self.core = core

    def InspectModel(self, request, context):
        return convert.model_report_to_pb(self.core.inspect_model(request.model))

    def PrepareCheckpoint(self, request, context):
        record, existed = self.core.prepare_checkpoint(
            request.model, convert.adapter_config_from_pb(request.adapter_config),
            request_id=request.request_id)
        return pb.PrepareCheckpointResponse(checkpoint=convert.checkpoint_to_pb(record),
                                            already_existed=existed)

    def GetCheckpoint(self, request, context):
        record = self.core.get_checkpoint(request.name)
        return pb.GetCheckpointResponse(checkpoint=convert.checkpoint_to_pb(record))

    def ListCheckpoints(self, request, context):
        records, token = self.core.list_checkpoints(request.page_size, request.page_token,
                                                    request.parent)
        return pb.ListCheckpointsResponse(
            checkpoints=[convert.checkpoint_to_pb(r) for r in records], next_page_token=token)

    def DeleteCheckpoint(self, request, context):
        self.core.delete_checkpoint(request.name)
        return pb.DeleteCheckpointResponse()

    def ExportCheckpoint(self, request, context):
        chunk_size = chunk_size_or_default(request.chunk_size)
        exported = self.core.export_checkpoint(
            request.name, convert.export_format_from_pb(request.format))
        try:
            for chunk in file_chunks(exported.folder, exported.names, chunk_size):
                yield pb.ExportCheckpointResponse(chunk=chunk)
        finally:
            exported.cleanup()  # also when the client goes away mid-stream

    def ImportAdapter(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("content") != "header":
            raise InvalidArgument.field("header", "the first message must be the header")
        header = first.header
        if not header.model:
            raise InvalidArgument.field("header.model", "the base model is required")
        with self.core.import_spool() as spool:
            for message in request_iterator:
                if message.WhichOneof("content") != "chunk":
                    raise InvalidArgument.field("header", "only the first message is a header")
                spool.add(message.chunk)
            files = spool.finish(required=PEFT_FILES)
            record, _ = self.core.import_adapter(header.model, files, header.request_id)
        return pb.ImportAdapterResponse(checkpoint=convert.checkpoint_to_pb(record))

    def Generate(self, request, context):
        for piece in self.core.generate(convert.generate_request_from_pb(request)):
            yield convert.generation_piece_to_pb(piece)
