package policy

import (
	"bytes"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/util"
)

//go:embed schema/input.schema.json schema/decision.schema.json
var schemaFS embed.FS

// InputSchema returns the JSON Schema of the policy input (draft-07).
func InputSchema() []byte { return mustRead("schema/input.schema.json") }

// DecisionSchema returns the JSON Schema of the value of data.umbra.authz.decision.
func DecisionSchema() []byte { return mustRead("schema/decision.schema.json") }

func mustRead(name string) []byte {
	b, err := schemaFS.ReadFile(name)
	if err != nil {
		panic("policy: embedded schema missing: " + name) // a build defect, not input
	}
	return b
}

// inputSchemaSet is the schema set that type-checks policies at compile time:
// a policy that reads an input field the schema does not define fails to load.
var inputSchemaSet = sync.OnceValues(func() (*ast.SchemaSet, error) {
	var s any
	if err := util.UnmarshalJSON(InputSchema(), &s); err != nil {
		return nil, fmt.Errorf("policy: embedded input schema: %w", err)
	}
	// OPA's type checker cannot merge conditional (if/then) subschemas; the
	// per-action requirements they express are checked by Input.Validate.
	if m, ok := s.(map[string]any); ok {
		delete(m, "allOf")
	}
	ss := ast.NewSchemaSet()
	ss.Put(ast.SchemaRootRef, s)
	return ss, nil
})

// maxInputFileBytes bounds an input document read from a file.
const maxInputFileBytes = 1 << 20

// ParseInput decodes an input document (for example a file given to
// `umbra policy eval --input`) strictly: unknown fields, trailing data, wrong
// types and schema violations are errors that name the field.
func ParseInput(r io.Reader) (*Input, error) {
	b, err := io.ReadAll(io.LimitReader(r, maxInputFileBytes+1))
	if err != nil {
		return nil, fmt.Errorf("read policy input: %w", err)
	}
	if len(b) > maxInputFileBytes {
		return nil, fmt.Errorf("policy input is larger than %d bytes", maxInputFileBytes)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var in Input
	if err := dec.Decode(&in); err != nil {
		return nil, fmt.Errorf("policy input is not valid (see docs/policy.md for the schema): %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, errors.New("policy input has data after the JSON object")
	}
	if err := in.Validate(); err != nil {
		return nil, fmt.Errorf("policy input does not match the schema:\n%w", err)
	}
	return &in, nil
}
