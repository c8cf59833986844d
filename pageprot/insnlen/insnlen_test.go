package insnlen

import (
	"encoding/hex"
	"errors"
	"strings"
	"testing"
)

// vectors were produced by GNU as 2.x and objdump (x86-64), not by this package.
var vectors = []struct{ asm, hex string }{
	{"mov    %al,(%rdi)", "88 07"},
	{"mov    %eax,(%rdi)", "89 07"},
	{"mov    %rax,(%rdi)", "48 89 07"},
	{"mov    %ax,(%rdi)", "66 89 07"},
	{"mov    %r8,0x10(%rsp)", "4c 89 44 24 10"},
	{"mov    %r15d,-0x1000(%rbp,%rcx,8)", "44 89 bc cd 00 f0 ff ff"},
	{"movb   $0x5a,(%rdi)", "c6 07 5a"},
	{"movw   $0x1234,(%rdi)", "66 c7 07 34 12"},
	{"movl   $0x12345678,0x12345678(%rip)", "c7 05 78 56 34 12 78 56 34 12"},
	{"movq   $0xffffffffffffffff,(%rdi,%rsi,1)", "48 c7 04 37 ff ff ff ff"},
	{"movq   $0x7,0x40(%r12)", "49 c7 44 24 40 07 00 00 00"},
	{"mov    (%rsi),%rax", "48 8b 06"},
	{"mov    0x8(%r13),%ecx", "41 8b 4d 08"},
	{"movabs %rax,0xfffff80000001000", "48 a3 00 10 00 00 00 f8 ff ff"},
	{"movabs %al,0xfffff80000001000", "a2 00 10 00 00 00 f8 ff ff"},
	{"movabs 0xfffff80000001000,%eax", "a1 00 10 00 00 00 f8 ff ff"},
	{"addl   $0x1,(%rax)", "83 00 01"},
	{"addq   $0x1000,0x8(%rax)", "48 81 40 08 00 10 00 00"},
	{"orb    $0x80,(%rdx)", "80 0a 80"},
	{"and    %eax,(%rbx)", "21 03"},
	{"sub    %rcx,(%rcx,%rdx,4)", "48 29 0c 91"},
	{"lock incl (%rdi)", "f0 ff 07"},
	{"lock xadd %rax,(%rdi)", "f0 48 0f c1 07"},
	{"lock cmpxchg %rcx,(%rdi)", "f0 48 0f b1 0f"},
	{"lock cmpxchg16b (%rdi)", "f0 48 0f c7 0f"},
	{"xchg   %rax,(%rdi)", "48 87 07"},
	{"incq   0x18(%rdi)", "48 ff 47 18"},
	{"decw   (%rdi)", "66 ff 0f"},
	{"notl   (%rdi)", "f7 17"},
	{"negq   (%rdi)", "48 f7 1f"},
	{"testb  $0x1,(%rdi)", "f6 07 01"},
	{"testl  $0x100,(%rdi)", "f7 07 00 01 00 00"},
	{"testw  $0x100,(%rdi)", "66 f7 07 00 01"},
	{"shlq   $0x3,(%rdi)", "48 c1 27 03"},
	{"sarl   (%rdi)", "d1 3f"},
	{"shrq   %cl,(%rdi)", "48 d3 2f"},
	{"movzbl (%rsi),%eax", "0f b6 06"},
	{"movzwq (%rsi),%rax", "48 0f b7 06"},
	{"movsbq 0x1(%rsi),%rax", "48 0f be 46 01"},
	{"movslq (%rsi),%rax", "48 63 06"},
	{"sete   (%rdi)", "0f 94 07"},
	{"btsq   $0x5,(%rdi)", "48 0f ba 2f 05"},
	{"bts    %rax,(%rdi)", "48 0f ab 07"},
	{"cmovne (%rdi),%rax", "48 0f 45 07"},
	{"imul   $0x3,(%rdi),%eax", "6b 07 03"},
	{"imul   $0x12c,(%rdi),%eax", "69 07 2c 01 00 00"},
	{"movups %xmm0,(%rdi)", "0f 11 07"},
	{"movaps %xmm1,0x10(%rdi)", "0f 29 4f 10"},
	{"movdqu %xmm2,(%rdi)", "f3 0f 7f 17"},
	{"movdqa %xmm3,(%rdi)", "66 0f 7f 1f"},
	{"movq   %xmm0,(%rdi)", "66 0f d6 07"},
	{"movd   %xmm0,(%rdi)", "66 0f 7e 07"},
	{"movnti %rax,(%rdi)", "48 0f c3 07"},
	{"movntdq %xmm0,(%rdi)", "66 0f e7 07"},
	{"movsd  %xmm0,(%rdi)", "f2 0f 11 07"},
	{"movss  %xmm0,(%rdi)", "f3 0f 11 07"},
	{"movsq  %ds:(%rsi),%es:(%rdi)", "48 a5"},
	{"rep stos %al,%es:(%rdi)", "f3 aa"},
	{"rep movsb %ds:(%rsi),%es:(%rdi)", "f3 a4"},
	{"stos   %rax,%es:(%rdi)", "48 ab"},
	{"push   (%rdi)", "ff 37"},
	{"pop    (%rdi)", "8f 07"},
	{"call   *(%rax)", "ff 10"},
	{"jmp    *0x10(%rax)", "ff 60 10"},
	{"mov    %eax,(%edi)", "67 89 07"},
	{"movw   $0x1234,%fs:0x10(%rdi)", "64 66 c7 47 10 34 12"},
	{"mov    %gs:0x28,%rax", "65 48 8b 04 25 28 00 00 00"},
	{"movl   $0x1,(%rsp)", "c7 04 24 01 00 00 00"},
	{"movl   $0x1,0x12345678(,%rax,4)", "c7 04 85 78 56 34 12 01 00 00 00"},
	{"movl   $0x1,0x12345678", "c7 04 25 78 56 34 12 01 00 00 00"},
	{"addl   $0x1,0x80(%rsp)", "83 84 24 80 00 00 00 01"},
	{"mov %eax,0x12345678 (addr32 moffs)", "67 a3 78 56 34 12"},
}

func unhex(t testing.TB, s string) []byte {
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestLengthVectors(t *testing.T) {
	for _, v := range vectors {
		code := unhex(t, v.hex)
		want := len(code)
		// Trailing bytes must not change the answer.
		padded := append(append([]byte{}, code...), 0x90, 0x90, 0x0f, 0x0b)
		got, err := Length(padded)
		if err != nil || got != want {
			t.Errorf("%s [% x]: Length = %d, %v; want %d", v.asm, code, got, err, want)
		}
		// Any strict prefix is truncated.
		for n := 0; n < want; n++ {
			if _, err := Length(code[:n]); !errors.Is(err, ErrTruncated) {
				t.Errorf("%s cut to %d bytes: err = %v, want ErrTruncated", v.asm, n, err)
			}
		}
	}
}

func TestLengthRefused(t *testing.T) {
	for _, tc := range []struct {
		name, hex string
		want      error
	}{
		{"empty", "", ErrTruncated},
		{"nop is not a memory form", "90", ErrUnsupported},
		{"lea computes no access", "48 8d 07", ErrUnsupported},
		{"vex vmovdqu", "c5 fe 7f 07", ErrUnsupported},
		{"evex", "62 f1 7c 48 11 07", ErrUnsupported},
		{"three-byte 0f 38", "66 0f 38 00 07", ErrUnsupported},
		{"legacy prefix after rex", "48 66 89 07", ErrUnsupported},
		{"two rex", "48 48 89 07", ErrUnsupported},
		{"xop is not pop", "8f e8 78 c0 c1 01", ErrUnsupported},
		{"fe /7 is undefined", "fe 3f", ErrUnsupported},
		{"ff /7 is undefined", "ff 3f", ErrUnsupported},
		{"15 prefixes", "66 66 66 66 66 66 66 66 66 66 66 66 66 66 66 89 07", ErrTooLong},
		{"too long with operands", "66 66 66 66 66 66 66 66 66 48 c7 04 85 78 56 34 12 01 00 00 00", ErrTooLong},
	} {
		_, err := Length(unhex(t, tc.hex))
		if !errors.Is(err, tc.want) {
			t.Errorf("%s: err = %v, want %v", tc.name, err, tc.want)
		}
	}
}

func FuzzLength(f *testing.F) {
	for _, v := range vectors {
		f.Add(unhex(f, v.hex))
	}
	f.Fuzz(func(t *testing.T, code []byte) {
		n, err := Length(code)
		if err != nil {
			if n != 0 {
				t.Fatalf("error %v with length %d", err, n)
			}
			return
		}
		if n < 1 || n > MaxLen || n > len(code) {
			t.Fatalf("length %d for %d bytes", n, len(code))
		}
		// The answer depends only on the instruction's own bytes.
		if m, err := Length(code[:n]); err != nil || m != n {
			t.Fatalf("Length(code[:%d]) = %d, %v", n, m, err)
		}
	})
}

func BenchmarkLength(b *testing.B) {
	code := unhex(b, "49 c7 44 24 40 07 00 00 00")
	for b.Loop() {
		if _, err := Length(code); err != nil {
			b.Fatal(err)
		}
	}
}
