package monitor

import "github.com/umbra-cc/umbra/internal/testenv"

// testELF builds a minimal guest ELF (testenv.ELF).
var testELF = testenv.ELF
