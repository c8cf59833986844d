package launch

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/policy"
)

func TestRunOperation(t *testing.T) {
	type echoArgs struct {
		Name string `json:"name"`
	}
	ops := map[string]Operation{
		"test.echo": func(_ context.Context, _ *Control, p policy.Principal, args json.RawMessage) (any, error) {
			var a echoArgs
			if err := DecodeArgs("test.echo", args, &a); err != nil {
				return nil, err
			}
			return a.Name + " for " + p.ID, nil
		},
	}
	p := policy.Principal{ID: "alice"}
	tests := []struct {
		name, op, args string
		want           string // result, or a substring of the error
		wantArgsErr    bool
		wantUnknown    bool
	}{
		{name: "runs", op: "test.echo", args: `{"name":"x"}`, want: "x for alice"},
		{name: "no args is {}", op: "test.echo", args: ``, want: " for alice"},
		{name: "unknown operation names the known ones", op: "test.nope", want: "this monitor serves: test.echo", wantUnknown: true},
		{name: "unknown member", op: "test.echo", args: `{"name":"x","principal":"root"}`, want: "principal", wantArgsErr: true},
		{name: "member twice", op: "test.echo", args: `{"name":"x","name":"y"}`, want: "name", wantArgsErr: true},
		{name: "case differs", op: "test.echo", args: `{"Name":"x"}`, want: "Name", wantArgsErr: true},
		{name: "not an object", op: "test.echo", args: `[1]`, want: "test.echo", wantArgsErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := runOperation(context.Background(), ops, nil, tt.op, p, json.RawMessage(tt.args))
			var ae *ArgsError
			switch {
			case tt.wantArgsErr || tt.wantUnknown:
				if err == nil || !strings.Contains(err.Error(), tt.want) {
					t.Fatalf("err = %v, want one naming %q", err, tt.want)
				}
				if errors.As(err, &ae) != tt.wantArgsErr || errors.Is(err, ErrUnknownOperation) != tt.wantUnknown {
					t.Fatalf("err = %v: ArgsError %v, unknown %v", err, errors.As(err, &ae), errors.Is(err, ErrUnknownOperation))
				}
			case err != nil:
				t.Fatal(err)
			case got != tt.want:
				t.Fatalf("result %q, want %q", got, tt.want)
			}
		})
	}
}

func TestValidOperationName(t *testing.T) {
	for name, want := range map[string]bool{
		"snapshot.create": true, "disk.attach": true, "migrate": true, "backup.create-incremental": true,
		"": false, "Snapshot": false, ".x": false, "x.": false, "x..y": false, "x y": false,
		"x/y": false, "1x": false, strings.Repeat("a", MaxOperationName+1): false,
	} {
		if got := ValidOperationName(name); got != want {
			t.Errorf("ValidOperationName(%q) = %v, want %v", name, got, want)
		}
	}
}
