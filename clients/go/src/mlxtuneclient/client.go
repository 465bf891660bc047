// Package mlxtuneclient is a small Go client for mlxtune's PEFT and trainer
// services, over the Go code that build.sh generates from protos/.
//
// It targets the grpc-go 1.33 API (grpc.DialContext, grpc.WithInsecure) that
// Debian ships, in GOPATH mode.
package mlxtuneclient

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"

	commonv1 "mlxtune/gen/go/mlxtune/common/v1"
	peftv1 "mlxtune/gen/go/mlxtune/peft/v1"
	trainerv1 "mlxtune/gen/go/mlxtune/trainer/v1"

	"google.golang.org/grpc"
)

// UploadChunkBytes is the size of each chunk UploadDataset sends.
const UploadChunkBytes = 64 * 1024

// Client holds one connection to each service.
type Client struct {
	Peft    peftv1.PeftServiceClient
	Trainer trainerv1.TrainerServiceClient
	conns   []*grpc.ClientConn
}

// Dial sets up plaintext connections to both services. It does not wait for
// them: like the other clients, an unreachable service fails the first RPC
// with UNAVAILABLE, a status the caller can act on.
func Dial(ctx context.Context, peftAddress, trainerAddress string) (*Client, error) {
	client := &Client{}
	for _, address := range []string{peftAddress, trainerAddress} {
		conn, err := grpc.DialContext(ctx, address, grpc.WithInsecure())
		if err != nil {
			client.Close()
			return nil, fmt.Errorf("connect to %s: %w", address, err)
		}
		client.conns = append(client.conns, conn)
	}
	client.Peft = peftv1.NewPeftServiceClient(client.conns[0])
	client.Trainer = trainerv1.NewTrainerServiceClient(client.conns[1])
	return client, nil
}

// Close closes both connections.
func (c *Client) Close() {
	for _, conn := range c.conns {
		conn.Close()
	}
}

// NewRequestID returns a fresh id for one logical create. Retrying that create
// with the same id returns the first result instead of creating a second one.
func NewRequestID() string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		panic(err) // the OS random source does not fail
	}
	return hex.EncodeToString(b)
}

// Inspect describes a model without loading its weights.
func (c *Client) Inspect(ctx context.Context, model string) (*peftv1.InspectModelResponse, error) {
	return c.Peft.InspectModel(ctx, &peftv1.InspectModelRequest{Model: model})
}

// Prepare applies an adapter configuration to a model and returns the
// prepared checkpoint. An empty requestID gets a fresh one.
func (c *Client) Prepare(ctx context.Context, model string, config *commonv1.AdapterConfig,
	requestID string) (*commonv1.Checkpoint, error) {
	if requestID == "" {
		requestID = NewRequestID()
	}
	response, err := c.Peft.PrepareCheckpoint(ctx, &peftv1.PrepareCheckpointRequest{
		Model: model, AdapterConfig: config, RequestId: requestID})
	if err != nil {
		return nil, err
	}
	return response.Checkpoint, nil
}

// GetCheckpoint returns one checkpoint by name ("checkpoints/{id}").
func (c *Client) GetCheckpoint(ctx context.Context, name string) (*commonv1.Checkpoint, error) {
	response, err := c.Peft.GetCheckpoint(ctx, &peftv1.GetCheckpointRequest{Name: name})
	if err != nil {
		return nil, err
	}
	return response.Checkpoint, nil
}

// UploadDataset streams JSONL from r: the header first, then the bytes in
// chunks. A header without a request_id gets a fresh one.
func (c *Client) UploadDataset(ctx context.Context, r io.Reader,
	header *trainerv1.UploadDatasetHeader) (*trainerv1.Dataset, error) {
	if header.RequestId == "" {
		header.RequestId = NewRequestID()
	}
	stream, err := c.Trainer.UploadDataset(ctx)
	if err != nil {
		return nil, err
	}
	send := func(request *trainerv1.UploadDatasetRequest) error {
		// io.EOF from Send means the server already answered (e.g. rejected
		// the header); CloseAndRecv below returns that answer.
		if err := stream.Send(request); err != nil && err != io.EOF {
			return err
		}
		return nil
	}
	if err := send(&trainerv1.UploadDatasetRequest{
		Content: &trainerv1.UploadDatasetRequest_Header{Header: header}}); err != nil {
		return nil, err
	}
	buffer := make([]byte, UploadChunkBytes)
	for {
		n, readErr := r.Read(buffer)
		if n > 0 {
			// Send marshals the message before it returns, so the buffer can be reused.
			chunk := &trainerv1.UploadDatasetRequest_Chunk{Chunk: buffer[:n]}
			if err := send(&trainerv1.UploadDatasetRequest{Content: chunk}); err != nil {
				return nil, err
			}
		}
		if readErr == io.EOF {
			break
		}
		if readErr != nil {
			return nil, readErr
		}
	}
	response, err := stream.CloseAndRecv()
	if err != nil {
		return nil, err
	}
	return response.Dataset, nil
}

// Train creates a training job and calls handle with each event until the
// job's final state. A request without a request_id gets a fresh one.
// Cancelling ctx ends the stream, never the job.
func (c *Client) Train(ctx context.Context, job *trainerv1.CreateTrainingJobRequest,
	heartbeatSeconds int32, handle func(*trainerv1.JobEvent) error) error {
	if job.RequestId == "" {
		job.RequestId = NewRequestID()
	}
	stream, err := c.Trainer.Train(ctx, &trainerv1.TrainRequest{Job: job, HeartbeatSeconds: heartbeatSeconds})
	if err != nil {
		return err
	}
	return forEachEvent(func() (*trainerv1.JobEvent, error) {
		response, err := stream.Recv()
		return response.GetEvent(), err
	}, handle)
}

// Watch calls handle with a job's events after afterSequence: the history
// first, then live events until the job's final state.
func (c *Client) Watch(ctx context.Context, name string, afterSequence int64,
	heartbeatSeconds int32, handle func(*trainerv1.JobEvent) error) error {
	stream, err := c.Trainer.WatchTrainingJob(ctx, &trainerv1.WatchTrainingJobRequest{
		Name: name, AfterSequence: afterSequence, HeartbeatSeconds: heartbeatSeconds})
	if err != nil {
		return err
	}
	return forEachEvent(func() (*trainerv1.JobEvent, error) {
		response, err := stream.Recv()
		return response.GetEvent(), err
	}, handle)
}

// GetJob returns one training job by name ("jobs/{id}").
func (c *Client) GetJob(ctx context.Context, name string) (*trainerv1.TrainingJob, error) {
	response, err := c.Trainer.GetTrainingJob(ctx, &trainerv1.GetTrainingJobRequest{Name: name})
	if err != nil {
		return nil, err
	}
	return response.TrainingJob, nil
}

// forEachEvent drains a server stream; io.EOF is its normal end.
func forEachEvent(recv func() (*trainerv1.JobEvent, error), handle func(*trainerv1.JobEvent) error) error {
	for {
		event, err := recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if err := handle(event); err != nil {
			return err
		}
	}
}
