package policy

import (
	"embed"
	"fmt"
	"io"
	"sort"
	"sync"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/util"

	"github.com/umbra-cc/umbra/strictjson"
)

//go:embed schema/input.schema.json
var schemaFS embed.FS

// InputSchema returns the JSON Schema of the policy input (draft-07).
func InputSchema() []byte { return mustRead("schema/input.schema.json") }

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
	// Strictly (exact member names, no duplicates, no unknown members, nothing
	// after the object), then every member the schema requires must be present:
	// the decoder would fill a missing one with its zero value.
	var in Input
	if err := strictjson.Decode(b, &in); err != nil {
		return nil, fmt.Errorf("policy input is not valid (see docs/policy.md for the schema): %w", err)
	}
	doc, err := strictjson.DecodeAny(b)
	if err != nil {
		return nil, fmt.Errorf("policy input is not valid: %w", err)
	}
	schema, err := inputSchemaDoc()
	if err != nil {
		return nil, err
	}
	if err := requirePresent(schema, doc, "input"); err != nil {
		return nil, fmt.Errorf("policy input does not match the schema: %w", err)
	}
	if err := in.Validate(); err != nil {
		return nil, fmt.Errorf("policy input does not match the schema:\n%w", err)
	}
	return &in, nil
}

var inputSchemaDoc = sync.OnceValues(func() (map[string]any, error) {
	v, err := strictjson.DecodeAny(InputSchema())
	m, ok := v.(map[string]any)
	if err != nil || !ok {
		return nil, fmt.Errorf("policy: embedded input schema: %v", err)
	}
	return m, nil
})

// requirePresent checks that doc has every member the JSON Schema schema marks
// "required", at every depth (properties, items); the schema is the one source of
// what is required, so decoder and schema cannot disagree on it. Types, ranges and
// the per-action (allOf) requirements are Validate's.
func requirePresent(schema map[string]any, doc any, path string) error {
	switch d := doc.(type) {
	case map[string]any:
		if req, ok := schema["required"].([]any); ok {
			for _, r := range req {
				name, _ := r.(string)
				if _, ok := d[name]; !ok {
					return fmt.Errorf("%s.%s is required", path, name)
				}
			}
		}
		props, _ := schema["properties"].(map[string]any)
		names := make([]string, 0, len(d))
		for k := range d {
			names = append(names, k)
		}
		sort.Strings(names)
		for _, k := range names {
			if sub, ok := props[k].(map[string]any); ok {
				if err := requirePresent(sub, d[k], path+"."+k); err != nil {
					return err
				}
			}
		}
	case []any:
		if items, ok := schema["items"].(map[string]any); ok {
			for i, v := range d {
				if err := requirePresent(items, v, fmt.Sprintf("%s[%d]", path, i)); err != nil {
					return err
				}
			}
		}
	}
	return nil
}
