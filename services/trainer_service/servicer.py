"""TrainerService over gRPC: converts messages; the core does the work."""

from __future__ import annotations

from mlxtune.errors import InvalidArgument
from mlxtune.serving import map_errors_in
from mlxtune.trainer.v1 import trainer_service_pb2 as pb
from mlxtune.trainer.v1 import trainer_service_pb2_grpc
from services.trainer_service import convert
from services.trainer_service.core import DEFAULT_HEARTBEAT_SECONDS, TrainerCore

SERVICE_NAME = "mlxtune.trainer.v1.TrainerService"
MIN_HEARTBEAT_SECONDS = 0.5


def _upload_chunks(first_then_rest):
    """Split an upload stream into its header and a generator of the chunks."""
    iterator = iter(first_then_rest)
    first = next(iterator, None)
    if first is None or first.WhichOneof("content") != "header":
        raise InvalidArgument.field("header", "the first message of an upload must be a header")

    def chunks():
        for i, message in enumerate(iterator, start=1):
            kind = message.WhichOneof("content")
            if kind == "image":  # a FileChunk of an image the records reference
                yield message.image
                continue
            if kind != "chunk":
                raise InvalidArgument.field(f"messages[{i}]", "only the first message may be "
                                            "a header; the rest must be chunks or images")
            yield message.chunk

    return first.header, chunks()


def _heartbeat(seconds: int) -> float:
    if seconds < 0:
        raise InvalidArgument.field("heartbeat_seconds", "must be >= 0")
    return max(float(seconds), MIN_HEARTBEAT_SECONDS) if seconds else DEFAULT_HEARTBEAT_SECONDS


@map_errors_in
class TrainerServicer(trainer_service_pb2_grpc.TrainerServiceServicer):
    def __init__(self, core: TrainerCore) -> None:
        self.core = core

    # -- datasets -----------------------------------------------------------

    def UploadDataset(self, request_iterator, context):
        header, chunks = _upload_chunks(request_iterator)
        record = self.core.upload_dataset(
            chunks, convert.dataset_format_from_pb(header.format),
            display_name=header.display_name, request_id=header.request_id)
        return pb.UploadDatasetResponse(dataset=convert.dataset_to_pb(record))

    def CreateDataset(self, request, context):
        record = self.core.create_dataset(
            request.path, convert.dataset_format_from_pb(request.format),
            display_name=request.display_name, request_id=request.request_id)
        return pb.CreateDatasetResponse(dataset=convert.dataset_to_pb(record))

    def GetDataset(self, request, context):
        return pb.GetDatasetResponse(dataset=convert.dataset_to_pb(
            self.core.get_dataset(request.name)))

    def ListDatasets(self, request, context):
        records, token = self.core.list_datasets(request.page_size, request.page_token)
        return pb.ListDatasetsResponse(datasets=[convert.dataset_to_pb(r) for r in records],
                                       next_page_token=token)

    # -- jobs ---------------------------------------------------------------

    def _create(self, request: pb.CreateTrainingJobRequest):
        job, _ = self.core.create_job(
            request.checkpoint, request.dataset,
            convert.training_config_from_pb(request.config),
            validation_dataset=request.validation_dataset,
            display_name=request.display_name, request_id=request.request_id)
        return job

    def _job_pb(self, job):
        return convert.job_to_pb(job, self.core.queue_position(job.id))

    def CreateTrainingJob(self, request, context):
        return pb.CreateTrainingJobResponse(training_job=self._job_pb(self._create(request)))

    def _events(self, name, after, heartbeat_seconds, context):
        job_name = f"jobs/{self.core.get_job(name).id}"
        for item in self.core.watch(name, after, _heartbeat(heartbeat_seconds),
                                    is_active=context.is_active):
            yield convert.event_to_pb(item, job_name)

    def WatchTrainingJob(self, request, context):
        for event in self._events(request.name, request.after_sequence,
                                  request.heartbeat_seconds, context):
            yield pb.WatchTrainingJobResponse(event=event)

    def Train(self, request, context):
        job = self._create(request.job)
        for event in self._events(job.name, 0, request.heartbeat_seconds, context):
            yield pb.TrainResponse(event=event)

    def GetTrainingJob(self, request, context):
        return pb.GetTrainingJobResponse(training_job=self._job_pb(
            self.core.get_job(request.name)))

    def ListTrainingJobs(self, request, context):
        jobs, token = self.core.list_jobs(request.page_size, request.page_token,
                                          convert.states_from_pb(request.states))
        return pb.ListTrainingJobsResponse(training_jobs=[self._job_pb(j) for j in jobs],
                                           next_page_token=token)

    def CancelTrainingJob(self, request, context):
        return pb.CancelTrainingJobResponse(training_job=self._job_pb(
            self.core.cancel_job(request.name)))

    def ResumeTrainingJob(self, request, context):
        return pb.ResumeTrainingJobResponse(training_job=self._job_pb(
            self.core.resume_job(request.name)))
