/* A header for cabi's own tests: padding, arrays, enums, macros of every kind. */
#ifndef SAMPLE_H
#define SAMPLE_H
#include <stdint.h>

#define S_ANSWER   42
#define S_SHIFTED  (64u << 20)
#define S_NEG      (-2L)
#define S_BIG      0x0000800000000000ull
#define S_NAME     "not a number"
#define S_FIELD(w) ((w) & 0xff)
#define OTHER_PREFIX 7

enum s_kind { S_KIND_A = 1, S_KIND_B = 5 };

struct s_tight {
	uint32_t a;
	uint16_t b;
	uint16_t c;
	uint64_t d;
	char name[8];
};

struct s_padded {
	uint8_t x;   /* 7 bytes of padding follow */
	uint64_t y;
	uint16_t z;  /* 6 more at the end */
};
#endif
