// Package cabi reads a C header the way the C compiler sees it, for tests that keep a
// guest ABI's Go side in step with its header (docs/*_abi.h): gcc compiles the header
// with debug information and the struct layouts (every field's name, offset and
// size), enum constants and integer macros are read from what the compiler produced,
// not from the header's text. Encode and Decode go further and move real bytes
// between a struct filled in C, by field name, and the Go code under test.
//
// Tests only: it runs gcc (the test is skipped when there is none).
package cabi

import (
	"bufio"
	"bytes"
	"debug/dwarf"
	"debug/elf"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// Field is one member of a C struct as the compiler laid it out.
type Field struct {
	Name   string
	Offset int64
	Size   int64
	// Array is the element count of an array member (char name[16]: 16), 0 if the
	// member is not an array.
	Array int64
}

// Struct is a C struct as the compiler laid it out.
type Struct struct {
	Name   string
	Size   int64
	Fields []Field
}

// Field returns the member called name.
func (s Struct) Field(name string) (Field, bool) {
	for _, f := range s.Fields {
		if f.Name == name {
			return f, true
		}
	}
	return Field{}, false
}

// Gaps returns the byte ranges of s that no member covers (compiler-inserted padding,
// whose contents C leaves undefined), as "[from,to)" strings.
func (s Struct) Gaps() []string {
	var gaps []string
	at := int64(0)
	for _, f := range s.Fields {
		if f.Offset > at {
			gaps = append(gaps, fmt.Sprintf("[%d,%d)", at, f.Offset))
		}
		at = max(at, f.Offset+f.Size)
	}
	if at < s.Size {
		gaps = append(gaps, fmt.Sprintf("[%d,%d)", at, s.Size))
	}
	return gaps
}

// CheckSizes fails the test unless each named struct is in the header, has the size
// the Go side reads and writes, and has no padding (whose bytes C leaves undefined,
// so a guest would send whatever its stack held there).
func (h *Header) CheckSizes(tb testing.TB, sizes map[string]int64) {
	tb.Helper()
	for name, size := range sizes {
		s, ok := h.Structs[name]
		if !ok {
			tb.Errorf("struct %s missing from %s", name, h.Path)
			continue
		}
		if s.Size != size {
			tb.Errorf("sizeof(struct %s) = %d as gcc lays it out, the Go side uses %d", name, s.Size, size)
		}
		if g := s.Gaps(); g != nil {
			tb.Errorf("struct %s has padding at %v", name, g)
		}
	}
}

// CheckMacros fails the test unless the header's integer macros, as gcc computes
// them, are exactly want (apart from the names in skip, which the caller checks
// elsewhere).
func (h *Header) CheckMacros(tb testing.TB, want map[string]int64, skip []string) {
	tb.Helper()
	for name, v := range h.Macros {
		if slices.Contains(skip, name) {
			continue
		}
		w, ok := want[name]
		switch {
		case !ok:
			tb.Errorf("%s defines %s = %#x, unknown to the Go side's test", filepath.Base(h.Path), name, v)
		case v != w:
			tb.Errorf("%s: %s = %#x as gcc computes it, the Go side says %#x", filepath.Base(h.Path), name, v, w)
		}
	}
	for name := range want {
		if _, ok := h.Macros[name]; !ok {
			tb.Errorf("%s lacks %s", filepath.Base(h.Path), name)
		}
	}
}

// Header is what the compiler makes of one header file.
type Header struct {
	Path    string
	Structs map[string]Struct
	// Enums maps each enumerator to its value.
	Enums map[string]int64
	// Macros maps each object-like macro with an integer value, of the prefixes
	// asked for, to the value the compiler computes for it.
	Macros map[string]int64
	// FuncMacros lists the function-like macros of those prefixes (PP_Q_ID(w)):
	// the compiler can only evaluate them with an argument (see Eval).
	FuncMacros []string
	// Others lists object-like macros of those prefixes that are not integer
	// constants (the compiler refused them in an integer context).
	Others []string
}

// GCC returns the path of gcc, skipping the test when there is none.
func GCC(tb testing.TB) string {
	tb.Helper()
	p, err := exec.LookPath("gcc")
	if err != nil {
		tb.Skip("gcc not installed (apt-get install gcc): the ABI header checks compile the header")
	}
	return p
}

// Read compiles header with gcc and returns its structs, enums and the integer
// macros whose names start with one of prefixes.
func Read(tb testing.TB, header string, prefixes ...string) *Header {
	tb.Helper()
	gcc := GCC(tb)
	abs, err := filepath.Abs(header)
	if err != nil {
		tb.Fatal(err)
	}
	h := &Header{Path: abs, Structs: map[string]Struct{}, Enums: map[string]int64{}, Macros: map[string]int64{}}
	dir := tb.TempDir()

	// Layouts: every type the header declares, kept in the debug information even
	// though nothing uses it.
	obj := filepath.Join(dir, "layout.o")
	src := fmt.Sprintf("#include %q\n", abs)
	run(tb, src, gcc, "-std=c11", "-g", "-O0", "-fno-eliminate-unused-debug-types", "-c", "-x", "c", "-", "-o", obj)
	readDWARF(tb, obj, h)

	// Macros: the preprocessor lists them; the compiler evaluates each.
	defs := run(tb, src, gcc, "-std=c11", "-dM", "-E", "-x", "c", "-")
	var names []string
	sc := bufio.NewScanner(bytes.NewReader(defs))
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), "#define ")
		if !ok {
			continue
		}
		end := strings.IndexAny(rest, " (")
		if end < 0 {
			continue // defined without a value (include guards)
		}
		name := rest[:end]
		if !slices.ContainsFunc(prefixes, func(p string) bool { return strings.HasPrefix(name, p) }) {
			continue
		}
		if rest[end] == '(' {
			h.FuncMacros = append(h.FuncMacros, name)
			continue
		}
		names = append(names, name)
	}
	evalMacros(tb, h, names)
	slices.Sort(h.FuncMacros)
	slices.Sort(h.Others)
	return h
}

// evalMacros evaluates names in one program, or one by one if one of them is not
// an integer constant (which then goes to h.Others).
func evalMacros(tb testing.TB, h *Header, names []string) {
	tb.Helper()
	var checks, prints strings.Builder
	for i, n := range names {
		fmt.Fprintf(&checks, "enum { cabi_check%d = sizeof(char[((long long)(%s)) ? 1 : 1]) };\n", i, n)
		fmt.Fprintf(&prints, "\tprintf(\"%s %%lld\\n\", (long long)(%s));\n", n, n)
	}
	src := fmt.Sprintf("#include %q\n#include <stdio.h>\n%sint main(void) {\n%s\treturn 0;\n}\n", h.Path, checks.String(), prints.String())
	out, err := compileAndRun(tb, src, nil)
	if err != nil {
		for _, n := range names {
			if v, err := Eval(tb, h, n); err == nil {
				h.Macros[n] = v
			} else {
				h.Others = append(h.Others, n)
			}
		}
		return
	}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		k, v, _ := strings.Cut(line, " ")
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			tb.Fatalf("macro %s printed %q", k, v)
		}
		h.Macros[k] = n
	}
}

// Eval has the compiler compute the C integer expression expr in a program that
// includes the header, as a long long. An expression that is not an integer
// constant expression is an error.
func Eval(tb testing.TB, h *Header, expr string) (int64, error) {
	tb.Helper()
	// An enumerator's value must be an integer constant expression: this refuses
	// anything else at compile time rather than printing garbage.
	src := fmt.Sprintf(`#include %q
#include <stdio.h>
enum { cabi_check = sizeof(char[((long long)(%s)) ? 1 : 1]) };
static const long long cabi_value = (long long)(%s);
int main(void) { printf("%%lld\n", cabi_value); return 0; }
`, h.Path, expr, expr)
	out, err := compileAndRun(tb, src, nil)
	if err != nil {
		return 0, err
	}
	return strconv.ParseInt(strings.TrimSpace(string(out)), 10, 64)
}

// Encode fills a struct name of the header, zeroed, with values by field (an integer
// field gets the integer; a char array gets the bytes of a string) in C, and returns
// its bytes as the compiler lays them out.
func Encode(tb testing.TB, h *Header, name string, values map[string]any) []byte {
	tb.Helper()
	s, ok := h.Structs[name]
	if !ok {
		tb.Fatalf("struct %s not in %s", name, h.Path)
	}
	var set strings.Builder
	for _, f := range s.Fields {
		v, ok := values[f.Name]
		if !ok {
			continue
		}
		switch v := v.(type) {
		case string:
			fmt.Fprintf(&set, "\tmemcpy(s.%s, %q, %d);\n", f.Name, v, min(int64(len(v)), f.Size))
		case uint64, int64, uint32, uint16, uint8, int:
			fmt.Fprintf(&set, "\ts.%s = %vull;\n", f.Name, v)
		default:
			tb.Fatalf("value %T for %s.%s", v, name, f.Name)
		}
	}
	for k := range values {
		if _, ok := s.Field(k); !ok {
			tb.Fatalf("struct %s has no field %s", name, k)
		}
	}
	src := fmt.Sprintf(`#include %q
#include <stdio.h>
#include <string.h>
int main(void) {
	struct %s s;
	memset(&s, 0, sizeof s);
%s	fwrite(&s, sizeof s, 1, stdout);
	return 0;
}
`, h.Path, name, set.String())
	out, err := compileAndRun(tb, src, nil)
	if err != nil {
		tb.Fatal(err)
	}
	if int64(len(out)) != s.Size {
		tb.Fatalf("struct %s: the C program wrote %d bytes, the struct is %d", name, len(out), s.Size)
	}
	return out
}

// Decode reads b as a struct name of the header in C and returns each field's value as
// C reads it: integers as uint64, char arrays as their bytes (hex).
func Decode(tb testing.TB, h *Header, name string, b []byte) map[string]any {
	tb.Helper()
	s, ok := h.Structs[name]
	if !ok {
		tb.Fatalf("struct %s not in %s", name, h.Path)
	}
	if int64(len(b)) != s.Size {
		tb.Fatalf("struct %s is %d bytes, got %d", name, s.Size, len(b))
	}
	var pr strings.Builder
	for _, f := range s.Fields {
		if f.Array > 0 {
			fmt.Fprintf(&pr, "\tprintf(\"%s \"); for (unsigned i = 0; i < sizeof s.%s; i++) printf(\"%%02x\", (unsigned char)s.%s[i]); printf(\"\\n\");\n", f.Name, f.Name, f.Name)
			continue
		}
		fmt.Fprintf(&pr, "\tprintf(\"%s %%llu\\n\", (unsigned long long)s.%s);\n", f.Name, f.Name)
	}
	src := fmt.Sprintf(`#include %q
#include <stdio.h>
#include <string.h>
int main(void) {
	struct %s s;
	if (fread(&s, sizeof s, 1, stdin) != 1) return 2;
%s	return 0;
}
`, h.Path, name, pr.String())
	out, err := compileAndRun(tb, src, b)
	if err != nil {
		tb.Fatal(err)
	}
	m := map[string]any{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		k, v, _ := strings.Cut(line, " ")
		f, _ := s.Field(k)
		if f.Array > 0 {
			bs, err := hex.DecodeString(v)
			if err != nil {
				tb.Fatalf("%s: %v", k, err)
			}
			m[k] = bs
			continue
		}
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			tb.Fatalf("%s: %v", k, err)
		}
		m[k] = n
	}
	return m
}

func readDWARF(tb testing.TB, obj string, h *Header) {
	tb.Helper()
	f, err := elf.Open(obj)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	d, err := f.DWARF()
	if err != nil {
		tb.Fatalf("%s: debug information: %v", obj, err)
	}
	r := d.Reader()
	for {
		e, err := r.Next()
		if err != nil {
			tb.Fatal(err)
		}
		if e == nil {
			break
		}
		if e.Tag != dwarf.TagStructType && e.Tag != dwarf.TagEnumerationType {
			continue
		}
		ty, err := d.Type(e.Offset)
		if err != nil {
			tb.Fatal(err)
		}
		switch ty := ty.(type) {
		case *dwarf.StructType:
			if ty.StructName == "" || ty.Incomplete {
				continue
			}
			s := Struct{Name: ty.StructName, Size: ty.ByteSize}
			for _, m := range ty.Field {
				fl := Field{Name: m.Name, Offset: m.ByteOffset, Size: m.Type.Size()}
				if a, ok := m.Type.(*dwarf.ArrayType); ok {
					fl.Array = a.Count
				}
				s.Fields = append(s.Fields, fl)
			}
			h.Structs[s.Name] = s
		case *dwarf.EnumType:
			for _, v := range ty.Val {
				h.Enums[v.Name] = v.Val
			}
		}
	}
}

// run runs a command with stdin and returns its standard output, failing the test
// with its standard error.
func run(tb testing.TB, stdin string, name string, args ...string) []byte {
	tb.Helper()
	cmd := exec.Command(name, args...)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		tb.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, errb.String())
	}
	return out.Bytes()
}

// outputs caches compileAndRun's results by program and input: the tests build the
// same structs many times over.
var outputs sync.Map // string -> []byte

// compileAndRun compiles the C program src and runs it with stdin.
func compileAndRun(tb testing.TB, src string, stdin []byte) ([]byte, error) {
	tb.Helper()
	key := src + "\x00" + string(stdin)
	if out, ok := outputs.Load(key); ok {
		return out.([]byte), nil
	}
	out, err := compileAndRunOnce(tb, src, stdin)
	if err == nil {
		outputs.Store(key, out)
	}
	return out, err
}

func compileAndRunOnce(tb testing.TB, src string, stdin []byte) ([]byte, error) {
	gcc := GCC(tb)
	dir, err := os.MkdirTemp("", "cabi")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	bin := filepath.Join(dir, "prog")
	cc := exec.Command(gcc, "-std=c11", "-Wall", "-Werror", "-O0", "-x", "c", "-", "-o", bin)
	cc.Stdin = strings.NewReader(src)
	if out, err := cc.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("compile: %v\n%s\n%s", err, out, src)
	}
	cmd := exec.Command(bin)
	cmd.Stdin = bytes.NewReader(stdin)
	var errb bytes.Buffer
	cmd.Stderr = &errb
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("run: %v\n%s", err, errb.String())
	}
	return out, nil
}
