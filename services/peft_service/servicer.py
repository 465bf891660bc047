"""PeftService over gRPC: converts messages; the core does the work."""

from __future__ import annotations

from mlxtune.peft.v1 import peft_service_pb2 as pb
from mlxtune.peft.v1 import peft_service_pb2_grpc
from mlxtune.serving import map_errors_in
from services.peft_service import convert
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
