package control

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/umbra-cc/umbra/launch"
	"github.com/umbra-cc/umbra/strictjson"
)

// OperationRequest is the body of POST /v1/vm/operations: an operation beyond pause,
// resume and stop (launch.Operation) and its arguments, which the operation decodes
// strictly itself.
type OperationRequest struct {
	Operation string          `json:"operation"`
	Args      json.RawMessage `json:"args,omitempty"`
}

// OperationResult is the body of a successful POST /v1/vm/operations.
type OperationResult struct {
	VM        string          `json:"vm"`
	Operation string          `json:"operation"`
	Result    json.RawMessage `json:"result,omitempty"`
}

// DecodeOperation decodes an operation body strictly: one JSON object with the member
// "operation" (required, a name as launch.ValidOperationName spells it) and "args" (an
// object, optional), each once, spelled exactly. Who asks is the socket's peer, never
// the body.
func DecodeOperation(body []byte) (OperationRequest, error) {
	var op OperationRequest
	if len(body) > MaxOperationBodyBytes {
		return op, fmt.Errorf("body is over the %d-byte limit", MaxOperationBodyBytes)
	}
	if err := strictjson.Decode(body, &op); err != nil {
		return OperationRequest{}, fmt.Errorf(`body must be {"operation": NAME, "args": {...}}: %w`, err)
	}
	if op.Operation == "" {
		return OperationRequest{}, errors.New(`"operation" is required`)
	}
	if !launch.ValidOperationName(op.Operation) {
		return OperationRequest{}, fmt.Errorf("operation name %q is not lower-case words joined by dots or dashes (at most %d bytes)", op.Operation, launch.MaxOperationName)
	}
	if len(op.Args) > 0 {
		if op.Args[0] != '{' {
			return OperationRequest{}, errors.New(`"args" must be a JSON object`)
		}
	} else {
		op.Args = nil
	}
	return op, nil
}
