// Command mlxtune-example prepares a LoRA checkpoint, uploads a JSONL dataset,
// trains and prints the streamed loss. The last line is a JSON summary of what
// the streams carried, the same one the Node example prints. It exits 1 unless
// the job succeeded.
//
//	mlxtune-example --peft HOST:PORT --trainer HOST:PORT --model NAME \
//	  --dataset FILE.jsonl --steps N [--rank R] [--learning-rate LR]
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"os/signal"
	"path/filepath"

	"mlxtuneclient"

	commonv1 "mlxtune/gen/go/mlxtune/common/v1"
	trainerv1 "mlxtune/gen/go/mlxtune/trainer/v1"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

type options struct {
	peft, trainer, model, dataset string
	steps                         int64
	rank                          int
	learningRate                  float64
}

// summary is the final JSON line; field order and names match the Node example.
type summary struct {
	Checkpoint       string   `json:"checkpoint"`
	Dataset          string   `json:"dataset"`
	Job              string   `json:"job"`
	StepEvents       int      `json:"step_events"`
	TotalSteps       int64    `json:"total_steps"`
	FirstLoss        *float64 `json:"first_loss"` // null: no steps, or not finite (JSON has no NaN)
	LastLoss         *float64 `json:"last_loss"`
	EvalEvents       int      `json:"eval_events"`
	FinalState       string   `json:"final_state"`
	OutputCheckpoint string   `json:"output_checkpoint"`
}

func parseOptions() options {
	var o options
	flag.StringVar(&o.peft, "peft", "", "PEFT service address, host:port")
	flag.StringVar(&o.trainer, "trainer", "", "trainer service address, host:port")
	flag.StringVar(&o.model, "model", "", "model name known to the PEFT service")
	flag.StringVar(&o.dataset, "dataset", "", "JSONL dataset file to upload")
	flag.Int64Var(&o.steps, "steps", 0, "optimizer steps to train")
	flag.IntVar(&o.rank, "rank", 8, "LoRA rank")
	flag.Float64Var(&o.learningRate, "learning-rate", 0, "peak learning rate (0: server default)")
	flag.Parse()
	if o.peft == "" || o.trainer == "" || o.model == "" || o.dataset == "" || o.steps <= 0 {
		fmt.Fprintln(os.Stderr, "--peft, --trainer, --model, --dataset and --steps are required")
		flag.Usage()
		os.Exit(2)
	}
	return o
}

func main() {
	o := parseOptions()
	// Ctrl-C ends the stream; the job keeps running on the server.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	succeeded, err := run(ctx, o)
	if err != nil {
		// status.Convert gives the gRPC code for RPC errors, Unknown otherwise.
		s := status.Convert(err)
		fmt.Fprintf(os.Stderr, "error: %s: %s\n", codeName(s.Code()), s.Message())
		os.Exit(1)
	}
	if !succeeded {
		os.Exit(1)
	}
}

func run(ctx context.Context, o options) (bool, error) {
	client, err := mlxtuneclient.Dial(ctx, o.peft, o.trainer)
	if err != nil {
		return false, err
	}
	defer client.Close()

	model, err := client.Inspect(ctx, o.model)
	if err != nil {
		return false, err
	}
	fmt.Printf("model %s: %s, %d layers, hidden %d, %d parameters\n", o.model,
		model.BaseModel.GetArchitecture(), model.NumLayers, model.HiddenSize, model.TotalParameters)

	// proto3 `optional` fields are one-member oneofs in the v1.3 generated code.
	adapter := &commonv1.AdapterConfig{XRank: &commonv1.AdapterConfig_Rank{Rank: int32(o.rank)}}
	checkpoint, err := client.Prepare(ctx, o.model, adapter, "")
	if err != nil {
		return false, err
	}
	fmt.Printf("prepared %s: %s\n", checkpoint.Name, checkpoint.Parameters.GetSummary())

	file, err := os.Open(o.dataset)
	if err != nil {
		return false, err
	}
	defer file.Close()
	dataset, err := client.UploadDataset(ctx, file,
		&trainerv1.UploadDatasetHeader{DisplayName: filepath.Base(o.dataset)})
	if err != nil {
		return false, err
	}
	fmt.Printf("dataset %s: %d records, %s\n", dataset.Name, dataset.NumRecords, dataset.Format)

	config := &trainerv1.TrainingConfig{XMaxSteps: &trainerv1.TrainingConfig_MaxSteps{MaxSteps: o.steps}}
	if o.learningRate > 0 {
		config.XLearningRate = &trainerv1.TrainingConfig_LearningRate{LearningRate: o.learningRate}
	}
	var losses []float64
	evalEvents, jobName := 0, ""
	err = client.Train(ctx, &trainerv1.CreateTrainingJobRequest{
		Checkpoint: checkpoint.Name, Dataset: dataset.Name, Config: config, DisplayName: "go example",
	}, 0, func(event *trainerv1.JobEvent) error {
		jobName = event.Job
		printEvent(event)
		if step := event.GetStep(); step != nil {
			losses = append(losses, step.Loss)
		}
		if event.GetEval() != nil {
			evalEvents++
		}
		return nil
	})
	if err != nil {
		return false, err
	}

	// The stream ends after the final state change; the job resource is the record.
	job, err := client.GetJob(ctx, jobName)
	if err != nil {
		return false, err
	}
	result := summary{
		Checkpoint: checkpoint.Name, Dataset: dataset.Name, Job: job.Name,
		StepEvents: len(losses), TotalSteps: job.TotalSteps, EvalEvents: evalEvents,
		FinalState: job.State.String(), OutputCheckpoint: job.OutputCheckpoint,
	}
	if len(losses) > 0 {
		result.FirstLoss, result.LastLoss = finite(losses[0]), finite(losses[len(losses)-1])
	}
	line, err := json.Marshal(result)
	if err != nil {
		return false, err
	}
	fmt.Println(string(line))
	return job.State == trainerv1.JobState_JOB_STATE_SUCCEEDED, nil
}

// codeNames spell codes as the gRPC spec and the other clients do
// (NOT_FOUND); grpc-go's String() gives NotFound, and Canceled with one L.
var codeNames = [...]string{"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT",
	"DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED",
	"RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
	"UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"}

func codeName(code codes.Code) string {
	if int(code) < len(codeNames) {
		return codeNames[code]
	}
	return code.String()
}

// finite returns nil for NaN and ±Inf, which encoding/json refuses to write.
func finite(x float64) *float64 {
	if math.IsNaN(x) || math.IsInf(x, 0) {
		return nil
	}
	return &x
}

func printEvent(event *trainerv1.JobEvent) {
	switch kind := event.Kind.(type) {
	case *trainerv1.JobEvent_Step:
		s := kind.Step
		skipped := ""
		if s.Skipped {
			skipped = " (skipped)"
		}
		fmt.Printf("step %d/%d loss %.4f%s\n", s.Step, s.TotalSteps, s.Loss, skipped)
	case *trainerv1.JobEvent_Eval:
		fmt.Printf("eval step %d loss %.4f\n", kind.Eval.Step, kind.Eval.EvalLoss)
	case *trainerv1.JobEvent_WorkerStarted:
		w := kind.WorkerStarted
		fmt.Printf("worker started on %s (%s): %d train / %d validation examples, %d steps\n",
			w.Device, w.Blas, w.TrainExamples, w.ValidationExamples, w.TotalSteps)
	case *trainerv1.JobEvent_CheckpointSaved:
		c := kind.CheckpointSaved
		final := ""
		if c.Final {
			final = " (final)"
		}
		fmt.Printf("checkpoint saved at step %d: %s%s\n", c.Step, c.Checkpoint, final)
	case *trainerv1.JobEvent_StateChange:
		c := kind.StateChange
		line := fmt.Sprintf("%s %s", event.Job, c.State)
		if c.Reason != "" {
			line += fmt.Sprintf(" (%s)", c.Reason)
		}
		if c.Error.GetReason() != "" {
			line += fmt.Sprintf(" [%s: %s]", c.Error.Reason, c.Error.Message)
		}
		fmt.Println(line)
	default: // heartbeats only prove the stream is alive
	}
}
