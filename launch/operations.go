package launch

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strings"

	"github.com/umbra-cc/umbra/policy"
	"github.com/umbra-cc/umbra/strictjson"
)

// An Operation is a control operation beyond pause, resume and stop: a snapshot, a disk
// attached at run time, a backup, a migration. It decodes its own arguments with
// DecodeArgs (nothing unknown accepted), asks the policy for the principal it is given
// through the VM's guard, audits like every other action, and returns a result that is
// encoded as JSON to the caller.
type Operation func(ctx context.Context, c *Control, p policy.Principal, args json.RawMessage) (any, error)

// operations names every operation the control socket serves. A new operation is one
// line here, its code in a file of its own.
var operations = map[string]Operation{
	"backup.create":    opBackupCreate,
	"backup.list":      opBackupList,
	"cluster.commit":   opClusterCommit,
	"cluster.quiesce":  opClusterQuiesce,
	"cluster.release":  opClusterRelease,
	"cluster.snapshot": opClusterSnapshot,
	"disk.attach":      opDiskAttach,
	"disk.detach":      opDiskDetach,
	"migrate":          opMigrate,
	"net.attach":       opNetAttach,
	"net.detach":       opNetDetach,
	"replicate":        opReplicate,
	"snapshot.create":  opSnapshotCreate,
	"snapshot.diff":    opSnapshotDiff,
	"snapshot.list":    opSnapshotList,
	"suspend":          opSuspend,
}

// operationName is the spelling of an operation's name: lower-case words joined by dots
// or dashes ("snapshot.create").
var operationName = regexp.MustCompile(`^[a-z][a-z0-9-]*(\.[a-z][a-z0-9-]*)*$`)

// MaxOperationName bounds an operation's name.
const MaxOperationName = 64

// ErrUnknownOperation is returned for a name no operation has.
var ErrUnknownOperation = errors.New("unknown operation")

// ArgsError says what is wrong with an operation's arguments; the control socket answers
// it with 400.
type ArgsError struct {
	Operation string
	Err       error
}

func (e *ArgsError) Error() string {
	return fmt.Sprintf("arguments of %s: %v", e.Operation, e.Err)
}

func (e *ArgsError) Unwrap() error { return e.Err }

// DecodeArgs decodes an operation's arguments strictly into v: one JSON object whose
// member names match v's exactly, none unknown, none twice. Empty args decode as {}.
func DecodeArgs(operation string, args json.RawMessage, v any) error {
	if len(args) == 0 {
		args = json.RawMessage("{}")
	}
	if err := strictjson.Decode(args, v); err != nil {
		return &ArgsError{Operation: operation, Err: err}
	}
	return nil
}

// ValidOperationName says whether name is spelled as an operation's name may be.
func ValidOperationName(name string) bool {
	return len(name) <= MaxOperationName && operationName.MatchString(name)
}

// Operation runs the named operation for p.
func (c *Control) Operation(ctx context.Context, name string, p policy.Principal, args json.RawMessage) (any, error) {
	return runOperation(ctx, operations, c, name, p, args)
}

func runOperation(ctx context.Context, ops map[string]Operation, c *Control, name string, p policy.Principal, args json.RawMessage) (any, error) {
	op, ok := ops[name]
	if !ok {
		known := "none yet"
		if len(ops) > 0 {
			known = strings.Join(slices.Sorted(maps.Keys(ops)), ", ")
		}
		return nil, fmt.Errorf("%w %q (this monitor serves: %s)", ErrUnknownOperation, name, known)
	}
	return op(ctx, c, p, args)
}
